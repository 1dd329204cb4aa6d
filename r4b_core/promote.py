"""Register a trained model in the MLflow registry and promote it through a gate.

    r4b register --config configs/tiny.yaml           # register bpo/model, gate, move `champion`
    r4b promote r4b-tiny 3 --reason "hotfix"          # manual promotion, recorded on the version

`register_and_gate` registers the model (weights stay in storage: the version's source is their
URI), tags it with its lineage (data and config hashes, code version, pipeline run), gives it the
`challenger` alias, then compares its eval headline with the current `champion`'s on the rules in
`promotion.max_drop` (metric -> the most it may drop). Passing moves `champion`; the decision and
every number behind it are written as version tags. The first version (no champion yet) passes.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from r4b_core import __version__, layout
from r4b_core.config import RunConfig
from r4b_core.errors import R4BError
from r4b_core.identity import identity_hash, stage_identity
from r4b_core.prepare import data_hash


class PromotionError(R4BError):
    pass


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def gate(challenger: dict[str, float], champion: dict[str, float] | None,
         max_drop: dict[str, float]) -> tuple[bool, list[str]]:
    """(passed, one line per rule). Missing metrics fail the gate: it must not decide on nothing."""
    if champion is None:
        return True, ["no champion yet: the first version passes"]
    passed, lines = True, []
    for metric, allowed in sorted(max_drop.items()):
        new, old = challenger.get(metric), champion.get(metric)
        if new is None or old is None:
            passed = False
            lines.append(f"{metric}: missing (challenger {new}, champion {old}) -> fail")
            continue
        ok = new >= old - allowed - 1e-12
        passed &= ok
        lines.append(f"{metric}: challenger {new:.4f} vs champion {old:.4f} (may drop {allowed:.4f}) -> "
                     f"{'pass' if ok else 'fail'}")
    return passed, lines


def _headline_of(report: dict) -> dict[str, float]:
    from r4b_core.evaluate import headline

    return {k: float(v) for k, v in headline(report).items()}


def register_and_gate(cfg: RunConfig, model_uri: str, report_uri: str, pipeline_run_id: str = "",
                      tracker=None, store=None) -> dict:
    """Register `model_uri`, gate it against the champion; returns the decision (also a manifest)."""
    from r4b_core.storage import Store, absolute_uri
    from r4b_core.tracking import Tracker

    store = store or Store.from_config(cfg.storage)
    started = time.time()
    # what the registry records must mean the same from any directory or machine
    model_uri, report_uri = absolute_uri(model_uri), absolute_uri(report_uri)
    model_manifest = store.read_manifest(model_uri)
    if model_manifest is None:
        raise PromotionError(f"{model_uri}: no manifest.json — the model stage did not finish; rerun it first")
    report = json.loads(store.read_text(report_uri))
    metrics = _headline_of(report)
    out_prefix = layout.stage_dir(cfg, "register")
    identity = identity_hash(stage_identity(cfg, "promotion", {
        "model": model_uri, "weights": model_manifest.get("config_hash", ""), "metrics": metrics,
        "registered_model": cfg.tracking.registered_model}))
    previous = store.read_manifest(out_prefix)
    if previous and previous.get("config_hash") == identity:
        return previous  # this exact model was registered and gated already: a retry or a rerun

    name = cfg.tracking.registered_model
    own_tracker = tracker is None
    tracker = tracker or Tracker(cfg)
    try:
        data_manifest = store.read_manifest(layout.data_dir(cfg)) or {}
        lineage = {
            "r4b.model_uri": model_uri,
            "r4b.config_hash": model_manifest.get("config_hash", ""),
            "r4b.data_hash": data_manifest.get("config_hash", data_hash(cfg)),
            "r4b.code_version": code_version(),
            "r4b.pipeline_run": pipeline_run_id,
            "r4b.run": cfg.name,
            "r4b.eval_report": report_uri,
        }
        version = tracker.register_version(name, model_uri, lineage)
        tracker.set_alias(name, cfg.promotion.challenger_alias, version.version)
        current = tracker.get_version(name, cfg.promotion.champion_alias)
        champion_metrics = None
        if current is not None and current.version != version.version:
            champion_report = current.tags.get("r4b.eval_report")
            if not champion_report:
                raise PromotionError(f"champion {name} v{current.version} has no r4b.eval_report tag; "
                                     f"promote manually with `r4b promote {name} VERSION --reason ...`")
            champion_metrics = _headline_of(json.loads(store.read_text(champion_report)))
        passed, lines = gate(metrics, champion_metrics, cfg.promotion.max_drop)
        if passed:
            tracker.set_alias(name, cfg.promotion.champion_alias, version.version)
        tags = {"r4b.gate": "passed" if passed else "failed", "r4b.gate_detail": " | ".join(lines),
                "r4b.gate_against": f"v{current.version}" if champion_metrics is not None else "none"}
        tags.update({f"r4b.metric.{k}": f"{v:.6f}" for k, v in metrics.items()
                     if k in cfg.promotion.max_drop})
        tracker.set_version_tags(name, version.version, tags)
    finally:
        if own_tracker:
            tracker.close()
    decision = {"stage": "register", "config_hash": identity, "name": name, "version": version.version,
                "promoted": passed, "gate": lines, "model_uri": model_uri, "metrics": metrics,
                "champion_before": current.version if current else None,
                "seconds": round(time.time() - started, 2)}
    store.commit(out_prefix, decision)
    print(f"registered {name} v{version.version}: " + ("promoted to champion" if passed else "kept as challenger"))
    for line in lines:
        print(f"  {line}")
    return decision


def promote_manually(cfg: RunConfig, name: str, version: int, reason: str, tracker=None) -> None:
    """Move `champion` to a version by hand; the reason and the previous champion are recorded."""
    from r4b_core.tracking import Tracker

    if not reason.strip():
        raise PromotionError("a manual promotion needs --reason (it is recorded on the version)")
    own = tracker is None
    tracker = tracker or Tracker(cfg)
    try:
        before = tracker.get_version(name, cfg.promotion.champion_alias)
        tracker.set_alias(name, cfg.promotion.champion_alias, version)
        tracker.set_version_tags(name, version, {"r4b.gate": "manual", "r4b.promotion_reason": reason,
                                                 "r4b.gate_against": f"v{before.version}" if before else "none"})
    finally:
        if own:
            tracker.close()
    print(f"{name} v{version} is now {cfg.promotion.champion_alias}"
          + (f" (was v{before.version})" if before else ""))
