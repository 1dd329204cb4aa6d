"""The thinking-budget sweep of `r4b eval` without a model: the report's `budget_sweep` on hand-made
rows (numbers worked out in the comments), its table, plot and headline keys, the config field and
the CLI flag, and the stage identity that must change with the budgets. The sweep run on a real
tiny model: tests/integration/test_curate_eval_run.py; both engines under a budget:
tests/unit/test_rollout_hf.py and tests/integration/test_thinking_budget_engines.py."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from r4b_core import evaluate, report
from r4b_core.config import ConfigError, RunConfig, load_config


def row(item, mode, correct, tokens, reasoning, thought, budget=None, closed=False):
    r = {"benchmark": "eval", "id": item, "category": "math", "difficulty": 1, "mode": mode, "correct": correct,
         "tokens": tokens, "reasoning_tokens": reasoning, "thought": thought}
    if budget is not None:
        r.update(budget=budget, budget_closed=closed)
    return r


PLAIN = [
    row("A", "auto", True, 30, 20, True), row("B", "auto", False, 5, 0, False),
    row("A", "think", True, 40, 30, True), row("B", "think", True, 50, 40, True),
    row("A", "no_think", False, 3, 0, False), row("B", "no_think", False, 4, 0, False),   # not swept
]
SWEPT = [
    # budget 0: the no-think prompt in both modes (no_think's answers)
    row("A", "auto", False, 3, 0, False, 0), row("B", "auto", False, 4, 0, False, 0),
    row("A", "think", False, 3, 0, False, 0), row("B", "think", False, 4, 0, False, 0),
    # budget 8: A's auto reasoning cut at 8; B answered directly; think: A cut at 7 (its 8th token
    # was THINK_END's "\n", which the closing string goes on from), B cut at 8
    row("A", "auto", True, 15, 8, True, 8, True), row("B", "auto", False, 5, 0, False, 8),
    row("A", "think", False, 14, 7, True, 8, True), row("B", "think", True, 18, 8, True, 8, True),
]


def test_budget_sweep_hand_computed():
    sweep = evaluate.budget_sweep(PLAIN, SWEPT, [8, 0, 8])
    assert sweep["budgets"] == [0, 8] and sweep["modes"] == ["auto", "think"]
    assert sweep["unbudgeted"] == {
        "auto": {"n": 2, "accuracy": 0.5, "mean_tokens": 17.5, "mean_reasoning_tokens": 10.0, "think_rate": 0.5,
                 "closed_by_budget": 0.0},
        "think": {"n": 2, "accuracy": 1.0, "mean_tokens": 45.0, "mean_reasoning_tokens": 35.0, "think_rate": 1.0,
                  "closed_by_budget": 0.0}}
    zero = {"n": 2, "accuracy": 0.0, "mean_tokens": 3.5, "mean_reasoning_tokens": 0.0, "think_rate": 0.0,
            "closed_by_budget": 0.0}
    assert sweep["by_budget"]["0"] == {"auto": zero, "think": zero}
    assert sweep["by_budget"]["8"] == {
        "auto": {"n": 2, "accuracy": 0.5, "mean_tokens": 10.0, "mean_reasoning_tokens": 4.0, "think_rate": 0.5,
                 "closed_by_budget": 0.5},
        "think": {"n": 2, "accuracy": 0.5, "mean_tokens": 16.0, "mean_reasoning_tokens": 7.5, "think_rate": 1.0,
                  "closed_by_budget": 1.0}}
    # an eval of think and no-think mode only sweeps think
    only_think = evaluate.budget_sweep([r for r in PLAIN if r["mode"] != "auto"],
                                       [r for r in SWEPT if r["mode"] == "think"], [0, 8])
    assert only_think["modes"] == ["think"] and set(only_think["by_budget"]["8"]) == {"think"}


def _report(tag="t"):
    rep = evaluate.build_report(PLAIN)
    rep.update(tag=tag, model="m", budget_sweep=evaluate.budget_sweep(PLAIN, SWEPT, [0, 8]))
    return rep


def test_sweep_reaches_the_table_the_plot_and_the_headline(tmp_path):
    rep = _report()
    files = report.write_report(rep, tmp_path)
    assert sorted(f.name for f in files) == sorted(["report.md", *report.PLOTS, report.BUDGET_PLOT])
    assert (tmp_path / report.BUDGET_PLOT).stat().st_size > 5_000
    md = (tmp_path / "report.md").read_text()
    assert "## Thinking budget" in md and f"({report.BUDGET_PLOT})" in md
    assert "| t | none | think | 1.000 | 45.0 | 35.0 | 1.00 | – |" in md
    assert "| t | 0 | auto | 0.000 | 3.5 | 0.0 | 0.00 | 0.00 |" in md
    assert "| t | 8 | think | 0.500 | 16.0 | 7.5 | 1.00 | 1.00 |" in md
    h = evaluate.headline(rep)
    assert h["auto/budget_8/accuracy"] == 0.5 and h["think/budget_8/mean_reasoning_tokens"] == 7.5
    assert h["think/budget_0/accuracy"] == 0.0
    # without a sweep: no table, no plot
    plain = tmp_path / "plain"
    report.write_report(evaluate.build_report(PLAIN) | {"tag": "t"}, plain)
    assert "Thinking budget" not in (plain / "report.md").read_text() and not (plain / report.BUDGET_PLOT).exists()
    # a compared model's sweep: its rows in the table, its lines in the plot
    both = _report("bpo") | {"compare": _report("anneal") | {"tag": "anneal"}}
    report.write_report(both, tmp_path / "both")
    md = (tmp_path / "both" / "report.md").read_text()
    assert "| anneal | 8 | auto | 0.500 |" in md and "| bpo | 8 | auto | 0.500 |" in md
    assert (tmp_path / "both" / report.BUDGET_PLOT).read_bytes() != (tmp_path / report.BUDGET_PLOT).read_bytes()


def test_the_budgets_are_part_of_the_stage_identity(tmp_path):
    from r4b_core.identity import identity_hash
    from r4b_core.storage import Store

    def ident(budgets):
        cfg = RunConfig.model_validate({"storage": {"root": str(tmp_path)}, "eval": {"thinking_budgets": budgets}})
        return identity_hash(evaluate.eval_identity(cfg, Store.from_config(cfg.storage), "org/model", {"eval": "x"},
                                                    "t", None, False))

    assert ident([]) != ident([0, 16]) != ident([0, 16, 64])
    assert ident([16, 0, 16]) == ident([0, 16])          # the same sweep, however it is written


def test_config_field_and_cli_flag(tmp_path):
    from r4b_core import cli

    assert RunConfig.model_validate({"eval": {"thinking_budgets": [64, 0, 16]}}).eval.thinking_budgets == [0, 16, 64]
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  modes: [no_think]\n  thinking_budgets: [0, -4]\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert str(err.value).endswith("c.yaml:3: eval.thinking_budgets: thinking budgets are numbers of reasoning "
                                   "tokens >= 0, e.g. [0, 16, 64] (got [0, -4])")
    path.write_text("eval:\n  modes: [no_think]\n  thinking_budgets: [16]\n")
    with pytest.raises(ConfigError, match=r"thinking_budgets \[16\] apply to auto and think mode, and modes is "
                                          r"\['no_think'\]; add one of them"):
        load_config(str(path))
    assert cli._budget_list("0, 16,64") == "eval.thinking_budgets=[0,16,64]"
    for bad in ("16,x", "-4", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="e.g. --thinking-budget 0,16,64"):
            cli._budget_list(bad)
    done = subprocess.run([sys.executable, "-m", "r4b_core.cli", "eval", "--thinking-budget", "8,many"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "argument --thinking-budget: '8,many': give numbers of reasoning tokens" in done.stderr
