"""`r4b run`: execute the R-4B pipeline on this machine with kfp.local.

The local run calls the very pipeline definition that `r4b pipeline compile` turns into IR YAML
for the cluster, through `kfp.local.SubprocessRunner(use_venv=False)`: each component runs as a
subprocess of this Python environment, training stages through the local launcher. Embedded
defaults: artifacts under ./runs/<name>/, MLflow in runs/<name>/mlflow.db, the vLLM sidecar as a
local process.

The console shows one line per task, the stages' own progress and a summary table
(pipelines/run_console.py); kfp.local's full output (executor inputs, task outputs, every line the
tasks print) goes to `<run dir>/logs/run-<time>.log`, or to the console too with `verbose=True`
(`r4b run --verbose`).
"""

from __future__ import annotations

import json
import os
import re
import time
from r4b_core import layout
from r4b_core.config import RunConfig
from r4b_core.errors import R4BError


def run_pipeline_locally(cfg: RunConfig, with_grpo_control: bool = False, verbose: bool = False,
                         overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Run the whole pipeline; returns a summary (also printed as a table). `overrides` (`r4b run
    --set`) travel as the pipeline's `overrides` parameter and the first task applies them to
    `cfg`, as in a run started from the KFP UI."""
    from kfp import local

    from r4b_kfp.pipelines.r4b_pipeline import build_pipeline
    from r4b_kfp.pipelines.run_console import RunConsole
    from r4b_core.config import dump_config, parse_config
    from r4b_core.tracking import local_run_dir

    base_yaml = json.dumps(cfg.model_dump(mode="json"))
    cfg = parse_config(dump_config(cfg), "the run config", list(overrides))   # what the tasks will resolve
    run_dir = local_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.storage.s3_endpoint_url:
        # Component subprocesses read the config from S3 before they know the endpoint.
        os.environ.setdefault("AWS_ENDPOINT_URL_S3", cfg.storage.s3_endpoint_url)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str((run_dir / "kfp").resolve()),
               raise_on_error=True)
    pipeline = build_pipeline(cfg, with_grpo_control=with_grpo_control, with_secrets=False)
    labels = {name: task.task_info.name for name, task in pipeline.pipeline_spec.root.dag.tasks.items()}
    log_path = run_dir / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    console = RunConsole(log_path, labels, verbose=verbose)
    print(f"r4b run {cfg.name}: {len(labels)} tasks on this machine (kfp.local); full log: {log_path}", flush=True)
    started = time.time()
    try:
        with console.capture():
            pipeline(config_yaml=base_yaml, overrides=list(overrides))
    except RuntimeError as exc:
        where = "Its output is above" if verbose else f"Its last lines are above, all of it in {log_path}"
        raise R4BError(f"{_plain(exc)} {where}; finished stages are kept and skipped when you rerun. "
                       f"Task folders: {run_dir / 'kfp'}") from None
    summary = collect_summary(cfg)
    summary["wall_s"] = round(time.time() - started, 1)
    summary["log"] = str(log_path)
    summary["tasks"] = [{k: t.get(k) for k in ("name", "label", "status", "seconds", "output")} for t in console.tasks]
    summary["deploy"] = next((t.get("output") for t in console.tasks if t["name"] == "deploy"), None)
    print_summary(summary)
    return summary


def _plain(exc: BaseException) -> str:
    """kfp's message without its terminal colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc))


def collect_summary(cfg: RunConfig) -> dict:
    """Stage rows (time, key metric) from the manifests and reports the stages wrote."""
    from r4b_core.storage import Store

    store = Store.from_config(cfg.storage)
    rows = []

    def row(stage: str, prefix: str, metric: str, pick) -> None:
        manifest = store.read_manifest(prefix) or {}
        metrics = manifest.get("metrics") or {}
        rows.append({"stage": stage, "seconds": _seconds(manifest), "metric": metric,
                     "value": pick(manifest, metrics) if manifest else None, "uri": prefix})

    row("data", layout.data_dir(cfg), "items", lambda m, _: sum((m.get("counts") or {}).values()) or None)
    if cfg.model.base == "tiny" and cfg.model.pretrain.steps > 0:
        row("pretrain", layout.base_model_dir(cfg), "final loss", lambda _, x: x.get("loss"))
    else:
        row("base model", layout.base_model_dir(cfg), "kind", lambda m, _: m.get("kind"))
    row("curate", layout.stage_dir(cfg, "curate"), "reasoning ratio", lambda _, x: x.get("reasoning_ratio"))
    row("anneal", layout.model_dir(cfg, "anneal"), "final loss", lambda _, x: x.get("loss"))
    row("eval anneal", layout.eval_dir(cfg, "anneal"), "auto math accuracy", lambda _, x: x.get("auto/math/accuracy"))
    row("bpo", layout.model_dir(cfg, "bpo"), "reward (last step)", lambda _, x: x.get("reward/mean"))
    row("eval bpo", layout.eval_dir(cfg, "bpo"), "auto math accuracy", lambda _, x: x.get("auto/math/accuracy"))
    decision = store.read_manifest(layout.stage_dir(cfg, "register")) or {}
    rows.append({"stage": "register", "seconds": decision.get("seconds"), "metric": "decision",
                 "value": (f"v{decision['version']} " + ("champion" if decision.get("promoted") else "challenger"))
                 if decision else None, "uri": decision.get("model_uri")})
    reports = []
    for tag in ("anneal", "bpo"):
        uri = layout.eval_dir(cfg, tag) + "/report.json"
        reports.append(json.loads(store.read_text(uri)) if store.exists(uri) else None)
    return {"rows": rows, "story": paper_story(*reports) if None not in reports else [],
            "report": layout.eval_dir(cfg, "bpo") + "/report.md"}


def paper_story(before: dict, after: dict) -> list[dict]:
    """R-4B's effect in a few numbers, annealed model (before) vs BPO (after): auto mode's accuracy
    on the hardest math against forced thinking's, where auto mode thinks (hardest math, easiest
    math, perception), and what auto mode pays in tokens."""
    def cell_levels(rep):
        return sorted(int(c.split("/")[1]) for c in rep.get("cells", {}) if c.startswith("math/"))

    levels = cell_levels(before)
    if not levels:
        return []
    hard, easiest = f"math/{levels[-1]}", f"math/{levels[0]}"

    def get(rep, cell, mode, key):
        return ((rep.get("cells", {}).get(cell) or {}).get("modes", {}).get(mode) or {}).get(key)

    def perception_think_rate(rep):
        return (((rep.get("by_category") or {}).get("perception") or {}).get("modes", {}).get("auto") or {}).get("think_rate")

    def token_ratio(rep):
        auto, think = ((rep.get("modes", {}).get(m) or {}).get("mean_tokens") for m in ("auto", "think"))
        return auto / think if auto is not None and think else None

    rows = [(f"auto accuracy, hardest math ({hard})", lambda r: get(r, hard, "auto", "accuracy")),
            (f"forced-think accuracy, {hard}", lambda r: get(r, hard, "think", "accuracy")),
            (f"forced-no-think accuracy, {hard}", lambda r: get(r, hard, "no_think", "accuracy")),
            (f"auto think-rate, {hard}", lambda r: get(r, hard, "auto", "think_rate")),
            (f"auto think-rate, easiest math ({easiest})", lambda r: get(r, easiest, "auto", "think_rate")),
            ("auto think-rate, perception (every level)", perception_think_rate),
            ("auto tokens / forced-think tokens, whole eval", token_ratio)]
    return [{"metric": name, "before": pick(before), "after": pick(after)} for name, pick in rows]


def _seconds(manifest: dict) -> float | None:
    """A stage's wall time, under the key its manifest uses."""
    for value in (manifest.get("seconds"), manifest.get("wall_time_s"),
                  (manifest.get("throughput") or {}).get("wall_seconds")):
        if isinstance(value, (int, float)):
            return float(value)
    return None


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"r4b run finished in {summary.get('wall_s', '?')} s")
    for col in ("stage", "time (s)", "key metric", "value"):
        table.add_column(col)
    for r in summary["rows"]:
        value = r["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else ("-" if value is None else str(value))
        table.add_row(r["stage"], "-" if r["seconds"] is None else f"{r['seconds']:.1f}", r["metric"], shown)
    console = Console()
    console.print(table)
    if summary.get("story"):
        story = Table(title="R-4B's story at toy scale: annealed model -> after BPO")
        for col in ("", "annealed", "after BPO"):
            story.add_column(col)
        for r in summary["story"]:
            story.add_row(r["metric"], *("-" if v is None else f"{v:.2f}" for v in (r["before"], r["after"])))
        console.print(story)
    # soft_wrap: paths and the serve command stay on one line, copyable.
    console.print(f"report: {summary['report']}", soft_wrap=True)
    if summary.get("deploy"):
        console.print(f"deploy: {summary['deploy']}", soft_wrap=True)
    if summary.get("log"):
        console.print(f"full log (kfp.local's executor inputs and outputs, every line of every task): {summary['log']}",
                      soft_wrap=True)
