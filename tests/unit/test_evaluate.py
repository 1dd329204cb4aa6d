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
    assert m["tokens_where_all_correct"] == {"items": 1, "auto": 3.0, "think": 20.0, "no_think": 2.0}
    # Needed (think right, no-think wrong): B, C. Auto thought: C, D. tp C, fn B, fp D, tn A.
    assert m["mode_selection"] == {"items": 4, "needed": 2, "thought": 2, "tp": 1, "fp": 1, "fn": 1, "tn": 1,
                                   "mcc": 0.0, "precision": 0.5, "recall": 0.5}
    # Auto 0.5 at 20 tokens; only think (0.75, 35 tokens) is at least as accurate: 20 / 35.
    assert m["tokens_at_matched_accuracy"] == {"auto_accuracy": 0.5, "auto_tokens": 20.0, "mode": "think",
                                               "mode_accuracy": 0.75, "mode_tokens": 35.0,
                                               "auto_over_mode": pytest.approx(20 / 35)}


def _item(i, needed, thought):
    """An item whose forced modes make thinking needed (or not) and whose auto answer thought (or not)."""
    return [row(i, "math", 2, "think", True, 30, True), row(i, "math", 2, "no_think", not needed, 2, False),
            row(i, "math", 2, "auto", True, 30 if thought else 2, thought)]


def test_mode_selection_mcc_precision_recall_hand_computed():
    # (needed, thought): tp tp fn tn fp -> tp 2, fn 1, tn 1, fp 1
    cases = [(True, True), (True, True), (True, False), (False, False), (False, True)]
    preds = [r for i, (n, t) in enumerate(cases) for r in _item(f"i{i}", n, t)]
    sel = evaluate.compute_metrics(preds)["mode_selection"]
    assert (sel["tp"], sel["fn"], sel["tn"], sel["fp"]) == (2, 1, 1, 1)
    # MCC = (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1/6
    assert sel["mcc"] == pytest.approx(1 / 6)
    assert sel["precision"] == pytest.approx(2 / 3) and sel["recall"] == pytest.approx(2 / 3)
    perfect = evaluate.compute_metrics([r for i, n in enumerate((True, False, True)) for r in _item(f"p{i}", n, n)])
    assert perfect["mode_selection"]["mcc"] == 1.0
    inverted = evaluate.compute_metrics([r for i, n in enumerate((True, False)) for r in _item(f"q{i}", n, not n)])
    assert inverted["mode_selection"]["mcc"] == -1.0 and inverted["mode_selection"]["precision"] == 0.0
    # Nothing needed thinking: MCC and recall undefined; auto thought once, wrongly: precision 0.
    none = evaluate.compute_metrics(_item("a", False, True) + _item("b", False, False))["mode_selection"]
    assert none["mcc"] is None and none["recall"] is None and none["precision"] == 0.0


def test_tokens_at_matched_accuracy_picks_the_cheapest_mode_that_reaches_auto():
    per_mode = {"auto": {"accuracy": 0.5, "mean_tokens": 12.0}, "think": {"accuracy": 0.8, "mean_tokens": 40.0},
                "no_think": {"accuracy": 0.5, "mean_tokens": 3.0}}
    t = evaluate.matched_accuracy_tokens(per_mode)
    assert t["mode"] == "no_think" and t["auto_over_mode"] == 4.0          # both reach 0.5; no-think is cheaper
    per_mode["auto"]["accuracy"] = 0.6
    t = evaluate.matched_accuracy_tokens(per_mode)
    assert t["mode"] == "think" and t["auto_over_mode"] == 0.3 and t["mode_accuracy"] == 0.8
    per_mode["auto"]["accuracy"] = 0.9                                      # auto beats both forced modes
    t = evaluate.matched_accuracy_tokens(per_mode)
    assert t["mode"] is None and t["auto_over_mode"] is None and t["auto_tokens"] == 12.0
    assert evaluate.matched_accuracy_tokens({"think": per_mode["think"]}) == {}


def test_pass_at_k_hand_computed():
    assert evaluate.pass_at_k(8, 2, 1) == 0.25
    assert evaluate.pass_at_k(8, 2, 4) == pytest.approx(1 - 15 / 70)       # 1 - C(6,4)/C(8,4)
    assert evaluate.pass_at_k(8, 2, 8) == 1.0 and evaluate.pass_at_k(8, 0, 8) == 0.0
    assert evaluate.pass_at_k(4, 3, 2) == 1.0                               # 1 wrong cannot fill 2 draws
    with pytest.raises(evaluate.EvalError, match="pass@8 needs at least 8 samples"):
        evaluate.pass_at_k(4, 1, 8)


def sample(item, mode, j, answer, correct, thought=False, tokens=5):
    return {"benchmark": "eval", "id": item, "category": "math", "difficulty": 2, "mode": mode, "sample": j,
            "prediction": answer, "correct": correct, "thought": thought, "tokens": tokens}


def test_majority_vote_hand_computed():
    s = [sample("x", "auto", j, a, a.strip() == "7") for j, a in enumerate(["7", "5", "5", " 7 ", "5"])]
    assert evaluate.majority_correct(s, 1) is True
    assert evaluate.majority_correct(s, 4) is True        # 7 and 5 twice each: 7 appeared first
    assert evaluate.majority_correct(s, 5) is False       # 5 three times
    assert evaluate.majority_correct(list(reversed(s)), 4) is True     # by sample index, not list order
    blank = [sample("y", "think", 0, "", False), sample("y", "think", 1, "", False), sample("y", "think", 2, "9", True)]
    assert evaluate.majority_correct(blank, 3) is True    # unanswered samples do not vote
    assert evaluate.majority_correct(blank, 2) is False   # no vote at all


