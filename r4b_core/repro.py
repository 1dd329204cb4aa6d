"""The toy-scale reproduction of R-4B's claims: thinking atrophy, BPO recovery, GRPO collapse.

    r4b repro --config configs/repro.yaml --seeds 0,1,2      # seeds default to repro.seeds
    r4b repro --config configs/repro.yaml --mechanism        # BPO vs GRPO per annotator strength
    from r4b_core.repro import run_repro                     # run_repro(cfg) -> report dict

Per seed s (its own run `<name>-s<s>`, so stages never collide; data, model init and sampling all
follow the seed) it calls the stage functions in this process, no KFP:

    prepare -> curate -> anneal -> eval(anneal), p(think) per cell -> BPO -> eval(bpo)
            -> GRPO control from the same annealed model -> eval(grpo)          (repro.grpo_control)
            -> BPO with bpo.mode_token_trainable flipped -> eval(bpo-ablation)  (repro.mode_token_ablation)

configs/repro.yaml switches on the two stand-ins the toy scale needs (docs/reproduction.md has the
measurements behind them): a pretrained tiny base (`model.pretrain`, r4b_core/pretrain.py) and a
simulated strong annotator at curation (`curate.annotator: simulated`, curate.SimulatedAnnotator).

Every stage skips itself when its manifest matches, so a rerun only rebuilds the report. Seeds
run one after another, or `repro.jobs` at a time as child processes (`r4b repro --seed-only`).
Then `runs/<name>/repro/` gets `report.json` (every claim's figures and pass/fail per seed, their
spread over seeds, the hyperparameters, wall and CPU time), `report.md` and the plots, among them
the training curves of the paper's Figs 8-10; with `--mlflow` the report and plots go to MLflow too,
next to each RL run's per-step metrics. `--mechanism` trains, for the first seed, one arm per
annotator strength in `repro.mechanism` and plots BPO's and GRPO's final auto accuracy and
think-rate on hard math against the annealed p(think) (`runs/<name>/repro/mechanism/`).

The claims (issue 9, from RECIPE.md "What BPO should produce"); "hard math" is the highest math
difficulty (or `repro.hard_difficulty`), every figure is greedy eval accuracy on the eval split:

  0 precondition (not a claim) annealed model: forced think >= no-think + 15 points on hard math;
                when it fails the report says the seed has nothing to recover
  1 atrophy     annealed model: |auto - no_think| <= 5 points and auto <= think - 15 points (hard math)
  2 recovery    after BPO: auto >= think - 2 points, and auto >= annealed auto + 10 points (hard math)
  3 by content  after BPO: auto think-rate >= 80 % on hard math and <= 20 % on perception
  4 efficiency  after BPO: auto mean tokens over the whole eval <= 0.6 x forced-think's
  5 control     GRPO's rollouts collapse to one mode (non-thinking share, mean of the last
                `CURVE_TAIL` steps, < 10 % or > 90 %) while BPO's rollouts keep both modes
                >= 25 % (forced, 50/50 by construction; reported with the auto-mode mix BPO learned)
"""


from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from r4b_core import layout
from r4b_core.config import RunConfig, dump_config
from r4b_core.errors import R4BError

# Thresholds of the claims, as the issue states them (fractions, not points).
ATROPHY_AUTO_VS_NO_THINK = 0.05
ATROPHY_BELOW_THINK = 0.15
RECOVERY_BELOW_THINK = 0.02
RECOVERY_GAIN = 0.10
THINK_RATE_HARD_MIN = 0.80
THINK_RATE_PERCEPTION_MAX = 0.20
TOKEN_RATIO_MAX = 0.60
COLLAPSE_SHARE = 0.10
BPO_MODE_SHARE_MIN = 0.25
CURVE_TAIL = 3          # GRPO's mode share is the mean over its last logged steps (one is noisy)

PLOTS = ("accuracy_per_mode.png", "think_rate_by_difficulty.png", "training_curves.png", "tokens_per_mode.png")


class ReproError(R4BError):
    """The reproduction cannot run as configured; the message names the setting and the fix."""


# ---------------------------------------------------------------------------------------------
# Runs per seed
# ---------------------------------------------------------------------------------------------
def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The run of one seed: `<name>-s<seed>`, run seed and data seed both = seed; its base is the
    shared pretrained one when there is one (`shared_base`)."""
    out = cfg.model_copy(deep=True)
    out.name = f"{cfg.name}-s{seed}"
    out.seed = seed
    out.data.synthetic.seed = seed
    base = shared_base(cfg)
    if base is not None:
        out.model.base = layout.base_model_dir(base)
    return out


def shared_base(cfg: RunConfig) -> RunConfig | None:
    """The run that pretrains the one base every seed starts from (`<name>-base`, seeded with
    repro.base_seed), or None when each seed pretrains its own (or nothing is pretrained)."""
    if cfg.repro.base_seed is None or cfg.model.base != "tiny" or not cfg.model.pretrain.steps:
        return None
    out = cfg.model_copy(deep=True)
    out.name = f"{cfg.name}-base"
    out.seed = out.data.synthetic.seed = cfg.repro.base_seed
    return out


def prepare_base(cfg: RunConfig) -> str | None:
    """Data, tiny model and pretraining of the shared base (skipped when done); its model URI."""
    from r4b_core.prepare import run_prepare

    bcfg = shared_base(cfg)
    if bcfg is None:
        return None
    print(f"repro: shared base {bcfg.run_uri()} (seed {bcfg.seed}) ...", flush=True)
    return run_prepare(bcfg)["base_model"]


def variant_config(cfg: RunConfig, variant: str) -> RunConfig:
    """bpo (as configured), grpo (algorithm flipped), bpo-ablation (mode_token_trainable flipped)."""
    out = cfg.model_copy(deep=True)
    if variant == "grpo":
        out.bpo.algorithm = "grpo"
    elif variant == "bpo-ablation":
        out.bpo.mode_token_trainable = not cfg.bpo.mode_token_trainable
    elif variant != "bpo":
        raise ValueError(f"unknown variant {variant!r}")
    return out


def variants(cfg: RunConfig) -> list[str]:
    out = ["bpo"]
    if cfg.repro.grpo_control:
        out.append("grpo")
    if cfg.repro.mode_token_ablation:
        out.append("bpo-ablation")
    return out


def hard_level(cfg: RunConfig) -> int:
    levels = sorted(set(cfg.data.synthetic.difficulties))
    hard = cfg.repro.hard_difficulty or levels[-1]
    if hard not in levels:
        raise ReproError(f"repro.hard_difficulty={hard} is not among data.synthetic.difficulties {levels}; "
                         f"pick one of them or leave it null (the highest)")
    return hard


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (reward workers, seed processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class _Clock:
    """Wall and CPU seconds per named phase."""

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}

    def run(self, name: str, fn, *args, **kwargs):
        t, c = time.perf_counter(), _cpu_seconds()
        print(f"repro: {name} ...", flush=True)
        out = fn(*args, **kwargs)
        self.phases[name] = {"wall_s": round(time.perf_counter() - t, 1), "cpu_s": round(_cpu_seconds() - c, 1)}
        print(f"repro: {name} done in {self.phases[name]['wall_s']} s wall, {self.phases[name]['cpu_s']} s CPU",
              flush=True)
        return out


def _stage(cfg: RunConfig, arm: str | None, stage: str) -> str:
    """Where a stage of an arm writes: the run's own layout for the main arm, else under mechanism/<arm>/."""
    return layout.stage_dir(cfg, stage if arm is None else f"mechanism/{arm}/{stage}")


