"""KFP component: publish the run config, the data splits and the base model (r4b_core.prepare)."""

from kfp.dsl import Dataset, Model, Output


def prepare(config_yaml: str, config_uri: str, overrides: list, pipeline_run_id: str, train: Output[Dataset],
            rl: Output[Dataset], eval_data: Output[Dataset], base_model: Output[Model]) -> str:
    """The run's config: the YAML at `config_uri` (object storage) when given, else `config_yaml`,
    with `overrides` (`KEY=VALUE`, as `--set`) applied; every problem of the three is reported at
    once, before anything runs. Returns the URI of the resolved config that every later task reads."""
    from r4b_core.config import load_config, parse_config
    from r4b_core.prepare import run_prepare
    from r4b_core.tracking import pipeline_tracker

    overrides = [str(item) for item in overrides or []]
    if config_uri:
        cfg = load_config(config_uri, overrides)
    else:
        cfg = parse_config(config_yaml, "pipeline parameter config_yaml", overrides)
    out = run_prepare(cfg)
    # Open the pipeline's MLflow run now so that every later task nests under it.
    tracker = pipeline_tracker(cfg, pipeline_run_id)
    tracker.log_params(cfg.model_dump(mode="json"), run=tracker.pipeline)
    tracker.close()
    for artifact, key in ((train, "train"), (rl, "rl"), (eval_data, "eval"), (base_model, "base_model")):
        artifact.metadata["storage_uri"] = out[key]
    return out["config_uri"]
