"""What the benchmarks share: the offline environment, this checkout on sys.path, the load line
every figure is printed with, and the toy models and data they time (a tiny VLM with its
synthetic data; the briefly annealed warm start the BPO benchmarks and tests start from).

    import common                   # first, in a bench/*.py script: sets up the environment
    model_dir, records = common.tiny_model_and_split(tmp, "rl", 64)
    print(common.load())

Benchmarks never import tests/; tests/bpo_helpers.py takes its warm start from here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))            # this checkout's r4b_core, as the tests use

if TYPE_CHECKING:
    from r4b_core.config import RunConfig


def load() -> str:
    """The machine's load, printed with every figure (wall times on a shared machine lie without it)."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def tiny_model_and_split(tmp: Path, split: str, n: int, tiny=None, min_items: int = 0):
    """(a tiny VLM whose tokenizer was trained on the split, the split's first `n` records): the
    seed-0 synthetic `split` of max(n, min_items) items written under tmp/data, the model under
    tmp/model (`tiny`: a TinyModelConfig, default the toy one)."""
    from r4b_core.config import SyntheticDataConfig, TinyModelConfig
    from r4b_core.data.schema import read_jsonl
    from r4b_core.data.synthetic import generate_split, tokenizer_corpus
    from r4b_core.models.tiny import build_tiny_vlm

    path = generate_split(split, max(n, min_items), SyntheticDataConfig(seed=0), tmp / "data")
    records = read_jsonl(path).records
    model_dir = build_tiny_vlm(tiny or TinyModelConfig(), tokenizer_corpus(records), tmp / "model", seed=0)
    return model_dir, records[:n], path


def images_of(records, jsonl: Path) -> list[list]:
    """Each record's images, loaded (paths relative to its JSONL)."""
    from r4b_core.data.images import load_image

    return [[load_image(ref, jsonl) for ref in r.images] for r in records]


def warm_start(root: Path, anneal_steps: int = 40, reasoning_every: int | None = None) -> tuple[Path, Path]:
    """(annealed model folder, RL prompts JSONL). The tiny VLM is annealed briefly on level-1
    synthetic items (direct answers for all, thinking traces for math — or, with
    `reasoning_every=k`, for every k-th item of either category) so that its rollouts are
    sometimes right: a random model scores 0 everywhere and every group would be dropped."""
    from r4b_core.anneal import run_anneal
    from r4b_core.config import RunConfig, SyntheticDataConfig, TinyModelConfig
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
    """A small BPO run on the hf engine under `root` (keyword arguments replace bpo.* values)."""
    from r4b_core.config import RunConfig

    b = dict(engine="hf", steps=3, prompts_per_step=4, group_size=4, micro_batch_size=16, max_new_tokens_think=40,
             max_new_tokens_no_think=8, probe_size=4, probe_every=2, checkpoint_every=2, cpu_threads=1,
             optim={"lr": 1e-3, "min_lr": 1e-3, "vision_lr": None, "projector_lr": None, "warmup_steps": 0})
    b.update(over)
    return RunConfig.model_validate({"name": "t", "storage": {"root": str(root)}, "bpo": b})


def annealed_model(root: Path) -> tuple[Path, list]:
    """(a tiny VLM annealed 160 steps on both modes of 24 synthetic items, those items): the
    serving tests' and benchmark's champion, whose answers have real think blocks (~45 s on one thread)."""
    import torch

    from r4b_core.anneal import run_anneal
    from r4b_core.config import RunConfig, SyntheticDataConfig, TinyModelConfig
    from r4b_core.data.schema import read_jsonl, write_jsonl
    from r4b_core.data.synthetic import generate_split
    from r4b_core.models.tiny import build_tiny_vlm

    raw = read_jsonl(generate_split("train", 24, SyntheticDataConfig(seed=0), root / "data")).records
    # math only ever answered with reasoning, perception in both modes with the direct answer twice:
    # auto mode then thinks on math and answers perception directly (a decision by content, which
    # 160 steps learn; one by item did not), and forced thinking has a trace to follow everywhere
    sft = [r.model_copy(update={"id": f"{r.id}-{tag}", "label": label})
           for r in raw for tag, label in (("t", "reasoning"), ("d", "direct"), ("d2", "direct"))
           if label == "reasoning" or r.category == "perception"]
    write_jsonl(root / "data" / "sft.jsonl", sft)
    base = build_tiny_vlm(TinyModelConfig(), [t for r in raw for t in (r.question, r.reasoning or "", r.answer)],
                          root / "base", seed=0)
    cfg = RunConfig.model_validate({"name": "t", "storage": {"root": str(root / "runs")}, "anneal": {
        "steps": 160, "pack_length": 256, "micro_batch_size": 2, "log_every": 40, "checkpoint_every": 1000,
        "compliance_samples": 0,
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "vision_lr": 3e-3, "projector_lr": 3e-3, "warmup_steps": 3}}})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)    # 2 busy cores: one thread is faster
    try:
        out = root / "runs" / "t" / "anneal" / "model"
        run_anneal(cfg, str(root / "data" / "sft.jsonl"), str(base), str(out))
    finally:
        torch.set_num_threads(threads)
    return out, raw