def annealed_p_think(model_uri: str, eval_uri: str, store) -> dict[str, float]:
    """The annealed model's mean probability of choosing to think in auto mode, per eval cell
    ("math/4"): the first token after `<think>` being the thinking prefix's (bpo.decision_probability).
    Greedy auto mode thinks only where this passes 1/2; plain GRPO samples thinking at this rate."""
    from r4b_core.bpo import PromptEncoder, decision_probability, load_prompts
    from r4b_core.models.loading import load_model

    model, processor = load_model(model_uri, store=store)
    prompts, _ = load_prompts(eval_uri, store)
    encoder = PromptEncoder(processor)
    cells: dict[str, list] = {}
    for p in prompts:
        cells.setdefault(f"{p.record.category}/{p.record.difficulty}", []).append(p)
    return {c: round(decision_probability(model, encoder, ps), 4) for c, ps in sorted(cells.items())}


def train_arm(scfg: RunConfig, inputs: dict, store, clock: _Clock, names: list[str], arm: str | None = None,
              tracker=None) -> dict:
    """curate -> anneal -> eval(anneal), then each variant in `names` (bpo, grpo, bpo-ablation) from
    the annealed model -> eval. `arm` None is the seed's main run; a mechanism arm writes under
    mechanism/<arm>/. Returns what the claims, plots and the mechanism figure need."""
    from r4b_core.anneal import run_anneal
    from r4b_core.bpo import run_bpo
    from r4b_core.curate import run_curate
    from r4b_core.evaluate import run_eval

    label = "" if arm is None else f"{arm}: "
    curated = _stage(scfg, arm, "curate") + "/sft.jsonl"
    curate_manifest = clock.run(f"{label}curate", run_curate, scfg, inputs["train"], curated, tracker=tracker)
    anneal_uri = _stage(scfg, arm, "anneal") + "/model"
    anneal_manifest = clock.run(f"{label}anneal", run_anneal, scfg, curated, inputs["base_model"], anneal_uri,
                                tracker=tracker)
    eval_dir = _stage(scfg, arm, "eval")
    reports = {"anneal": clock.run(f"{label}eval anneal", run_eval, scfg, anneal_uri, inputs["eval"],
                                   eval_dir + "/anneal", "anneal", tracker=tracker)}
    p_think = clock.run(f"{label}annealed p(think)", annealed_p_think, anneal_uri, inputs["eval"], store)
    manifests: dict[str, dict] = {}
    for v in names:
        vcfg = variant_config(scfg, v)
        out = _stage(scfg, arm, v) + "/model"
        manifests[v] = clock.run(f"{label}{v}", run_bpo, vcfg, inputs["rl"], anneal_uri, out, tracker=tracker)
        reports[v] = clock.run(f"{label}eval {v}", run_eval, vcfg, out, inputs["eval"], f"{eval_dir}/{v}", v,
                               tracker=tracker, compare=reports["anneal"])
    return {
        "curate": {"reasoning_ratio": curate_manifest["stats"]["reasoning_ratio"],
                   "annotator": scfg.curate.annotator,
                   "simulated_accuracy": scfg.curate.simulated_accuracy if scfg.curate.annotator == "simulated"
                   else None,
                   "reasoning_share_by_cell": reasoning_shares(store.read_text(curated)),
                   "by_category": {c: {k: d[k] for k in ("items", "reasoning", "reasoning_ratio", "pass_hist")}
                                   for c, d in curate_manifest["stats"]["by_category"].items()}},
        "anneal": {"metrics": anneal_manifest.get("metrics"), "data": {k: anneal_manifest.get("data", {}).get(k)
                                                                        for k in ("used", "think", "direct",
                                                                                  "reasoning_ratio")}},
        "annealed_p_think": p_think,
        "evals": {tag: _eval_block(rep) for tag, rep in reports.items()},
        "curves": {v: m.get("history", []) for v, m in manifests.items()},
        "variants": {v: {"mode_token_trainable": variant_config(scfg, v).bpo.mode_token_trainable,
                         "algorithm": variant_config(scfg, v).bpo.algorithm,
                         "wall_time_s": m.get("wall_time_s"), "skipped": bool(m.get("skipped"))}
                     for v, m in manifests.items()},
    }


def _start(cfg: RunConfig, seed: int):
    """The seed's config, store, clock and prepared inputs (data, pretrained base)."""
    from r4b_core.prepare import run_prepare
    from r4b_core.storage import Store

    scfg = seed_config(cfg, seed)
    if scfg.repro.threads:
        import torch

        torch.set_num_threads(scfg.repro.threads)
    store = Store.from_config(scfg.storage)
    clock = _Clock()
    clock.run("shared base", prepare_base, cfg)
    inputs = clock.run("prepare", run_prepare, scfg, store)
    return scfg, store, clock, inputs


