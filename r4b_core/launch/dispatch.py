"""Run a training stage (anneal, bpo) where the config says: here, or as a Kubeflow PyTorchJob.

Both launchers run the same command, `r4b <stage> --config <config URI>`; the stage writes its
outputs and `manifest.json` under the run prefix, which is how the caller learns the result.
"""

from __future__ import annotations

from r4b_core import layout
from r4b_core.config import RunConfig
from r4b_core.errors import R4BError


def _output_prefix(stage: str, cfg: RunConfig) -> str:
    if stage == "bpo":
        return layout.model_dir(cfg, cfg.bpo.algorithm)
    return layout.model_dir(cfg, stage)


def launch_stage(stage: str, cfg: RunConfig, config_uri: str, pipeline_run_id: str = "",
                 extra_args: list[str] | None = None) -> dict:
    """Run `stage` to completion and return its manifest."""
    from r4b_core.storage import Store

    dist = getattr(cfg, stage).distributed
    if cfg.launcher.kind == "local":
        from r4b_core.launch.local import run_local

        run_local(stage, config_uri, dist, extra_args, env={"R4B_PIPELINE_RUN_ID": pipeline_run_id})
    else:
        from r4b_core.launch.pytorchjob import launch

        launch(stage, config_uri, cfg, pipeline_run_id or cfg.name, extra_args=extra_args)
    prefix = _output_prefix(stage, cfg)
    manifest = Store.from_config(cfg.storage).read_manifest(prefix)
    if manifest is None:
        raise R4BError(f"stage {stage} finished but wrote no manifest under {prefix}; its output is "
                       "incomplete — rerun the pipeline (finished stages are skipped)")
    return manifest