def test_sampling_metrics_hand_computed():
    rows = [sample("X", "think", j, a, c, True, 20) for j, (a, c) in enumerate(
                [("12", True), ("11", False), ("11", False), ("12", True)])]
    rows += [sample("Y", "think", j, a, False, True, 30) for j, a in enumerate(["3", "4", "3", ""])]
    rows += [sample("X", "no_think", j, "12", True) for j in range(4)]
    m = evaluate.sampling_metrics(rows, [1, 4], ["think", "no_think"])
    t = m["think"]
    # X: 2 of 4 right -> pass@1 0.5, pass@4 1; Y: none right. maj@1: X's "12" right, Y's "3" wrong;
    # maj@4: X 12/11 tie -> 12 (first) right; Y "3" twice, wrong.
    assert t["items"] == 2 and t["samples_per_item"] == 4
    assert t["pass@1"] == 0.25 and t["pass@4"] == 0.5 and t["maj@1"] == 0.5 and t["maj@4"] == 0.5
    assert t["think_rate"] == 1.0 and t["mean_tokens"] == 25.0
    assert m["no_think"]["pass@1"] == 1.0 and m["no_think"]["maj@4"] == 1.0
    assert set(m) == {"think", "no_think"}


def test_sampled_predictions_are_seeded_per_item_and_mode(tiny_model_dir):
    """The real tiny model through the HF engine: k samples per item and mode, each row indexed;
    the same seed gives the same samples, another seed others."""
    from r4b_core.models.loading import load_model
    from r4b_core.rewards import RewardScorer
    from r4b_core.rollout.hf import HFEngine

    model, processor = load_model(str(tiny_model_dir))
    engine = HFEngine(model, processor)
    items = [Record(id=f"r{i}", question=f"What is {i} + 1?", answer=str(i + 1), answer_type="integer",
                    images=["x"]) for i in range(3)]
    image = Image.new("RGB", (64, 64), (200, 30, 30))

    with RewardScorer() as scorer:
        def run(seed, batch_size=3):
            return evaluate.predict(engine, items, ["auto", "no_think"], 6, batch_size, scorer, "eval",
                                    lambda r: [image], samples=4, temperature=1.0, seed=seed)[0]

        a = run(0)
        assert len(a) == 3 * 2 * 4
        assert [(r["id"], r["mode"], r["sample"]) for r in a[:5]] == [
            ("r0", "auto", 0), ("r0", "auto", 1), ("r0", "auto", 2), ("r0", "auto", 3), ("r0", "no_think", 0)]
        texts = lambda rows: [r["text"] for r in rows]   # noqa: E731
        assert texts(run(0, batch_size=1)) == texts(a)              # seeded per item and mode, not per batch
        assert texts(run(1)) != texts(a)
        assert len({r["text"] for r in a if r["id"] == "r0" and r["mode"] == "auto"}) > 1     # really sampled
        greedy, _ = evaluate.predict(engine, items[:1], ["auto"], 6, 1, scorer, "eval", lambda r: [image])
    assert "sample" not in greedy[0]


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
    assert "| anneal | 0.667 | 3 | 0.750 | 2 | 2 | 0.000 | 0.500 | 0.500 |" in md
    assert "| anneal | 0.500 | 20.0 | think | 0.750 | 35.0 | 0.57 | 1 | 3.0 | 20.0 | 2.0 |" in md
    # by category and level: math/3 auto 0.5, think 0.5, no-think 0, think-rate 1, tokens 37.5 / 45 / 2.5
    assert "| math | 3 | 0.500 | 0.500 | 0.000 | 1.00 | 37.5 | 45.0 | 2.5 |" in md
    assert "pass@k" not in md                               # not sampled: no table
    for p in report.PLOTS:
        assert f"({p})" in md


def test_compare_report_side_by_side(tmp_path):
    base = evaluate.build_report(PREDS)
    base.update(tag="anneal", model="a")
    better = [dict(p, correct=True) if p["mode"] == "auto" else p for p in PREDS]
    rep = evaluate.build_report(better)
    rep.update(tag="bpo", model="b", compare={k: base[k] for k in ("modes", "by_category", "by_difficulty", "cells",
                                                                  "hybrid_accuracy", "hybrid_items", "oracle_accuracy",
                                                                  "mode_selection", "tokens_at_matched_accuracy",
                                                                  "tokens_where_all_correct", "n_items")} | {"tag": "anneal", "model": "a"})
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


def test_sampling_block_reaches_the_markdown_and_the_headline(tmp_path):
    from r4b_core.config import EvalConfig

    rows = [sample("X", m, j, "12", j % 2 == 0) for m in ("auto", "think", "no_think") for j in range(4)]
    rep = evaluate.build_report(PREDS)
    rep.update(tag="t", sampling=evaluate.sampling_report(rows, EvalConfig(pass_k=[1, 4]), seed=3))
    assert rep["sampling"]["samples_per_item"] == 4 and rep["sampling"]["by_category"]["math"]["auto"]["pass@4"] == 1.0
    report.write_report(rep, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "sampled at temperature 1.0 (seed 3)" in md
    # every sample answers 12 (maj right: sample 0 is correct), half of them marked correct
    assert "| t | auto | 0.500 | 1.000 | 1.000 | 1.000 | 0.00 | 5.0 |" in md
    h = evaluate.headline(rep)
    assert h["think/pass@4"] == 1.0 and h["no_think/maj@1"] == 1.0
    assert h["auto/think_mcc"] == 0.0 and h["auto/think_recall"] == 0.5
    assert h["auto/tokens_over_matched_mode"] == pytest.approx(20 / 35)


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
    from r4b_core.identity import identity_hash
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
