"""The tiny base's pretraining (r4b_core/pretrain.py): its data is right, and prepare runs it once."""

from __future__ import annotations


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
        numbers = [int(ln.split(" = ")[1].split()[0]) for ln in lines]
        # the transcription is the description every trace starts with (number and colour; perception
        # traces add each number's row and length to its line)
        trace = (rec.reasoning or "").splitlines()[:len(lines)]
        assert trace == lines if rec.category == "math" else all(t.startswith(ln + ", ") for t, ln in zip(trace, lines))
        if rec.category == "perception":
            assert rec.answer in ([str(n) for n in numbers] if rec.answer_type == "integer"
                                  else [ln.split()[-1] for ln in lines])


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


def test_think_and_direct_examples_answer_training_questions_both_ways(tmp_path):
    from r4b_core import modes
    from r4b_core.data.schema import read_jsonl
    from r4b_core.data.synthetic import generate_all
    from r4b_core.pretrain import question_records

    cfg = _cfg(tmp_path, "model.pretrain.question_items=10", "model.pretrain.direct_items=4")
    train = read_jsonl(generate_all(cfg.data.synthetic, tmp_path / "data")["train"]).records
    think, direct = question_records(cfg, train, "reasoning"), question_records(cfg, train, "direct")
    assert [r.id for r in think] == [f"{r.id}-think" for r in train[:10]]
    assert [r.id for r in direct] == [f"{r.id}-direct" for r in train[:4]]
    for rec, t, d in zip(train, think, direct):
        assert t.images == d.images == rec.images and t.question == d.question == rec.question
        assert t.sft_target().startswith(modes.GENERATION_PREFIX[modes.Mode.THINK] + rec.reasoning)
        assert d.sft_target().startswith(modes.GENERATION_PREFIX[modes.Mode.NO_THINK] + rec.answer)


def test_prepare_pretrains_once_and_later_stages_start_from_it(tmp_path):
    from r4b_core.prepare import init_model_hash, run_prepare
    from r4b_core.storage import Store

    sets = ["model.pretrain.steps=3", "model.pretrain.arithmetic_items=20", "model.pretrain.question_items=10",
            "model.pretrain.direct_items=10",
            "model.pretrain.tasks=[read, arithmetic, think, direct]", "anneal.micro_batch_size=2", "anneal.log_every=1"]
    cfg = _cfg(tmp_path, *sets)
    out = run_prepare(cfg)
    assert out["base_model"] == layout.base_model_dir(cfg) == layout.model_dir(cfg, "pretrain")
    store = Store.from_config(cfg.storage)
    manifest = store.read_manifest(out["base_model"])
    assert manifest["steps"] == 3 and manifest["metrics"]["loss"] > 0
    # one read example per training image + arithmetic + each question answered both ways
    assert manifest["data"]["used"] == 40 + 20 + 2 * 10
    assert manifest["data"]["think"] == 10
    assert store.is_complete(layout.init_model_dir(cfg), init_model_hash(cfg))
    again = store.read_manifest(out["base_model"])
    run_prepare(cfg)
    assert store.read_manifest(out["base_model"]) == again     # skipped: nothing rewritten
    # pretraining has its own optimizer: new annealing settings leave the base as it is
    run_prepare(_cfg(tmp_path, *sets, "anneal.optim.lr=1e-5", "anneal.optim.warmup_steps=3"))
    assert store.read_manifest(out["base_model"]) == again


def test_pretraining_needs_the_synthetic_source(tmp_path):
    from r4b_core.pretrain import PretrainError, run_pretrain
    from r4b_core.storage import Store

    cfg = _cfg(tmp_path, "model.pretrain.steps=3", "data.source=jsonl", "data.train_uri=/nowhere/train.jsonl",
               "data.rl_uri=/nowhere/rl.jsonl", "data.eval_uri=/nowhere/eval.jsonl")
    with pytest.raises(PretrainError, match="data.source: synthetic"):
        run_pretrain(cfg, Store.from_config(cfg.storage), "/nowhere/train.jsonl", str(tmp_path / "init"))