def run_seed(cfg: RunConfig, seed: int, tracker=None) -> dict:
    """All stages of one seed; returns the seed's summary (also written to <run>/repro_seed.json)."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    scfg, store, clock, inputs = _start(cfg, seed)
    summary = {"seed": seed, "run": scfg.name, "run_uri": scfg.run_uri(), "hard_difficulty": hard_level(scfg),
               **train_arm(scfg, inputs, store, clock, variants(scfg), tracker=tracker)}
    summary["timing"] = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(_cpu_seconds() - c0, 1),
                         "phases": clock.phases}
    summary["claims"] = seed_claims(summary)
    store.write_text(store.join(scfg.run_uri(), "repro_seed.json"), json.dumps(summary, indent=1))
    return summary


def arm_accuracy(cfg: RunConfig, arm: str) -> dict[str, float]:
    """A mechanism arm's simulated annotator: curate.simulated_accuracy with the arm's overrides."""
    return {**cfg.curate.simulated_accuracy, **cfg.repro.mechanism[arm]}


def run_mechanism(cfg: RunConfig, seed: int, tracker=None) -> dict:
    """The mechanism figure's runs for one seed: per annotator strength (repro.mechanism), BPO and
    plain GRPO from the annealed model. An arm equal to the main config reuses the seed's main run."""
    if cfg.curate.annotator != "simulated" or not cfg.repro.mechanism:
        raise ReproError("the mechanism figure varies the simulated annotator: set curate.annotator: simulated "
                         "and repro.mechanism (arm name -> curate.simulated_accuracy overrides, e.g. "
                         "common: {math/4: 0.05})")
    t0, c0 = time.perf_counter(), _cpu_seconds()
    scfg, store, clock, inputs = _start(cfg, seed)
    arms = {}
    for arm in cfg.repro.mechanism:
        acfg = scfg.model_copy(deep=True)
        acfg.curate.simulated_accuracy = arm_accuracy(scfg, arm)
        same = acfg.curate.simulated_accuracy == scfg.curate.simulated_accuracy
        arms[arm] = train_arm(acfg, inputs, store, clock, ["bpo", "grpo"], None if same else arm, tracker=tracker)
        arms[arm]["simulated_accuracy"] = acfg.curate.simulated_accuracy
    out = {"seed": seed, "run_uri": scfg.run_uri(), "hard_difficulty": hard_level(scfg), "arms": arms,
           "timing": {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(_cpu_seconds() - c0, 1),
                      "phases": clock.phases}}
    out["points"] = mechanism_points(out)
    return out


def mechanism_points(mech: dict) -> dict[str, dict]:
    """Per arm: annealed p(think) and greedy think-rate on hard math, and each algorithm's final auto
    accuracy and think-rate there: the figure's coordinates."""
    hard = f"math/{mech['hard_difficulty']}"
    pts = {}
    for arm, a in mech["arms"].items():
        cell = lambda tag, k: (((a["evals"].get(tag) or {}).get("cells", {}).get(hard) or {}).get("auto") or {}).get(k)  # noqa: E731
        pts[arm] = {"reasoning_share": a["curate"]["reasoning_share_by_cell"].get(hard),
                    "annealed_p_think": a["annealed_p_think"].get(hard),
                    "annealed_think_rate": cell("anneal", "think_rate"),
                    "annealed_auto_accuracy": cell("anneal", "accuracy"),
                    "annealed_think_accuracy": _acc(a["evals"]["anneal"], hard, "think"),
                    **{f"{v}_{k}": cell(v, k) for v in ("bpo", "grpo") for k in ("accuracy", "think_rate")},
                    "grpo_no_think_share_final": _tail_mean(a["curves"].get("grpo") or [],
                                                            "rollouts/no_think_share")}
    return pts


def reasoning_shares(sft_text: str) -> dict[str, float]:
    """Share of curated records labelled reasoning per "category/difficulty": the statistic that
    decides whether the annealed model's auto mode can tell when to think."""
    from r4b_core.data.schema import jsonl_lines

    counts: dict[str, list[int]] = {}
    for _, line in jsonl_lines(sft_text):
        r = json.loads(line)
        c = counts.setdefault(f"{r.get('category')}/{r.get('difficulty')}", [0, 0])
        c[0] += r.get("label") == "reasoning"
        c[1] += 1
    return {k: round(a / n, 3) for k, (a, n) in sorted(counts.items())}


def _eval_block(report: dict) -> dict:
    """What the claims and plots need from an eval report."""
    keep = ("accuracy", "mean_tokens", "think_rate", "n")
    def modes(block: dict) -> dict:
        return {m: {k: d.get(k) for k in keep} for m, d in block.get("modes", {}).items()}
    return {"modes": modes(report), "hybrid_accuracy": report.get("hybrid_accuracy"),
            "by_category": {c: modes(b) for c, b in report.get("by_category", {}).items()},
            "cells": {c: modes(b) for c, b in report.get("cells", {}).items()}}


# ---------------------------------------------------------------------------------------------
# Claims
# ---------------------------------------------------------------------------------------------
def _acc(block: dict, cell: str, mode: str) -> float | None:
    return ((block.get("cells", {}).get(cell) or {}).get(mode) or {}).get("accuracy")


def _pt(x: float | None) -> float | None:
    """A fraction as points, rounded for the report."""
    return None if x is None else round(100 * x, 1)


def _tail_mean(history: list[dict], key: str, n: int = CURVE_TAIL) -> float | None:
    vals = [h[key] for h in history if key in h]
    return sum(vals[-n:]) / len(vals[-n:]) if vals else None


