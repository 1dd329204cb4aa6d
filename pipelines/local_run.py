"""`r4b run`: execute the R-4B pipeline on this machine with kfp.local.

The local run calls the very pipeline definition that `r4b pipeline compile` turns into IR YAML
for the cluster, through `kfp.local.SubprocessRunner(use_venv=False)`: each component runs as a
subprocess of this Python environment, training stages through the local launcher. Embedded
defaults: artifacts under ./runs/<name>/, MLflow in runs/<name>/mlflow.db, the vLLM sidecar as a
local process.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from r4b_core import layout
from r4b_core.config import RunConfig
from r4b_core.errors import R4BError


def _local_run_dir(cfg: RunConfig) -> Path:
    root = cfg.storage.root
    base = Path("runs") if "://" in root and not root.startswith("file://") else Path(root.removeprefix("file://"))
    return base / cfg.name


def run_pipeline_locally(cfg: RunConfig, with_grpo_control: bool = False) -> dict:
    """Run the whole pipeline; returns a summary (also printed as a table)."""
    from kfp import local

    from pipelines.r4b_pipeline import build_pipeline

    run_dir = _local_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.storage.s3_endpoint_url:
        # Component subprocesses read the config from S3 before they know the endpoint.
        os.environ.setdefault("AWS_ENDPOINT_URL_S3", cfg.storage.s3_endpoint_url)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str((run_dir / "kfp").resolve()),
               raise_on_error=True)
    pipeline = build_pipeline(cfg, with_grpo_control=with_grpo_control, with_secrets=False)
    started = time.time()
    try:
        pipeline(config_yaml=json.dumps(cfg.model_dump(mode="json")))
    except RuntimeError as exc:
        # kfp.local has already printed the failing task's own output above.
        raise R4BError(f"{_plain(exc)} Its output is above; finished stages are kept and skipped "
                       f"when you rerun. Task folders: {run_dir / 'kfp'}") from None
    summary = collect_summary(cfg)
    summary["wall_s"] = round(time.time() - started, 1)
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
    return {"rows": rows, "report": layout.eval_dir(cfg, "bpo") + "/report.md"}


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
    console.print(f"report: {summary['report']}")
