"""KFP component: publish the run config, the data splits and the base model (r4b_core.prepare)."""

from kfp.dsl import Dataset, Model, Output


def prepare(config_yaml: str, pipeline_run_id: str, train: Output[Dataset], rl: Output[Dataset],
            eval_data: Output[Dataset], base_model: Output[Model]) -> str:
    """Returns the URI of the resolved config that every later task reads."""
    import tempfile

    from r4b_core.config import load_config
    from r4b_core.prepare import run_prepare

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        fh.write(config_yaml)
    cfg = load_config(fh.name)
    out = run_prepare(cfg)
    for artifact, key in ((train, "train"), (rl, "rl"), (eval_data, "eval"), (base_model, "base_model")):
        artifact.metadata["storage_uri"] = out[key]
    return out["config_uri"]