def seed_claims(s: dict) -> dict[str, dict]:
    """Each claim's figures (points / fractions) and pass/fail for one seed's summary."""
    hard = f"math/{s['hard_difficulty']}"
    ev = s["evals"]
    out: dict[str, dict] = {}
    a = ev["anneal"]
    auto, think, nothink = (_acc(a, hard, m) for m in ("auto", "think", "no_think"))
    ok = None not in (auto, think, nothink)
    # Not a claim: what claims 1-2 presuppose. If forced thinking does not beat answering directly on
    # hard math before BPO, there is nothing for auto mode to recover, whatever the seed's verdicts.
    out["0_thinking_usable"] = {
        "cell": hard, "think": _pt(think), "no_think": _pt(nothink),
        "think_minus_no_think": _pt(think - nothink) if ok else None,
        "annealed_p_think": (s.get("annealed_p_think") or {}).get(hard),
        "pass": ok and think >= nothink + ATROPHY_BELOW_THINK - 1e-9,
    }
    out["1_atrophy"] = {
        "cell": hard, "auto": _pt(auto), "think": _pt(think), "no_think": _pt(nothink),
        "auto_minus_no_think": _pt(auto - nothink) if ok else None,
        "think_minus_auto": _pt(think - auto) if ok else None,
        "pass": ok and abs(auto - nothink) <= ATROPHY_AUTO_VS_NO_THINK + 1e-9
        and auto <= think - ATROPHY_BELOW_THINK + 1e-9,
    }
    b = ev.get("bpo")
    if b is not None:
        b_auto, b_think = _acc(b, hard, "auto"), _acc(b, hard, "think")
        ok = None not in (b_auto, b_think, auto)
        out["2_recovery"] = {
            "cell": hard, "auto": _pt(b_auto), "think": _pt(b_think), "annealed_auto": _pt(auto),
            "think_minus_auto": _pt(b_think - b_auto) if ok else None,
            "gain_over_annealed": _pt(b_auto - auto) if ok else None,
            "pass": ok and b_auto >= b_think - RECOVERY_BELOW_THINK - 1e-9 and b_auto >= auto + RECOVERY_GAIN - 1e-9,
        }
        tr_hard = ((b["cells"].get(hard) or {}).get("auto") or {}).get("think_rate")
        tr_perc = ((b["by_category"].get("perception") or {}).get("auto") or {}).get("think_rate")
        tr_hard0 = ((a["cells"].get(hard) or {}).get("auto") or {}).get("think_rate")
        tr_perc0 = ((a["by_category"].get("perception") or {}).get("auto") or {}).get("think_rate")
        out["3_think_by_content"] = {
            "hard_math_think_rate": tr_hard, "perception_think_rate": tr_perc,
            "annealed_hard_math_think_rate": tr_hard0, "annealed_perception_think_rate": tr_perc0,
            "pass": None not in (tr_hard, tr_perc) and tr_hard >= THINK_RATE_HARD_MIN - 1e-9
            and tr_perc <= THINK_RATE_PERCEPTION_MAX + 1e-9,
        }
        tok = {m: (b["modes"].get(m) or {}).get("mean_tokens") for m in ("auto", "think", "no_think")}
        ratio = tok["auto"] / tok["think"] if tok["auto"] is not None and tok["think"] else None
        out["4_efficiency"] = {
            "auto_tokens": tok["auto"], "think_tokens": tok["think"], "no_think_tokens": tok["no_think"],
            "auto_over_think": None if ratio is None else round(ratio, 3),
            "accuracy": {m: _pt((b["modes"].get(m) or {}).get("accuracy")) for m in ("auto", "think", "no_think")},
            "pass": ratio is not None and ratio <= TOKEN_RATIO_MAX + 1e-9,
        }
    g = s["curves"].get("grpo")
    if g:
        share = _tail_mean(g, "rollouts/no_think_share")
        first = next((h["rollouts/no_think_share"] for h in g if "rollouts/no_think_share" in h), None)
        bh = s["curves"].get("bpo") or []
        n_think = sum(h.get("rollouts/think", 0.0) for h in bh)
        n_no = sum(h.get("rollouts/no_think", 0.0) for h in bh)
        bpo_think_share = n_think / (n_think + n_no) if n_think + n_no else None
        b_auto_tr = ((b or {}).get("modes", {}).get("auto") or {}).get("think_rate")
        collapsed = share is not None and (share < COLLAPSE_SHARE or share > 1 - COLLAPSE_SHARE)
        bpo_mixed = bpo_think_share is not None and min(bpo_think_share, 1 - bpo_think_share) >= BPO_MODE_SHARE_MIN
        out["5_grpo_collapse"] = {
            "grpo_no_think_share_first": first, "grpo_no_think_share_final": None if share is None else round(share, 3),
            "grpo_collapsed_to": None if not collapsed else ("think" if share < COLLAPSE_SHARE else "no_think"),
            "bpo_rollout_think_share": None if bpo_think_share is None else round(bpo_think_share, 3),
            "bpo_auto_think_rate_eval": b_auto_tr,
            "pass": collapsed and bpo_mixed,
        }
    ab = ev.get("bpo-ablation")
    if ab is not None and b is not None:
        out["ablation_mode_token"] = {
            "mode_token_trainable": {"bpo": s["variants"]["bpo"]["mode_token_trainable"],
                                     "bpo-ablation": s["variants"]["bpo-ablation"]["mode_token_trainable"]},
            **{f"{tag}_{k}": v for tag, blk in (("bpo", b), ("ablation", ab)) for k, v in (
                ("hard_auto", _pt(_acc(blk, hard, "auto"))),
                ("hard_think_rate", ((blk["cells"].get(hard) or {}).get("auto") or {}).get("think_rate")),
                ("perception_think_rate", ((blk["by_category"].get("perception") or {}).get("auto") or {})
                 .get("think_rate")))},
        }
    return out


def combine_claims(seeds: list[dict]) -> dict[str, dict]:
    """Per claim: every seed's figures, their spread over seeds (min, max, mean of each number) and a
    pass that needs every seed to pass."""
    names = sorted({k for s in seeds for k in s["claims"]})
    out = {}
    for name in names:
        per_seed = {str(s["seed"]): s["claims"].get(name) for s in seeds}
        passes = [c.get("pass") for c in per_seed.values() if c is not None and "pass" in c]
        out[name] = {"per_seed": per_seed, "spread": spread(list(per_seed.values()))}
        if passes:
            out[name]["pass"] = all(passes) and len(passes) == len(seeds)
    return out


