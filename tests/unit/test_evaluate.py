"""Evaluation metrics on hand-made predictions (numbers computed by hand in the comments), the
external benchmark loader with a field map, and the human report (markdown + non-empty plots)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from r4b_core import evaluate, report
from r4b_core.data.schema import Record


def row(item, cat, diff, mode, correct, tokens, thought, bench="eval"):
    return {"benchmark": bench, "id": item, "category": cat, "difficulty": diff, "mode": mode,
            "correct": correct, "tokens": tokens, "thought": thought}


# item A: every mode right; B: only think right; C: auto (thinking) and think right; D: none right.
PREDS = [
    row("A", "perception", 1, "auto", True, 3, False),
    row("A", "perception", 1, "think", True, 20, True),
    row("A", "perception", 1, "no_think", True, 2, False),
    row("B", "math", 1, "auto", False, 2, False),
    row("B", "math", 1, "think", True, 30, True),
    row("B", "math", 1, "no_think", False, 2, False),
    row("C", "math", 3, "auto", True, 25, True),
    row("C", "math", 3, "think", True, 40, True),
    row("C", "math", 3, "no_think", False, 3, False),
    row("D", "math", 3, "auto", False, 50, True),
    row("D", "math", 3, "think", False, 50, True),
    row("D", "math", 3, "no_think", False, 2, False),
]


def test_metrics_hand_computed():
    m = evaluate.compute_metrics(PREDS)
    assert m["n_items"] == 4
    assert m["modes"]["auto"] == {"n": 4, "accuracy": 0.5, "mean_tokens": 20.0, "think_rate": 0.5}
    assert m["modes"]["think"] == {"n": 4, "accuracy": 0.75, "mean_tokens": 35.0, "think_rate": 1.0}
    assert m["modes"]["no_think"] == {"n": 4, "accuracy": 0.25, "mean_tokens": 2.25, "think_rate": 0.0}
    # S = {A, B, C} (some forced mode right); auto right on A and C -> 2/3.
    assert m["hybrid_items"] == 3
    assert m["hybrid_accuracy"] == pytest.approx(2 / 3)
    assert m["oracle_accuracy"] == 0.75
    # Only A is right in all three modes.
    assert m["tokens_at_matched_accuracy"] == {"items": 1, "auto": 3.0, "think": 20.0, "no_think": 2.0}


def test_report_groups_hand_computed():
    rep = evaluate.build_report(PREDS)
    math = rep["by_category"]["math"]
    assert math["modes"]["auto"]["accuracy"] == pytest.approx(1 / 3)
    assert math["hybrid_accuracy"] == 0.5            # S = {B, C}, auto right on C
    assert rep["by_category"]["perception"]["hybrid_accuracy"] == 1.0
    assert rep["by_difficulty"]["3"]["modes"]["auto"]["think_rate"] == 1.0
    assert rep["by_difficulty"]["1"]["modes"]["auto"]["think_rate"] == 0.0
    assert set(rep["cells"]) == {"perception/1", "math/1", "math/3"}
    assert rep["by_benchmark"]["eval"]["hybrid_accuracy"] == pytest.approx(2 / 3)
    # The shape the promotion gate and the docs rely on.
    for key in ("modes", "by_category", "by_difficulty", "hybrid_accuracy"):
        assert key in rep
    for m in ("auto", "think", "no_think"):
        assert set(rep["modes"][m]) >= {"accuracy", "mean_tokens", "think_rate"}


def test_hybrid_undefined_without_forced_success_or_modes():
    m = evaluate.compute_metrics([row("D", "math", 3, mo, False, 5, mo == "think") for mo in ("auto", "think", "no_think")])
    assert m["hybrid_accuracy"] is None and m["hybrid_items"] == 0 and m["oracle_accuracy"] == 0.0
    only_auto = evaluate.compute_metrics([row("A", "math", 1, "auto", True, 4, True)], ["auto"])
    assert only_auto["hybrid_accuracy"] is None and only_auto["oracle_accuracy"] is None
    assert set(only_auto["modes"]) == {"auto"}


def test_prediction_row_uses_the_mode_prefix():
    r = Record(id="x", question="q", answer="12", answer_type="integer")
    # auto: the model opened a non-empty think block, then answered.
    p = evaluate.prediction_row("\n3 + 9 = 12\n</think>\n\n12", "auto", r, 9, "stop", True, "eval")
    assert p["thought"] and p["prediction"] == "12" and p["closed"] and p["correct"] is True
    # auto: empty block -> no thinking.
    p = evaluate.prediction_row("\n\n</think>\n\n12", "auto", r, 4, "stop", True, "eval")
    assert not p["thought"] and p["prediction"] == "12"
    # think: truncated block has no answer.
    p = evaluate.prediction_row("3 + 9 = 12", "think", r, 6, "length", False, "eval")
    assert not p["closed"] and p["thought"] and p["prediction"] == ""
    # no_think: the answer is the whole text.
    p = evaluate.prediction_row("12", "no_think", r, 1, "stop", True, "eval")
    assert not p["thought"] and p["prediction"] == "12" and p["tokens"] == 1


# --- external benchmarks ------------------------------------------------------------------------
MATHVISTA_MAP = {"id": "pid", "question": "query", "images": "image", "answer_type": "answer_type",
                 "category": "metadata.category", "choices": "choices"}


def test_external_loader_with_field_map(tmp_path):
    lines = [
        {"pid": 1, "query": "How many bars?", "image": "images/1.png", "answer": 4, "answer_type": "integer",
         "metadata": {"category": "math-targeted-vqa"}, "choices": None},
        {"pid": "2", "query": "Which is larger?", "image": "images/2.png", "answer": "B",
         "answer_type": "text", "metadata": {"category": "general-vqa"}, "choices": ["A", "B"]},
        {"pid": 3, "query": "Area?", "image": "images/3.png", "answer": 1.5, "answer_type": "float",
         "metadata": {"category": "math-targeted-vqa"}, "choices": None},
    ]
    text = "\n".join(json.dumps(x) for x in lines)
    recs = evaluate.load_benchmark(text, str(tmp_path / "mathvista.jsonl"), MATHVISTA_MAP, "mathvista")
    assert [r.id for r in recs] == ["1", "2", "3"]
    assert [r.answer_type for r in recs] == ["integer", "choice", "number"]
    assert recs[0].answer == "4" and recs[2].answer == "1.5"
    assert recs[0].images == [str(tmp_path / "images" / "1.png")]
    assert recs[1].choices == ["A", "B"] and recs[1].category == "general-vqa"
    assert recs[0].difficulty == 0 and recs[0].source == "mathvista"
    assert len(evaluate.load_benchmark(text, "m.jsonl", MATHVISTA_MAP, "m", limit=2)) == 2


def test_external_loader_errors_name_line_and_field(tmp_path):
    good = {"pid": 1, "query": "q", "image": "a.png", "answer": 4, "metadata": {"category": "c"}}
    bad = {"pid": 2, "question": "q", "image": "a.png", "answer": 4, "metadata": {"category": "c"}}
    text = json.dumps(good) + "\n" + json.dumps(bad) + "\n"
    with pytest.raises(evaluate.EvalError, match=r"mv.jsonl:2: query: missing field for our 'question'"):
        evaluate.load_benchmark(text, "mv.jsonl", MATHVISTA_MAP, "mv")
    # A mapped optional field present on no line is a typo in the map.
    with pytest.raises(evaluate.EvalError, match=r"field_map entries match no line: answer_type -> 'answer_type', "
                                                 r"choices -> 'choices'"):
        evaluate.load_benchmark(json.dumps(good), "mv.jsonl", MATHVISTA_MAP, "mv")
    with pytest.raises(evaluate.EvalError, match=r"unknown answer type 'vector'"):
        evaluate.load_benchmark(json.dumps(good | {"answer_type": "vector"}), "mv.jsonl", MATHVISTA_MAP, "mv")
    with pytest.raises(evaluate.EvalError, match=r"mv.jsonl:1: not valid JSON"):
        evaluate.load_benchmark("{oops", "mv.jsonl", MATHVISTA_MAP, "mv")
    with pytest.raises(evaluate.EvalError, match="unknown target field"):
        evaluate.load_benchmark(json.dumps(good), "mv.jsonl", {"query_text": "query"}, "mv")
    with pytest.raises(evaluate.EvalError, match="duplicate id '1'"):
        evaluate.load_benchmark(json.dumps(good) + "\n" + json.dumps(good), "mv.jsonl", {"id": "pid", "question": "query"}, "mv")


def test_own_schema_without_map_is_strict(tmp_path):
    from r4b_core.data.schema import DataError

    with pytest.raises(DataError, match=r"e.jsonl:1: answer"):
        evaluate.load_benchmark(json.dumps({"id": "a", "question": "q"}), "e.jsonl", None)


def test_load_report_errors(tmp_path):
    (tmp_path / "report.json").write_text("{}")
    with pytest.raises(evaluate.EvalError, match="not an r4b eval report"):
        evaluate.load_report(str(tmp_path))
    with pytest.raises(evaluate.EvalError, match="cannot read the report"):
        evaluate.load_report(str(tmp_path / "nope" / "report.json"))


# --- the human report ---------------------------------------------------------------------------
def _png_ok(path):
    assert path.stat().st_size > 5_000, path
    px = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert px.std() > 5.0, f"{path} looks blank (pixel std {px.std():.2f})"


def test_write_report_files_and_plots(tmp_path):
    rep = evaluate.build_report(PREDS)
    rep.update(tag="anneal", model="runs/tiny/anneal/model", settings={"max_new_tokens": 64, "engine": "hf"})
    files = report.write_report(rep, tmp_path)
    names = sorted(f.name for f in files)
    assert names == sorted(["report.md", *report.PLOTS])
    for p in report.PLOTS:
        _png_ok(tmp_path / p)
    md = (tmp_path / "report.md").read_text()
    assert "| auto | 0.500 | 20.0 | 0.50 |" in md
    assert "| anneal | 0.667 | 3 | 0.750 | 1 |" in md
    for p in report.PLOTS:
        assert f"({p})" in md


def test_compare_report_side_by_side(tmp_path):
    base = evaluate.build_report(PREDS)
    base.update(tag="anneal", model="a")
    better = [dict(p, correct=True) if p["mode"] == "auto" else p for p in PREDS]
    rep = evaluate.build_report(better)
    rep.update(tag="bpo", model="b", compare={k: base[k] for k in ("modes", "by_category", "by_difficulty", "cells",
                                                                  "hybrid_accuracy", "hybrid_items", "oracle_accuracy",
                                                                  "tokens_at_matched_accuracy", "n_items")} | {"tag": "anneal", "model": "a"})
    report.write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "# Three-mode evaluation: bpo vs anneal" in md
    assert "| auto | 1.000 | 20.0 | 0.50 | 0.500 | 20.0 | 0.50 |" in md
    assert "| bpo | 1.000 | 3 |" in md and "| anneal | 0.667 | 3 |" in md
    for p in report.PLOTS:
        _png_ok(tmp_path / p)
    # The compared model adds bars: the comparison plot differs from a single-model plot.
    single = tmp_path / "single"
    report.write_report(evaluate.build_report(better) | {"tag": "bpo"}, single)
    assert (single / "accuracy_tokens.png").read_bytes() != (tmp_path / "accuracy_tokens.png").read_bytes()


def test_headline_keys_the_promotion_gate_reads():
    h = evaluate.headline(evaluate.build_report(PREDS))
    # config.PromotionConfig.max_drop defaults name these keys; renaming them breaks the gate.
    assert h["auto/math/accuracy"] == pytest.approx(1 / 3)
    assert h["no_think/accuracy"] == 0.25
    assert h["hybrid_accuracy"] == pytest.approx(2 / 3)
    assert h["auto/difficulty_3/think_rate"] == 1.0
    from r4b_core.config import PromotionConfig

    assert set(PromotionConfig().max_drop) <= set(h)


def test_eval_identity_known_only_with_model_lineage(tmp_path):
    from r4b_core.config import RunConfig
    from r4b_core.curate import identity_hash
    from r4b_core.storage import Store

    cfg = RunConfig.model_validate({"storage": {"root": str(tmp_path)}})
    store = Store.from_config(cfg.storage)
    model = tmp_path / "anneal" / "model"
    model.mkdir(parents=True)
    assert identity_hash(evaluate.eval_identity(cfg, store, str(model), {"eval": "x"}, "t", None, False)) is None
    store.commit(str(model), {"config_hash": "m1"})
    a = identity_hash(evaluate.eval_identity(cfg, store, str(model), {"eval": "x"}, "t", None, False))
    assert a is not None          # no comparison is a known value, not a missing one
    assert a != identity_hash(evaluate.eval_identity(cfg, store, str(model), {"eval": "y"}, "t", None, False))
    assert a != identity_hash(evaluate.eval_identity(cfg, store, str(model), {"eval": "x"}, "t", "o.json", False))
    store.commit(str(model), {"config_hash": "m2"})   # retrained in place: must re-evaluate
    assert a != identity_hash(evaluate.eval_identity(cfg, store, str(model), {"eval": "x"}, "t", None, False))
    # A hub id is its own identity; an engine passed in is unknown.
    assert identity_hash(evaluate.eval_identity(cfg, store, "Qwen/Qwen3-4B", {"eval": "x"}, "t", None, False))
    assert identity_hash(evaluate.eval_identity(cfg, store, str(model), {"eval": "x"}, "t", None, True)) is None
