"""KFP component: three-mode evaluation of a model (r4b_core.evaluate)."""

from kfp.dsl import Dataset, Input, Markdown, Metrics, Model, Output


def evaluate(config_uri: str, pipeline_run_id: str, tag: str, compare_tag: str, model: Input[Model], eval_data: Input[Dataset],
             metrics: Output[Metrics], report: Output[Markdown]) -> str:
    """Returns the URI of report.json. `compare_tag` (may be empty) adds a side-by-side comparison
    with an earlier evaluation of the same run."""
    from r4b_core import layout
    from r4b_core.config import load_config
    from r4b_core.evaluate import headline, run_eval
    from r4b_core.storage import Store
    from r4b_core.tracking import pipeline_tracker

    cfg = load_config(config_uri)
    out_uri = layout.eval_dir(cfg, tag)
    compare = layout.eval_dir(cfg, compare_tag) + "/report.json" if compare_tag else None
    tracker = pipeline_tracker(cfg, pipeline_run_id)
    try:
        result = run_eval(cfg, model.metadata["storage_uri"], eval_data.metadata["storage_uri"], out_uri, tag,
                          tracker=tracker, compare=compare)
    finally:
        tracker.close()
    for key, value in headline(result).items():
        metrics.log_metric(key, float(value))
    store = Store.from_config(cfg.storage)
    md_uri = out_uri + "/report.md"
    with open(report.path, "w", encoding="utf-8") as fh:
        fh.write(store.read_text(md_uri) if store.exists(md_uri) else f"report: {out_uri}/report.json\n")
    return out_uri + "/report.json"