def spread(figures: list[dict | None]) -> dict[str, dict[str, float]]:
    """Each numeric figure's min, max and mean over the seeds that have it."""
    out: dict[str, dict[str, float]] = {}
    keys = [k for f in figures if f for k, v in f.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for k in dict.fromkeys(keys):
        vals = [f[k] for f in figures if f and isinstance(f.get(k), (int, float)) and not isinstance(f[k], bool)]
        out[k] = {"min": min(vals), "max": max(vals), "mean": round(sum(vals) / len(vals), 4)}
    return out


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------
def hyperparameters(cfg: RunConfig) -> dict:
    """The settings that decide whether the effect appears (all of them are in the config too)."""
    return {
        "model.tiny": cfg.model.tiny.model_dump(mode="json"),
        "model.pretrain": cfg.model.pretrain.model_dump(mode="json"),
        "data.synthetic": cfg.data.synthetic.model_dump(mode="json"),
        "curate": {k: getattr(cfg.curate, k) for k in ("annotator", "simulated_accuracy", "num_samples",
                                                       "max_correct_for_reasoning", "temperature", "max_new_tokens",
                                                       "annotator_train_steps")},
        "anneal": {"steps": cfg.anneal.steps, "pack_length": cfg.anneal.pack_length,
                   "micro_batch_size": cfg.anneal.micro_batch_size, "optim": cfg.anneal.optim.model_dump(mode="json")},
        "bpo": cfg.bpo.model_dump(mode="json", exclude={"distributed", "engine", "sync_tolerance", "checkpoint_every",
                                                        "keep_checkpoints", "resume"}),
        "eval": {"max_new_tokens": cfg.eval.max_new_tokens, "modes": list(cfg.eval.modes)},
        "repro": cfg.repro.model_dump(mode="json"),
    }


def _seed_path(cfg: RunConfig, seed: int) -> str:
    scfg = seed_config(cfg, seed)
    return scfg.run_uri().rstrip("/") + "/repro_seed.json"


def _run_children(cfg: RunConfig, seeds: list[int], out_dir: str, mlflow: bool = False) -> None:
    """Seeds as child processes, `repro.jobs` at a time; each logs to <out_dir>/seed-<s>.log."""
    from r4b_core.storage import Store

    store = Store.from_config(cfg.storage)
    log_dir = Path(tempfile.mkdtemp(prefix="r4b-repro-"))
    cfg_file = log_dir / "config.yaml"
    cfg_file.write_text(dump_config(cfg))
    pending, running, failed = list(seeds), {}, []
    while pending or running:
        while pending and len(running) < cfg.repro.jobs:
            seed = pending.pop(0)
            log = log_dir / f"seed-{seed}.log"
            cmd = [sys.executable, "-m", "r4b_core.cli", "repro", "--config", str(cfg_file), "--seeds", str(seed),
                   "--seed-only"] + (["--mlflow"] if mlflow else [])
            fh = open(log, "w")
            running[seed] = (subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT), fh, log)
            print(f"repro: seed {seed} started (pid {running[seed][0].pid}, log {log})", flush=True)
        time.sleep(2)
        for seed, (proc, fh, log) in list(running.items()):
            if proc.poll() is None:
                continue
            fh.close()
            store.write_text(store.join(out_dir, f"seed-{seed}.log"), log.read_text(errors="replace"))
            del running[seed]
            if proc.returncode != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
                failed.append(f"seed {seed} (exit {proc.returncode}: {tail[0][:200]})")
            print(f"repro: seed {seed} finished with exit code {proc.returncode}", flush=True)
    if failed:
        raise ReproError(f"repro: {', '.join(failed)}; full logs in {out_dir}/seed-<s>.log. Finished stages are "
                         f"kept: rerun to resume")


def run_repro(cfg: RunConfig, seeds: list[int] | None = None, tracker=None) -> dict:
    """Run every seed (in this process, or `repro.jobs` child processes), then write the report."""
    from r4b_core.storage import Store

    seeds = list(seeds if seeds is not None else cfg.repro.seeds)
    if not seeds:
        raise ReproError("no seeds: set repro.seeds (e.g. [0, 1]) or pass --seeds 0,1")
    if len(set(seeds)) != len(seeds):
        raise ReproError(f"--seeds {seeds}: a seed is listed twice")
    hard_level(cfg)
    store = Store.from_config(cfg.storage)
    out_dir = layout.stage_dir(cfg, "repro")
    load_start = os.getloadavg()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    base_clock = _Clock()
    base_clock.run("shared base", prepare_base, cfg)     # once, before any seed starts from it
    if cfg.repro.jobs > 1 and len(seeds) > 1:
        _run_children(cfg, seeds, out_dir, mlflow=tracker is not None)
        summaries = [json.loads(store.read_text(_seed_path(cfg, s))) for s in seeds]
    else:
        summaries = [run_seed(cfg, s, tracker=tracker) for s in seeds]
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    report = {
        "name": cfg.name, "seeds": seeds, "hard_difficulty": hard_level(cfg),
        "base": seed_config(cfg, seeds[0]).model.base if shared_base(cfg) else None,
        "claims": combine_claims(summaries),
        "thresholds": {"atrophy_auto_vs_no_think": ATROPHY_AUTO_VS_NO_THINK, "atrophy_below_think": ATROPHY_BELOW_THINK,
                       "recovery_below_think": RECOVERY_BELOW_THINK, "recovery_gain": RECOVERY_GAIN,
                       "think_rate_hard_min": THINK_RATE_HARD_MIN,
                       "think_rate_perception_max": THINK_RATE_PERCEPTION_MAX, "token_ratio_max": TOKEN_RATIO_MAX,
                       "collapse_share": COLLAPSE_SHARE, "bpo_mode_share_min": BPO_MODE_SHARE_MIN,
                       "curve_tail": CURVE_TAIL},
        "hyperparameters": hyperparameters(cfg),
        "timing": {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "jobs": cfg.repro.jobs,
                   "shared_base": base_clock.phases.get("shared base"),
                   "cpu_count": os.cpu_count(), "loadavg_1m_start": round(load_start[0], 2),
                   "loadavg_1m_end": round(os.getloadavg()[0], 2),
                   "per_seed": {str(s["seed"]): s["timing"] for s in summaries}},
        "per_seed": {str(s["seed"]): s for s in summaries},
    }
    write_report(store, out_dir, report, tracker)
    print(format_claims(report))
    print(f"repro: report in {out_dir}/report.md ({report['timing']['wall_s']} s wall, "
          f"{report['timing']['cpu_s']} s CPU)")
    return report


