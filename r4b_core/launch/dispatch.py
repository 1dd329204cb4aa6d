"""Run a training stage (anneal, bpo) where the config says: here, or as a Kubeflow PyTorchJob.

Both launchers run the same command, `r4b <stage> --config <config URI> --<input> <URI> ... --out <URI>`:
the stage reads the inputs it is handed (the pipeline's artifacts), writes its outputs and
`manifest.json` under `out_uri`, which is how the caller learns the result.
"""

from __future__ import annotations

from r4b_core.config import RunConfig
from r4b_core.launch import LaunchError


def stage_args(inputs: dict[str, str], out_uri: str, sets: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The stage command's arguments after `--config`: `--train URI --base-model URI ... --out URI
    --set KEY=VALUE ...` (input names are the stage's CLI flags without the dashes)."""
    args = [a for name, uri in inputs.items() for a in (f"--{name}", uri)] + ["--out", out_uri]
    return args + [a for s in sets for a in ("--set", s)]


def launch_stage(stage: str, cfg: RunConfig, config_uri: str, inputs: dict[str, str], out_uri: str,
                 pipeline_run_id: str = "", sets: list[str] | tuple[str, ...] = ()) -> dict:
    """Run `stage` on `inputs` (e.g. {"train": URI, "base-model": URI}) into `out_uri`, to
    completion; return its manifest. `sets` are `--set` overrides `cfg` already reflects."""
    from r4b_core.storage import Store

    args = stage_args(inputs, out_uri, sets)
    if cfg.launcher.kind == "local":
        from r4b_core.launch.local import run_local

        run_local(stage, config_uri, getattr(cfg, stage).distributed, args,
                  env={"R4B_PIPELINE_RUN_ID": pipeline_run_id})
    else:
        from r4b_core.launch.pytorchjob import launch

        launch(stage, config_uri, cfg, pipeline_run_id or cfg.name, extra_args=args,
               init_model_uri=inputs.get("init-model"))
    manifest = Store.from_config(cfg.storage).read_manifest(out_uri)
    if manifest is None:
        raise LaunchError(f"stage {stage} finished but wrote no manifest under {out_uri}; its output is "
                          "incomplete — rerun the pipeline (finished stages are skipped)")
    return manifest
