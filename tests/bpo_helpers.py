"""Helpers shared by the BPO tests (tests/unit/test_bpo.py, tests/integration/test_bpo_vllm.py,
tests/integration/test_bpo_distributed.py): prompts and on-policy train items built by hand. The
warm-started tiny model and the small BPO run config they start from are the benchmarks' too
(bench/common.py: warm_start, bpo_run_config)."""

from __future__ import annotations

import torch
from PIL import Image

from r4b_core import bpo
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