def mechanism_report(cfg: RunConfig, seed: int, tracker=None) -> dict:
    """`r4b repro --mechanism`: run the arms, then write runs/<name>/repro/mechanism/ (JSON, markdown,
    mechanism.png)."""
    from r4b_core.storage import Store

    store = Store.from_config(cfg.storage)
    mech = run_mechanism(cfg, seed, tracker=tracker)
    out_dir = layout.stage_dir(cfg, "repro/mechanism")
    with tempfile.TemporaryDirectory() as tmp:
        png = _save(_mechanism_figure(_plt(), mech), Path(tmp) / "mechanism.png", _plt())
        store.write_bytes(store.join(out_dir, png.name), png.read_bytes())
    store.write_text(store.join(out_dir, "mechanism.md"), render_mechanism(mech))
    store.write_text(store.join(out_dir, "mechanism.json"), json.dumps(mech, indent=1))
    print(render_mechanism(mech))
    print(f"repro: mechanism figure in {out_dir}/mechanism.png")
    return mech


MECHANISM_COLUMNS = (("reasoning_share", "hard items labelled reasoning"), ("annealed_p_think", "annealed p(think)"),
                     ("annealed_think_accuracy", "annealed forced-think acc"),
                     ("annealed_auto_accuracy", "annealed auto acc"), ("bpo_accuracy", "BPO auto acc"),
                     ("bpo_think_rate", "BPO think-rate"), ("grpo_accuracy", "GRPO auto acc"),
                     ("grpo_think_rate", "GRPO think-rate"), ("grpo_no_think_share_final", "GRPO no-think share"))


def render_mechanism(mech: dict) -> str:
    hard = f"math/{mech['hard_difficulty']}"
    lines = [f"# Mechanism: BPO vs GRPO against the annealed think-rate (seed {mech['seed']}, hard math = {hard})",
             "", "Each arm anneals with another simulated annotator strength (how often hard items are labelled "
             "reasoning), then trains BPO and plain GRPO from the annealed model. Figures are on hard math "
             "(greedy eval) except the GRPO no-think share (its rollouts, all prompts, last steps).", "",
             "| arm | " + " | ".join(t for _, t in MECHANISM_COLUMNS) + " |", "|---|" + "---|" * len(MECHANISM_COLUMNS)]
    for arm, pt in mech["points"].items():
        lines.append(f"| {arm} | " + " | ".join(_n(pt.get(k)) for k, _ in MECHANISM_COLUMNS) + " |")
    lines += ["", "![mechanism](mechanism.png)", ""]
    return "\n".join(lines)


def _mechanism_figure(plt, mech: dict):
    """Final auto accuracy and think-rate on hard math, BPO vs GRPO, against the annealed p(think)."""
    pts = sorted(mech["points"].items(), key=lambda kv: kv[1].get("annealed_p_think") or 0.0)
    xs = [p.get("annealed_p_think") or 0.0 for _, p in pts]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.9))
    for ax, key, title in ((axes[0], "accuracy", "auto accuracy on hard math"),
                           (axes[1], "think_rate", "auto think-rate on hard math")):
        for algo, color in (("bpo", "tab:green"), ("grpo", "tab:purple")):
            ax.plot(xs, [p.get(f"{algo}_{key}") for _, p in pts], "-o", color=color, label=f"after {algo.upper()}")
        ref = "annealed_auto_accuracy" if key == "accuracy" else "annealed_think_rate"
        ax.plot(xs, [p.get(ref) for _, p in pts], ":s", color="gray", label="annealed (before RL)")
        if key == "accuracy":
            ax.plot(xs, [p.get("annealed_think_accuracy") for _, p in pts], ":^", color="tab:red",
                    label="annealed, forced think")
        for x, (arm, _) in zip(xs, pts):
            ax.annotate(arm, (x, 1.0), fontsize=7, ha="center")
        # symlog, not log: the arm that anneals without traces has p(think) 0, and it is the one
        # where only BPO can find thinking
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel("annealed p(think) on hard math (symlog: linear below 0.001)")
        ax.set_ylim(-0.05, 1.1)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="lower right" if key == "accuracy" else "center right")
    return fig


# ---------------------------------------------------------------------------------------------
# Report: JSON, markdown, plots
# ---------------------------------------------------------------------------------------------
CLAIM_TITLES = {
    "0_thinking_usable": "precondition (not a claim): annealed forced think >= no-think + 15 pts (hard math)",
    "1_atrophy": "1 atrophy: annealed auto ~ no-think, well below think (hard math)",
    "2_recovery": "2 recovery: BPO auto >= think - 2 pts and >= annealed auto + 10 pts (hard math)",
    "3_think_by_content": "3 thinking by content: BPO think-rate >= 80 % hard math, <= 20 % perception",
    "4_efficiency": "4 efficiency: BPO auto tokens <= 0.6 x forced-think tokens (whole eval)",
    "5_grpo_collapse": "5 control: GRPO collapses to one mode, BPO keeps both >= 25 %",
}


def _verdict(c: dict) -> str:
    if "pass" not in c:
        return "–"
    return "PASS" if c["pass"] else "FAIL"


def _figures(claim: dict | None) -> str:
    if claim is None:
        return "–"
    parts = []
    for k, v in claim.items():
        if k in ("pass", "cell") or isinstance(v, dict):
            continue
        parts.append(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts)


