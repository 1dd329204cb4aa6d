"""KFP components: the training stages (anneal, BPO / GRPO), started through a launcher.

The component itself is light: it asks the launcher to run `r4b <stage> --config <URI>` on the URIs
of its input artifacts (`--train --base-model`, `--prompts --init-model`) into the run's output
folder (`--out`), either as a child process on this machine (`launcher.kind: local`) or as a
Kubeflow PyTorchJob whose pods run the same command (`pytorchjob`). The artifacts are the truth:
rewiring an edge of the pipeline changes what the stage reads. Retries are safe: the stage skips
when its manifest matches, and the PyTorchJob launcher adopts a job that is still running.
"""

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def anneal(config_uri: str, pipeline_run_id: str, sft: Input[Dataset], base_model: Input[Model],
           model: Output[Model], metrics: Output[Metrics]) -> str:
    from r4b_core import layout
    from r4b_core.config import load_config
    from r4b_core.launch.dispatch import launch_stage

    cfg = load_config(config_uri)
    out = layout.model_dir(cfg, "anneal")
    manifest = launch_stage("anneal", cfg, config_uri, {"train": sft.metadata["storage_uri"],
                                                        "base-model": base_model.metadata["storage_uri"]},
                            out, pipeline_run_id)
    model.metadata["storage_uri"] = out
    for key, value in (manifest.get("metrics") or {}).items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, float(value))
    return out


def bpo(config_uri: str, pipeline_run_id: str, algorithm: str, init_model: Input[Model],
        prompts: Input[Dataset], model: Output[Model], metrics: Output[Metrics]) -> str:
    from r4b_core import layout
    from r4b_core.config import load_config
    from r4b_core.launch.dispatch import launch_stage

    sets = [f"bpo.algorithm={algorithm}"]
    cfg = load_config(config_uri, sets)
    out = layout.model_dir(cfg, algorithm)
    manifest = launch_stage("bpo", cfg, config_uri, {"prompts": prompts.metadata["storage_uri"],
                                                     "init-model": init_model.metadata["storage_uri"]},
                            out, pipeline_run_id, sets)
    model.metadata["storage_uri"] = out
    for key, value in (manifest.get("metrics") or {}).items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, float(value))
    return out
