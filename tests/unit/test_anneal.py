"""The annealing stage on the real tiny VLM and real synthetic data: LR schedule and parameter
groups, bad-input accounting, a short run whose loss falls and whose saved folder reloads and
passes the mode-compliance check, and the skip on rerun.

`make_run` / `sft_records` are reused by tests/integration/test_anneal_distributed.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from r4b_core.config import RunConfig, SyntheticDataConfig, TinyModelConfig, load_config


def sft_records(out_dir: Path, n: int, seed: int = 0, both_modes: bool = True) -> Path:
    """A curated bi-mode JSONL built from `n` synthetic items (every item has a trace).

    both_modes: each item appears twice, with its thinking and with its direct target, so the
    forced prefix and not the question decides the mode (what the compliance check measures on an
    overfit set). Otherwise items alternate thinking / direct.
    """
    from r4b_core.data.schema import read_jsonl, write_jsonl
    from r4b_core.data.synthetic import generate_split

    raw = generate_split("train", n, SyntheticDataConfig(seed=seed), out_dir)
    out = []
    for i, r in enumerate(read_jsonl(raw).records):
        if both_modes:
            out.append(r.model_copy(update={"id": r.id + "-t", "label": "reasoning"}))
            out.append(r.model_copy(update={"id": r.id + "-d", "label": "direct"}))
        else:
            out.append(r.model_copy(update={"label": "reasoning" if i % 2 == 0 else "direct"}))
    path = out_dir / "sft.jsonl"
    write_jsonl(path, out)
    return path


def tiny_model(out_dir: Path, data: Path) -> Path:
    from r4b_core.data.schema import read_jsonl
    from r4b_core.models.tiny import build_tiny_vlm

    recs = read_jsonl(data).records
    texts = [r.question for r in recs] + [r.reasoning or "" for r in recs] + [r.answer for r in recs]
    return build_tiny_vlm(TinyModelConfig(), texts, out_dir, seed=0)


def make_run(root: Path, n_records: int = 24, **anneal) -> tuple[RunConfig, Path, Path, Path]:
    """(cfg, train JSONL, base model folder, output URI) for a tiny anneal under `root`."""
    data = sft_records(root / "data", n_records)
    base = root / "base"
    if not base.exists():
        tiny_model(base, data)
    overrides = {"steps": 30, "pack_length": 256, "micro_batch_size": 2, "log_every": 1,
                 "checkpoint_every": 1000, "compliance_samples": 0,
                 "optim": {"lr": 3e-3, "min_lr": 3e-4, "vision_lr": 3e-3, "projector_lr": 3e-3, "warmup_steps": 3}}
    for k, v in anneal.items():
        if isinstance(v, dict):
            overrides.setdefault(k, {}).update(v)
        else:
            overrides[k] = v
    cfg = RunConfig.model_validate({"name": "t", "storage": {"root": str(root / "runs")}, "anneal": overrides})
    return cfg, data, base, root / "runs" / "t" / "anneal" / "model"