def format_claims(report: dict) -> str:
    lines = [f"repro {report['name']}: claims over seeds {report['seeds']} (hard math = difficulty "
             f"{report['hard_difficulty']})"]
    for name, c in report["claims"].items():
        lines.append(f"  {_verdict(c):4s} {CLAIM_TITLES.get(name, name)}")
        for seed, figs in c["per_seed"].items():
            lines.append(f"         seed {seed}: {_figures(figs)}")
    lines.append("  " + _claim_count(report).replace("**", ""))
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    t = report["timing"]
    lines = [f"# Reproduction at toy scale: {report['name']}", "",
             f"Seeds {report['seeds']}; hard math = math items of difficulty {report['hard_difficulty']}. "
             f"Wall {t['wall_s']} s, CPU {t['cpu_s']} s on {t['cpu_count']} cores "
             f"({t['jobs']} seed process(es) at a time; load average {t['loadavg_1m_start']} at start, "
             f"{t['loadavg_1m_end']} at end)."
             + (f" Every seed starts from one pretrained base (`{report['base']}`, prepared in "
                f"{t['shared_base']['wall_s']} s wall, {t['shared_base']['cpu_s']} s CPU when it was not done yet)."
                if report.get("base") and t.get("shared_base") else ""), "",
             "## Claims", "", f"{_claim_count(report)}", "",
             "| claim | result | " + " | ".join(f"seed {s}" for s in report["seeds"]) + " | spread over seeds |",
             "|---|---|" + "---|" * (len(report["seeds"]) + 1)]
    for name, c in report["claims"].items():
        cells = [_figures(c["per_seed"].get(str(s))) for s in report["seeds"]]
        lines.append(f"| {CLAIM_TITLES.get(name, name)} | {_verdict(c)} | " + " | ".join(cells)
                     + f" | {_spread_text(c.get('spread') or {})} |")
    lines += [""] + _precondition_lines(report)
    lines += ["", "## Annealed p(think) per cell", "",
              "The annealed model's mean probability of choosing to think in auto mode (the decision token): "
              "greedy auto mode thinks only above 1/2, plain GRPO samples thinking at this rate.", ""]
    cells = sorted({c for s in report["per_seed"].values() for c in s.get("annealed_p_think") or {}})
    lines += ["| seed | " + " | ".join(cells) + " |", "|---|" + "---|" * len(cells)]
    for seed, s in report["per_seed"].items():
        lines.append(f"| {seed} | " + " | ".join(_n((s.get("annealed_p_think") or {}).get(c)) for c in cells) + " |")
    lines += ["", "## Accuracy / tokens / auto think-rate per model", ""]
    for seed, s in report["per_seed"].items():
        lines += [f"### seed {seed} (`{s['run_uri']}`)", "",
                  "| model | cell | auto acc | think acc | no-think acc | auto think-rate | auto tokens | think tokens |",
                  "|---|---|---|---|---|---|---|---|"]
        for tag, ev in s["evals"].items():
            for cell in ["all", *sorted(ev["cells"])]:
                ms = ev["modes"] if cell == "all" else ev["cells"][cell]
                g = lambda m, k: (ms.get(m) or {}).get(k)   # noqa: E731
                lines.append(f"| {tag} | {cell} | {_n(g('auto', 'accuracy'))} | {_n(g('think', 'accuracy'))} | "
                             f"{_n(g('no_think', 'accuracy'))} | {_n(g('auto', 'think_rate'))} | "
                             f"{_n(g('auto', 'mean_tokens'), 1)} | {_n(g('think', 'mean_tokens'), 1)} |")
        lines.append("")
    lines += ["## Time per phase", "", "| seed | phase | wall s | CPU s |", "|---|---|---|---|"]
    for seed, tm in t["per_seed"].items():
        for phase, d in tm["phases"].items():
            lines.append(f"| {seed} | {phase} | {d['wall_s']} | {d['cpu_s']} |")
        lines.append(f"| {seed} | **total** | {tm['wall_s']} | {tm['cpu_s']} |")
    lines += ["", "## Hyperparameters", "", "```json", json.dumps(report["hyperparameters"], indent=1), "```", "",
              "## Plots", ""] + [f"![{p.removesuffix('.png')}]({p})" for p in PLOTS]
    return "\n".join(lines) + "\n"


def _claim_count(report: dict) -> str:
    claims = [c for name, c in report["claims"].items() if name[0] in "12345" and "pass" in c]
    return (f"**{sum(c['pass'] for c in claims)}/{len(claims)} claims reproduce on every seed** "
            f"({', '.join(str(s) for s in report['seeds'])}); a claim passes only if it passes on each seed.")


