"""Helpers shared by the BPO tests (tests/unit/test_bpo.py, tests/integration/test_bpo_vllm.py,
tests/integration/test_bpo_distributed.py) and bench/weight_sync.py: a warm-started tiny model,
a small BPO run config, and on-policy train items built by hand."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from r4b_core import bpo
from r4b_core.config import RunConfig
from r4b_core.data.schema import Record
from r4b_core.modes import Mode

QUESTIONS = [f"What is {a} + {b}?" for a in range(3) for b in range(3)]


def math_prompt(i: int) -> bpo.Prompt:
    rec = Record(id=f"q{i}", question=QUESTIONS[i], answer="0", images=["x.png"], category="math")
    img = Image.new("RGB", (64, 64), (40 * i % 255, 90, 200))
    return bpo.Prompt(rec, [img])


def on_policy_items(encoder, prompt, gen_think, gen_no_think, adv_think, adv_no_think, model, g=2):
    """Train items for one prompt: g think + g no-think rollouts with fixed generated tokens, and
    rollout logprobs taken from the model itself (an on-policy batch)."""
    items = []
    for mode, gen, adv in ((Mode.THINK, gen_think, adv_think), (Mode.NO_THINK, gen_no_think, adv_no_think)):
        enc = encoder.encode(prompt, mode)
        tmp = bpo.TrainItem(enc, list(gen), [0.0] * len(gen), adv, mode == Mode.THINK)
        mb = bpo.collate([tmp], [0], encoder.pad_id, True)
        with torch.no_grad():
            logp, _ = bpo.sequence_logprobs(model, mb, 1.0, encoder.suppress)
        lp = logp[mb.generated_mask].tolist()
        items += [bpo.TrainItem(enc, list(gen), lp, adv, mode == Mode.THINK) for _ in range(g)]
    return items


def two_prompt_batch(encoder, model) -> list:
    """On-policy items for prompts 0 and 1 (2 think + 2 no-think rollouts each, advantages of both
    signs): the batch the micro-batching tests split and compare."""
    tok = encoder.processor.tokenizer
    items = []
    for i, (adv_think, adv_direct) in enumerate(((0.8, -0.3), (-1.2, 0.5))):
        items += on_policy_items(encoder, math_prompt(i), tok.encode("1 + 1 = 2\n</think>\n\n2", add_special_tokens=False),
                                 tok.encode("7 7 7", add_special_tokens=False), adv_think, adv_direct, model)
    return items


def warm_start(root: Path, anneal_steps: int = 40, reasoning_every: int | None = None) -> tuple[Path, Path]:
    """(annealed model folder, RL prompts JSONL). The tiny VLM is annealed briefly on level-1
    synthetic items (direct answers for all, thinking traces for math — or, with
    `reasoning_every=k`, for every k-th item of either category) so that its rollouts are
    sometimes right: a random model scores 0 everywhere and every group would be dropped."""
    from r4b_core.anneal import run_anneal
    from r4b_core.config import SyntheticDataConfig, TinyModelConfig
    from r4b_core.data.schema import read_jsonl, write_jsonl
    from r4b_core.data.synthetic import generate_split, tokenizer_corpus
    from r4b_core.models.tiny import build_tiny_vlm

    data = SyntheticDataConfig(seed=0, difficulties=[1])
    raw = read_jsonl(generate_split("train", 160, data, root / "data")).records
    sft = [r.model_copy(update={"label": "direct"}) for r in raw]
    think = [r for i, r in enumerate(raw) if (i % reasoning_every == 0 if reasoning_every else r.category == "math")]
    sft += [r.model_copy(update={"id": r.id + "-t", "label": "reasoning"}) for r in think]
    write_jsonl(root / "data" / "sft.jsonl", sft)
    rl = generate_split("rl", 48, data, root / "data")
    base = build_tiny_vlm(TinyModelConfig(), tokenizer_corpus(raw), root / "base", seed=0)
    cfg = RunConfig.model_validate({"name": "warm", "storage": {"root": str(root / "runs")}, "anneal": {
        "steps": anneal_steps, "pack_length": 512, "micro_batch_size": 4, "log_every": 20, "checkpoint_every": 1000,
        "compliance_samples": 0,
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "vision_lr": 3e-3, "projector_lr": 3e-3, "warmup_steps": 5}}})
    run_anneal(cfg, str(root / "data" / "sft.jsonl"), str(base), str(root / "anneal"))
    return root / "anneal", rl


def bpo_run_config(root: Path, **over) -> RunConfig:
    b = dict(engine="hf", steps=3, prompts_per_step=4, group_size=4, micro_batch_size=16, max_new_tokens_think=40,
             max_new_tokens_no_think=8, probe_size=4, probe_every=2, checkpoint_every=2, cpu_threads=1,
             optim={"lr": 1e-3, "min_lr": 1e-3, "vision_lr": None, "projector_lr": None, "warmup_steps": 0})
    b.update(over)
    return RunConfig.model_validate({"name": "t", "storage": {"root": str(root)}, "bpo": b})
