"""The tiny base's pretraining (r4b_core/pretrain.py): its data is right, and prepare runs it once."""

from __future__ import annotations

import re

import pytest

from r4b_core import layout
from r4b_core.config import load_config

REPO_CONFIG = "configs/tiny.yaml"


def _cfg(tmp_path, *sets):
    return load_config(REPO_CONFIG, [f"storage.root={tmp_path}", "name=pt", "data.synthetic.train_size=40",
                                     "data.synthetic.rl_size=8", "data.synthetic.eval_size=8", *sets])


def test_read_examples_transcribe_every_number_of_their_image(tmp_path):
    from r4b_core.data.schema import read_jsonl
    from r4b_core.data.synthetic import generate_all
    from r4b_core.pretrain import READ_QUESTION, reading_records

    cfg = _cfg(tmp_path)
    paths = generate_all(cfg.data.synthetic, tmp_path / "data")
    train = read_jsonl(paths["train"]).records
    read = reading_records(cfg, train)
    assert len(read) == len(train)
    for rec, ex in zip(train, read):
        assert ex.images == rec.images and ex.question == READ_QUESTION and ex.label == "direct"
        lines = ex.answer.splitlines()
        assert [ln.split(" = ")[0] for ln in lines] == list("ABCD")[: len(lines)]
        numbers = [int(ln.split(" = ")[1]) for ln in lines]
        # every number a math trace reads, and a perception item's answer, is in the transcription
        for m in re.finditer(r"^([A-D]) = (\d+)$", rec.reasoning or "", re.M):
            assert numbers["ABCD".index(m.group(1))] == int(m.group(2)), (rec, ex.answer)
        if rec.category == "perception" and rec.answer_type == "integer":
            assert int(rec.answer) in numbers


def test_arithmetic_examples_are_correct_trace_lines(tmp_path):
    from r4b_core.pretrain import arithmetic_records

    cfg = _cfg(tmp_path, "model.pretrain.arithmetic_items=300")
    recs = arithmetic_records(cfg)
    assert len(recs) == 300 and not any(r.images for r in recs)
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "×": lambda a, b: a * b}
    kinds = set()
    for r in recs:
        a, op, b = r.answer.split(" = ")[0].split()
        assert r.question == f"Compute {a} {op} {b}."
        assert int(r.answer.rsplit(" = ", 1)[1]) == ops[op](int(a), int(b)), r.answer
        kinds.add(op)
    assert kinds == {"+", "-", "×"}
    assert [r.answer for r in arithmetic_records(cfg)] == [r.answer for r in recs]    # seeded


def test_prepare_pretrains_once_and_later_stages_start_from_it(tmp_path):
    from r4b_core.prepare import init_model_hash, run_prepare
    from r4b_core.storage import Store

    cfg = _cfg(tmp_path, "model.pretrain.steps=3", "model.pretrain.arithmetic_items=20", "anneal.micro_batch_size=2",
               "anneal.log_every=1")
    out = run_prepare(cfg)
    assert out["base_model"] == layout.base_model_dir(cfg) == layout.model_dir(cfg, "pretrain")
    store = Store.from_config(cfg.storage)
    manifest = store.read_manifest(out["base_model"])
    assert manifest["steps"] == 3 and manifest["metrics"]["loss"] > 0
    assert manifest["data"]["used"] == 40 + 20       # one read example per training image + arithmetic
    assert store.is_complete(layout.init_model_dir(cfg), init_model_hash(cfg))
    again = store.read_manifest(out["base_model"])
    run_prepare(cfg)
    assert store.read_manifest(out["base_model"]) == again     # skipped: nothing rewritten


def test_pretraining_needs_the_synthetic_source(tmp_path):
    from r4b_core.pretrain import PretrainError, run_pretrain
    from r4b_core.storage import Store

    cfg = _cfg(tmp_path, "model.pretrain.steps=3", "data.source=jsonl", "data.train_uri=/nowhere/train.jsonl",
               "data.rl_uri=/nowhere/rl.jsonl", "data.eval_uri=/nowhere/eval.jsonl")
    with pytest.raises(PretrainError, match="data.source: synthetic"):
        run_pretrain(cfg, Store.from_config(cfg.storage), "/nowhere/train.jsonl", str(tmp_path / "init"))