def _spread_text(sp: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{k} {v['min']:.3g}–{v['max']:.3g}" for k, v in sp.items()) or "–"


def _precondition_lines(report: dict) -> list[str]:
    """One sentence per seed on whether the annealed model can use thinking on hard math at all."""
    pre = report["claims"].get("0_thinking_usable")
    if not pre:
        return []
    out = []
    for seed, c in pre["per_seed"].items():
        if c is None:
            continue
        if c["pass"]:
            out.append(f"- seed {seed}: before BPO, forced thinking beats answering directly on hard math "
                       f"({c['think']} vs {c['no_think']} points): there is something for auto mode to recover.")
        else:
            out.append(f"- seed {seed}: **before BPO the annealed model cannot use thinking on hard math** "
                       f"(forced think {c['think']} vs no-think {c['no_think']} points, less than "
                       f"{_pt(ATROPHY_BELOW_THINK)} apart): claims 1 and 2 have nothing to measure on this seed.")
    return out


def _n(x: Any, digits: int = 3) -> str:
    return "–" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def write_report(store, out_dir: str, report: dict, tracker=None) -> None:
    """report.json, report.md and the plots under `out_dir`, the JSON last (it marks completion).
    With a tracker they also go to MLflow (a `repro` run, next to the stages' runs whose per-step
    metrics the training curves plot), with each claim's pass per seed as metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        files = write_plots(report, Path(tmp))
        for f in files:
            store.write_bytes(store.join(out_dir, f.name), f.read_bytes())
        md = render_markdown(report)
        if tracker is not None:
            with tracker.stage("repro"):
                tracker.log_metrics({f"repro/{name}/seed_{seed}/pass": float(bool((c or {}).get("pass")))
                                     for name, cl in report["claims"].items() for seed, c in cl["per_seed"].items()})
                tracker.log_dict(report, "repro/report.json")
                (Path(tmp) / "report.md").write_text(md)
                for f in [*files, Path(tmp) / "report.md"]:
                    tracker.log_artifact(str(f), "repro")
    store.write_text(store.join(out_dir, "report.md"), md)
    store.write_text(store.join(out_dir, "report.json"), json.dumps(report, indent=1))


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: dict, out: Path) -> list[Path]:
    plt = _plt()
    seeds = list(report["per_seed"].values())
    hard = f"math/{report['hard_difficulty']}"
    tags = [t for t in ("anneal", "bpo", "grpo", "bpo-ablation") if all(t in s["evals"] for s in seeds)]
    modes = ("auto", "think", "no_think")
    files = []

    def mean(vals):
        vals = [v for v in vals if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    # 1. accuracy per mode, before/after: whole eval and hard math, seeds averaged (dots = seeds)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / len(tags)
    for ax, cell, title in ((axes[0], None, "accuracy, whole eval"), (axes[1], hard, f"accuracy, hard math ({hard})")):
        for j, tag in enumerate(tags):
            xs = [i + (j - (len(tags) - 1) / 2) * width for i in range(len(modes))]
            per = [[((s["evals"][tag]["modes"] if cell is None else s["evals"][tag]["cells"].get(cell, {}))
                     .get(m) or {}).get("accuracy") for s in seeds] for m in modes]
            bars = ax.bar(xs, [mean(p) for p in per], width, label=tag)
            ax.bar_label(bars, fmt="%.2f", fontsize=6)
            for x, p in zip(xs, per):
                ax.scatter([x] * len(p), [v if v is not None else float("nan") for v in p], s=6, color="k", zorder=3)
        ax.set_xticks(range(len(modes)), modes)
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
        ax.legend(fontsize=7)
    files.append(_save(fig, out / PLOTS[0], plt))

    # 2. auto think-rate by difficulty, per category, before/after
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for tag, style in zip(tags, ("-", "--", ":", "-.")):
        for cat, color in (("math", "tab:red"), ("perception", "tab:blue")):
            cells = sorted({c for s in seeds for c in s["evals"][tag]["cells"] if c.startswith(cat + "/")},
                           key=lambda c: int(c.split("/")[1]))
            ys = [mean([((s["evals"][tag]["cells"].get(c) or {}).get("auto") or {}).get("think_rate") for s in seeds])
                  for c in cells]
            ax.plot([c.split("/")[1] for c in cells], ys, style, marker="o", color=color, label=f"{tag}: {cat}")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("difficulty")
    ax.set_ylabel("auto-mode think-rate")
    ax.set_title("auto mode: does it think where it should?")
    ax.legend(fontsize=6, ncol=2)
    files.append(_save(fig, out / PLOTS[1], plt))

    # 3. training curves as the paper's Figs 8-10, seeds averaged (thin: each seed)
    files.append(_save(_training_curves(plt, seeds), out / PLOTS[2], plt))

    # 4. auto-mode tokens vs forced modes (whole eval), per model
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    width = 0.8 / len(modes)
    for j, m in enumerate(modes):
        xs = [i + (j - 1) * width for i in range(len(tags))]
        bars = ax.bar(xs, [mean([(s["evals"][t]["modes"].get(m) or {}).get("mean_tokens") for s in seeds])
                           for t in tags], width, label=m)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(tags)), tags)
    ax.set_ylabel("mean output tokens (eval)")
    ax.set_title("auto mode vs forced modes: tokens")
    ax.legend(fontsize=7)
    files.append(_save(fig, out / PLOTS[3], plt))

    return files


def _curve(seeds: list[dict], variant: str, key: str) -> tuple[list, list, list[list]]:
    """(steps, mean over seeds, per-seed points) of one logged metric of one variant."""
    per_seed = [[(h["step"], h[key]) for h in s["curves"].get(variant) or [] if key in h] for s in seeds]
    by_step: dict[int, list[float]] = {}
    for pts in per_seed:
        for step, v in pts:
            by_step.setdefault(step, []).append(v)
    steps = sorted(by_step)
    return steps, [sum(by_step[t]) / len(by_step[t]) for t in steps], [p for p in per_seed if p]


def _training_curves(plt, seeds: list[dict]):
    """(a) auto-mode think-rate per step on reasoning (hard-math probes) vs non-reasoning (perception
    probes) prompts, BPO and GRPO (Fig. 8); (b) accuracy per mode per step: BPO's forced-think and
    forced-no-think rollouts and the auto-mode probe on hard math (Fig. 9); (c) the share of GRPO's
    rollouts that do not think (Fig. 10)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.9))

    def draw(ax, variant, key, style, color, label):
        steps, mean, per_seed = _curve(seeds, variant, key)
        if not steps:
            return
        for pts in per_seed if len(per_seed) > 1 else []:
            ax.plot(*zip(*pts), style, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, mean, style, marker=".", color=color, label=label)

    for variant, style in (("bpo", "-"), ("grpo", "--")):
        draw(axes[0], variant, "probe/hard_math/think_rate", style, "tab:red", f"{variant}: hard math (reasoning)")
        draw(axes[0], variant, "probe/perception/think_rate", style, "tab:blue", f"{variant}: perception (non-reasoning)")
        draw(axes[0], variant, "probe/hard_math/p_think", style, "tab:orange", f"{variant}: hard math p(think)")
    draw(axes[1], "bpo", "accuracy/think", "-", "tab:red", "BPO forced-think rollouts")
    draw(axes[1], "bpo", "accuracy/no_think", "-", "tab:blue", "BPO forced-no-think rollouts")
    draw(axes[1], "bpo", "probe/hard_math/accuracy", "-", "tab:green", "BPO auto, hard-math probe")
    draw(axes[1], "grpo", "probe/hard_math/accuracy", "--", "tab:green", "GRPO auto, hard-math probe")
    draw(axes[2], "grpo", "rollouts/no_think_share", "-", "tab:purple", "GRPO (auto-mode rollouts)")
    axes[2].axhline(0.5, color="gray", linestyle="--", label="BPO (forced, 1/2)")
    axes[2].axhline(COLLAPSE_SHARE, color="k", linestyle=":", linewidth=1)
    axes[2].axhline(1 - COLLAPSE_SHARE, color="k", linestyle=":", linewidth=1, label="collapse thresholds")
    titles = ("auto think-rate per step (Fig. 8)", "accuracy per mode per step (Fig. 9)",
              "GRPO: share of non-thinking rollouts (Fig. 10)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.set_ylim(-0.05, 1.05)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return fig


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
