"""KFP component: bi-mode data curation (r4b_core.curate)."""

from kfp.dsl import Dataset, Input, Metrics, Model, Output


def curate(config_uri: str, pipeline_run_id: str, raw: Input[Dataset], base_model: Input[Model], sft: Output[Dataset],
           metrics: Output[Metrics]) -> str:
    from r4b_core import layout
    from r4b_core.config import load_config
    from r4b_core.curate import run_curate
    from r4b_core.tracking import pipeline_tracker

    cfg = load_config(config_uri)
    out_uri = layout.curated_uri(cfg)
    tracker = pipeline_tracker(cfg, pipeline_run_id)
    try:
        manifest = run_curate(cfg, raw.metadata["storage_uri"], out_uri, tracker=tracker,
                              base_model_uri=base_model.metadata["storage_uri"])
    finally:
        tracker.close()
    sft.metadata["storage_uri"] = out_uri
    for key, value in (manifest.get("metrics") or {}).items():
        if isinstance(value, (int, float)):
            metrics.log_metric(key, float(value))
    return out_uri
