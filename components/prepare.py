"""KFP component: publish the run config, the data splits and the base model (r4b_core.prepare)."""

from kfp.dsl import Dataset, Model, Output


def prepare(config_yaml: str, pipeline_run_id: str, train: Output[Dataset], rl: Output[Dataset],
            eval_data: Output[Dataset], base_model: Output[Model]) -> str:
    """Returns the URI of the resolved config that every later task reads."""
    import tempfile

    from r4b_core.config import load_config
    from r4b_core.prepare import run_prepare
    from r4b_core.tracking import pipeline_tracker

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(config_yaml)
    cfg = load_config(fh.name)
    out = run_prepare(cfg)
    # Open the pipeline's MLflow run now so that every later task nests under it.
    tracker = pipeline_tracker(cfg, pipeline_run_id)
    tracker.log_params(cfg.model_dump(mode="json"), run=tracker.pipeline)
    tracker.close()
    for artifact, key in ((train, "train"), (rl, "rl"), (eval_data, "eval"), (base_model, "base_model")):
        artifact.metadata["storage_uri"] = out[key]
    return out["config_uri"]
