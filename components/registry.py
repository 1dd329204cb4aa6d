"""KFP components: register the trained model in MLflow and promote it through the gate; deploy
the champion."""

from kfp.dsl import Input, Model


def register(config_uri: str, pipeline_run_id: str, report_uri: str, model: Input[Model]) -> str:
    """Registers a version (alias `challenger`), runs the promotion gate against `champion`.
    Returns "<version>:<promoted|kept>"."""
    from r4b_core.config import load_config
    from r4b_core.promote import register_and_gate

    from r4b_core.tracking import pipeline_tracker

    cfg = load_config(config_uri)
    tracker = pipeline_tracker(cfg, pipeline_run_id)
    try:
        decision = register_and_gate(cfg, model.metadata["storage_uri"], report_uri,
                                     pipeline_run_id=pipeline_run_id, tracker=tracker)
    finally:
        tracker.close()
    return f"{decision['version']}:{'promoted' if decision['promoted'] else 'kept'}"


def deploy(config_uri: str, decision: str) -> str:
    """Make the champion servable: fetch it into the serving folder (local) or roll the serving
    Deployment (cluster) so its init container pulls the new champion."""
    from r4b_core.config import load_config
    from r4b_core.serve import deploy_champion

    cfg = load_config(config_uri)
    return deploy_champion(cfg, decision)
