"""The toy-scale reproduction (r4b_core/repro.py).

* slow: a shortened `r4b repro` (one seed, no GRPO control, no ablation, fewer steps) through the
  real CLI on the real tiny model, asserting the DIRECTION of claims 2 and 3: after BPO, auto-mode
  accuracy on hard math rises, and auto mode thinks more on hard math while it stays low on
  perception.
* fast: the claim arithmetic on hand-made summaries (each threshold on both sides), the combined
  report and its plots/markdown, and the CLI's one-line errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r4b_core import repro
from r4b_core.config import load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "repro.yaml"

# What the shortened run changes against configs/repro.yaml (the full run is `r4b repro`).
SHORT = ["repro.grpo_control=false", "repro.mode_token_ablation=false", "repro.jobs=1"]


def _run_cli(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "r4b_core.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(5400)
def test_shortened_repro_moves_hard_math_and_thinks_by_content(tmp_path):
    sets = [f"storage.root={tmp_path / 'runs'}", *SHORT]
    proc = _run_cli(["repro", "--config", str(CONFIG), "--seeds", "0", *sum((["--set", s] for s in sets), [])],
                    REPO, timeout=5000)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs" / "repro" / "repro"
    report = json.loads((out / "report.json").read_text())
    for plot in repro.PLOTS:
        assert (out / plot).stat().st_size > 5_000, plot
    assert "## Claims" in (out / "report.md").read_text()

    c2 = report["claims"]["2_recovery"]["per_seed"]["0"]
    c3 = report["claims"]["3_think_by_content"]["per_seed"]["0"]
    # claim 2, direction: BPO's auto mode answers hard math better than the annealed model's
    assert c2["auto"] >= c2["annealed_auto"] + 5.0, c2
    # claim 3, direction: it gets there by thinking on hard math, and perception stays direct
    assert c3["hard_math_think_rate"] >= c3["annealed_hard_math_think_rate"] + 0.3, c3
    assert c3["perception_think_rate"] <= 0.2, c3
    # the BPO curve the plots come from was recorded
    curve = report["per_seed"]["0"]["curves"]["bpo"]
    assert len(curve) == report["hyperparameters"]["bpo"]["steps"]
    assert any("probe/hard_math/think_rate" in h for h in curve)


# --- fast: the claim arithmetic ---------------------------------------------------------------
def _modes(auto, think, no_think, tr=0.0, tokens=(10.0, 40.0, 5.0)):
    return {"auto": {"accuracy": auto, "think_rate": tr, "mean_tokens": tokens[0]},
            "think": {"accuracy": think, "think_rate": 1.0, "mean_tokens": tokens[1]},
            "no_think": {"accuracy": no_think, "think_rate": 0.0, "mean_tokens": tokens[2]}}


def _eval(hard, perception_tr=0.0, tokens=(10.0, 40.0, 5.0)):
    return {"modes": _modes(0.5, 0.6, 0.4, tokens=tokens), "hybrid_accuracy": 0.9,
            "by_category": {"perception": _modes(0.9, 0.5, 0.9, tr=perception_tr), "math": _modes(0.4, 0.6, 0.2)},
            "cells": {"math/3": hard, "perception/1": _modes(0.9, 0.5, 0.9, tr=perception_tr)}}


def _summary(anneal_hard, bpo_hard, perception_tr=0.05, grpo_share=(0.5, 0.3, 0.05, 0.04, 0.02), tokens=None):
    s = {"seed": 0, "hard_difficulty": 3, "annealed_p_think": {"math/3": 0.1, "perception/1": 0.9},
         "evals": {"anneal": _eval(anneal_hard), "bpo": _eval(bpo_hard, perception_tr, tokens or (10.0, 40.0, 5.0))},
         "curves": {"bpo": [{"step": i + 1, "rollouts/think": 32.0, "rollouts/no_think": 32.0,
                             "accuracy/think": 0.5 + 0.05 * i, "probe/hard_math/think_rate": 0.2 * i} for i in range(5)],
                    "grpo": [{"step": i + 1, "rollouts/no_think_share": v, "probe/perception/think_rate": 0.1}
                             for i, v in enumerate(grpo_share)]},
         "variants": {"bpo": {"mode_token_trainable": True}}}
    s["claims"] = repro.seed_claims(s)
    return s


def test_claims_pass_on_the_papers_pattern():
    s = _summary(_modes(0.20, 0.60, 0.18, tr=0.1), _modes(0.62, 0.63, 0.20, tr=0.9))
    c = s["claims"]
    assert c["0_thinking_usable"]["pass"] and c["0_thinking_usable"]["think_minus_no_think"] == 42.0
    assert c["1_atrophy"]["pass"] and c["1_atrophy"]["think_minus_auto"] == 40.0
    assert c["2_recovery"]["pass"] and c["2_recovery"]["gain_over_annealed"] == 42.0
    assert c["3_think_by_content"]["pass"]
    assert c["4_efficiency"]["pass"] and c["4_efficiency"]["auto_over_think"] == 0.25
    assert c["5_grpo_collapse"]["pass"] and c["5_grpo_collapse"]["grpo_collapsed_to"] == "think"
    assert c["5_grpo_collapse"]["bpo_rollout_think_share"] == 0.5


@pytest.mark.parametrize("anneal_hard, bpo_hard, perception_tr, grpo, tokens, failing", [
    # auto 7 points above no-think: no atrophy
    (_modes(0.25, 0.60, 0.18), _modes(0.62, 0.63, 0.2, tr=0.9), 0.05, None, None, "1_atrophy"),
    # BPO auto 3 points under forced think
    (_modes(0.20, 0.60, 0.18), _modes(0.60, 0.63, 0.2, tr=0.9), 0.05, None, None, "2_recovery"),
    # hard-math think-rate 0.75 < 0.8
    (_modes(0.20, 0.60, 0.18), _modes(0.62, 0.63, 0.2, tr=0.75), 0.05, None, None, "3_think_by_content"),
    # perception think-rate 0.25 > 0.2
    (_modes(0.20, 0.60, 0.18), _modes(0.62, 0.63, 0.2, tr=0.9), 0.25, None, None, "3_think_by_content"),
    # auto tokens 0.7 x think
    (_modes(0.20, 0.60, 0.18), _modes(0.62, 0.63, 0.2, tr=0.9), 0.05, None, (28.0, 40.0, 5.0), "4_efficiency"),
    # GRPO keeps 30 % non-thinking rollouts: no collapse
    (_modes(0.20, 0.60, 0.18), _modes(0.62, 0.63, 0.2, tr=0.9), 0.05, (0.5, 0.4, 0.3, 0.3, 0.3), None,
     "5_grpo_collapse"),
])
def test_each_claim_fails_on_its_own_threshold(anneal_hard, bpo_hard, perception_tr, grpo, tokens, failing):
    kw = {"grpo_share": grpo} if grpo else {}
    c = _summary(anneal_hard, bpo_hard, perception_tr, tokens=tokens, **kw)["claims"]
    assert c[failing]["pass"] is False, c[failing]
    assert [k for k, v in c.items() if v.get("pass") is False] == [failing]


def test_thinking_that_does_not_help_before_bpo_is_said_and_fails_atrophy():
    # forced thinking only 12 points better than no-think: the precondition and claim 1 fail
    s = _summary(_modes(0.20, 0.30, 0.18), _modes(0.62, 0.63, 0.2, tr=0.9))
    c = s["claims"]
    assert c["0_thinking_usable"]["pass"] is False and c["0_thinking_usable"]["think_minus_no_think"] == 12.0
    assert c["1_atrophy"]["pass"] is False and c["2_recovery"]["pass"] is True
    report = {"claims": repro.combine_claims([s, {**_summary(_modes(0.2, 0.6, 0.18), _modes(0.62, 0.63, 0.2, tr=0.9)),
                                                  "seed": 1}])}
    lines = repro._precondition_lines(report)
    assert "seed 0: **before BPO the annealed model cannot use thinking on hard math** (forced think 30.0 vs " \
           "no-think 18.0 points" in lines[0]
    assert lines[1].startswith("- seed 1: before BPO, forced thinking beats answering directly")


def test_spread_over_seeds_is_min_max_mean_of_each_number():
    sp = repro.spread([{"auto": 20.0, "cell": "math/4", "pass": True, "share": 0.5}, None,
                       {"auto": 30.0, "pass": False, "share": 0.7}])
    assert sp == {"auto": {"min": 20.0, "max": 30.0, "mean": 25.0}, "share": {"min": 0.5, "max": 0.7, "mean": 0.6}}
    claims = repro.combine_claims([_summary(_modes(0.2, 0.6, 0.18), _modes(0.62, 0.63, 0.2, tr=0.9)),
                                   {**_summary(_modes(0.1, 0.7, 0.08), _modes(0.72, 0.73, 0.2, tr=0.9)), "seed": 1}])
    assert claims["1_atrophy"]["spread"]["think"] == {"min": 60.0, "max": 70.0, "mean": 65.0}
    assert repro._spread_text(claims["1_atrophy"]["spread"]).startswith("auto 10–20, think 60–70")


def test_grpo_collapse_to_no_think_counts_and_uses_the_tail_mean():
    s = _summary(_modes(0.2, 0.6, 0.18), _modes(0.62, 0.63, 0.2, tr=0.9), grpo_share=(0.3, 0.9, 0.95, 0.97, 0.99))
    c5 = s["claims"]["5_grpo_collapse"]
    assert c5["grpo_collapsed_to"] == "no_think" and c5["pass"]
    assert c5["grpo_no_think_share_final"] == pytest.approx((0.95 + 0.97 + 0.99) / 3, abs=1e-3)
    assert c5["grpo_no_think_share_first"] == 0.3


def test_combined_report_needs_every_seed_and_writes_plots(tmp_path):
    good = _summary(_modes(0.20, 0.60, 0.18), _modes(0.62, 0.63, 0.2, tr=0.9))
    bad = {**_summary(_modes(0.30, 0.60, 0.18), _modes(0.62, 0.63, 0.2, tr=0.9)), "seed": 1}
    claims = repro.combine_claims([good, bad])
    assert claims["1_atrophy"]["pass"] is False and claims["2_recovery"]["pass"] is True
    assert set(claims["1_atrophy"]["per_seed"]) == {"0", "1"}

    for s in (good, bad):
        s.update(run_uri="x", timing={"wall_s": 1.0, "cpu_s": 1.0, "phases": {"anneal": {"wall_s": 1.0, "cpu_s": 1.0}}})
    cfg = load_config(CONFIG)
    report = {"name": "t", "seeds": [0, 1], "hard_difficulty": 3, "claims": claims,
              "hyperparameters": repro.hyperparameters(cfg),
              "timing": {"wall_s": 2.0, "cpu_s": 2.0, "jobs": 1, "cpu_count": 2, "loadavg_1m_start": 1.0,
                         "loadavg_1m_end": 1.0, "per_seed": {"0": good["timing"], "1": bad["timing"]}},
              "per_seed": {"0": good, "1": bad}}
    from r4b_core.storage import Store

    repro.write_report(Store.from_config(cfg.storage), str(tmp_path / "out"), report)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| 1 atrophy" in md and "FAIL" in md and "PASS" in md
    assert "**4/5 claims reproduce on every seed** (0, 1)" in md
    assert "| 0 | 0.100 | 0.900 |" in md                       # annealed p(think) per cell
    assert json.loads((tmp_path / "out" / "report.json").read_text())["claims"]["1_atrophy"]["pass"] is False
    for plot in repro.PLOTS:
        assert (tmp_path / "out" / plot).stat().st_size > 5_000, plot
    assert "FAIL" in repro.format_claims(report)


def test_seed_runs_do_not_collide_and_variants_flip_one_knob():
    cfg = load_config(CONFIG)
    a, b = repro.seed_config(cfg, 0), repro.seed_config(cfg, 1)
    assert a.run_uri() != b.run_uri() and a.data.synthetic.seed == 0 and b.seed == 1
    assert cfg.name == "repro" and cfg.seed == 0            # the given config is left alone
    g = repro.variant_config(a, "grpo")
    assert g.bpo.algorithm == "grpo" and g.bpo.mode_token_trainable == a.bpo.mode_token_trainable
    ab = repro.variant_config(a, "bpo-ablation")
    assert ab.bpo.mode_token_trainable is not a.bpo.mode_token_trainable and ab.bpo.algorithm == "bpo"
    assert repro.variants(cfg) == ["bpo", "grpo", "bpo-ablation"]


def test_cli_errors_are_one_line(tmp_path):
    proc = _run_cli(["repro", "--config", str(CONFIG), "--seeds", "0,x"], tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: --seeds '0,x': expected comma-separated integers, e.g. --seeds 0,1"]
    proc = _run_cli(["repro", "--config", str(CONFIG), "--set", "repro.hard_difficulty=5"], tmp_path, timeout=120)
    assert proc.returncode == 2 and "repro.hard_difficulty=5" in proc.stderr and "Traceback" not in proc.stderr


def test_mechanism_table_and_figure_from_hand_made_arms(tmp_path):
    def arm(share, p, bpo, grpo):
        ev = {"anneal": _eval(_modes(0.2, 0.7, 0.2, tr=0.0)), "bpo": _eval(_modes(bpo, 0.7, 0.2, tr=0.95)),
              "grpo": _eval(_modes(grpo, 0.7, 0.2, tr=1.0 if grpo > 0.5 else 0.0))}
        return {"curate": {"reasoning_share_by_cell": {"math/3": share}}, "annealed_p_think": {"math/3": p},
                "evals": ev, "curves": {"grpo": [{"step": 1, "rollouts/no_think_share": 0.5 if grpo > 0.5 else 0.97}]}}

    mech = {"seed": 0, "hard_difficulty": 3, "arms": {"common": arm(0.6, 0.55, 0.7, 0.7),
                                                      "very_rare": arm(0.05, 0.02, 0.68, 0.2)}}
    mech["points"] = repro.mechanism_points(mech)
    assert mech["points"]["very_rare"] == {
        "reasoning_share": 0.05, "annealed_p_think": 0.02, "annealed_think_rate": 0.0, "annealed_auto_accuracy": 0.2,
        "annealed_think_accuracy": 0.7, "bpo_accuracy": 0.68, "bpo_think_rate": 0.95, "grpo_accuracy": 0.2,
        "grpo_think_rate": 0.0, "grpo_no_think_share_final": 0.97}
    md = repro.render_mechanism(mech)
    assert "| very_rare | 0.050 | 0.020 | 0.700 | 0.200 | 0.680 | 0.950 | 0.200 | 0.000 | 0.970 |" in md
    fig = repro._mechanism_figure(repro._plt(), mech)
    png = repro._save(fig, tmp_path / "mechanism.png", repro._plt())
    assert png.stat().st_size > 5_000
