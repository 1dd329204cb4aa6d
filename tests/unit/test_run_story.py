"""The story table of `r4b run` (r4b_kfp.pipelines.local_run.paper_story) on hand-made predictions."""

from __future__ import annotations

import pytest

from r4b_core.evaluate import build_report
from r4b_kfp.pipelines.local_run import paper_story


def row(item, cat, diff, mode, correct, tokens, thought):
    return {"benchmark": "eval", "id": item, "category": cat, "difficulty": diff, "mode": mode,
            "correct": correct, "tokens": tokens, "thought": thought}


def preds(auto_thinks_on_hard: bool) -> list[dict]:
    """Two hard items (math/3) that only thinking solves, one easy math item and one perception item."""
    out = []
    for i in ("h1", "h2"):
        out += [row(i, "math", 3, "think", True, 40, True), row(i, "math", 3, "no_think", False, 2, False),
                row(i, "math", 3, "auto", auto_thinks_on_hard, 40 if auto_thinks_on_hard else 2, auto_thinks_on_hard)]
    for i, cat, diff, thinks in (("e1", "math", 1, False), ("p1", "perception", 1, True)):
        out += [row(i, cat, diff, "think", True, 20, True), row(i, cat, diff, "no_think", True, 2, False),
                row(i, cat, diff, "auto", True, 20 if thinks else 2, thinks)]
    return out


def test_story_rows_before_and_after_bpo_hand_computed():
    story = {r["metric"]: (r["before"], r["after"]) for r in paper_story(build_report(preds(False)),
                                                                          build_report(preds(True)))}
    assert story["auto accuracy, hardest math (math/3)"] == (0.0, 1.0)
    assert story["forced-think accuracy, math/3"] == (1.0, 1.0)
    assert story["forced-no-think accuracy, math/3"] == (0.0, 0.0)
    assert story["auto think-rate, math/3"] == (0.0, 1.0)
    # the easy items: auto does not think on math/1 and does on perception/1
    assert story["auto think-rate, easiest math (math/1)"] == (0.0, 0.0)
    assert story["auto think-rate, perception (every level)"] == (1.0, 1.0)
    # auto tokens (2+2+2+20)/4 = 6.5 before, (40+40+2+20)/4 = 25.5 after; forced think (40+40+20+20)/4 = 30
    before, after = story["auto tokens / forced-think tokens, whole eval"]
    assert before == pytest.approx(6.5 / 30) and after == pytest.approx(25.5 / 30)


def test_story_is_empty_without_math_cells():
    perception_only = [r for r in preds(False) if r["category"] == "perception"]
    assert paper_story(build_report(perception_only), build_report(perception_only)) == []
