"""Replaying spilled tracking records (`Tracker.replay_pending`) against a real SQLite MLflow store.

A tracker spills to `<run dir>/mlflow-pending.jsonl` when MLflow is away; the next tracker of that
run folder that reaches the same server sends the records and removes the file. The live-server
version (a SIGKILLed `mlflow server`) is tests/integration/test_pipeline_faults.py.
"""

from __future__ import annotations

import json

import pytest

from r4b_core.config import RunConfig
from servers import dead_uri
from r4b_core.tracking import PENDING_FILE, Tracker


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)




def _spill_offline(cfg: RunConfig, uri: str) -> Tracker:
    tracker = Tracker(cfg, uri=uri, retry_interval_s=60)
    with tracker.stage("anneal", tags={"r4b.note": "offline"}) as run:
        run.log_params({"lr": 1e-3})
        for step in range(5):
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    tracker.close()
    return tracker


def test_records_for_this_server_are_sent_once_and_the_file_goes(tmp_path, clean_env):
    from mlflow import MlflowClient

    cfg = RunConfig(name="replay", storage={"root": str(tmp_path)})
    sqlite_uri = f"sqlite:///{tmp_path}/replay/mlflow.db"
    spill = tmp_path / "replay" / PENDING_FILE
    # Written while "the server" (this SQLite store) was unreachable: same URI, never created runs.
    offline = _spill_offline(cfg, dead_uri())
    lines = spill.read_text().splitlines()
    header = json.loads(lines[0])
    assert header["type"] == "target" and offline.spilled == 5
    header["uri"] = sqlite_uri  # as if the dead endpoint had been this store
    spill.write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")

    tracker = Tracker(cfg, uri=sqlite_uri)  # reaches the store: replays at construction
    tracker.close()
    assert not spill.exists() and not list(spill.parent.glob("*.replaying"))
    client = MlflowClient(sqlite_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    [stage] = client.search_runs([exp], "tags.`r4b.stage` = 'anneal'")
    assert [(m.step, m.value) for m in client.get_metric_history(stage.info.run_id, "loss")] == [
        (s, 1.0 / (s + 1)) for s in range(5)]
    assert stage.data.params == {"lr": "0.001"} and stage.data.tags["r4b.note"] == "offline"
    assert stage.info.status == "FINISHED"
    # created under the pipeline run that was never created either, with its tags
    parent = client.get_run(stage.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["r4b.kind"] == "pipeline" and parent.info.status == "FINISHED"

    again = Tracker(cfg, uri=sqlite_uri)  # nothing left: no second copy
    assert again.replay_pending() == 0
    again.close()
    assert len(client.get_metric_history(stage.info.run_id, "loss")) == 5


def test_records_for_another_server_stay_in_the_file(tmp_path, clean_env):
    cfg = RunConfig(name="other", storage={"root": str(tmp_path)})
    spill = tmp_path / "other" / PENDING_FILE
    elsewhere = dead_uri()
    _spill_offline(cfg, elsewhere)
    before = [json.loads(line) for line in spill.read_text().splitlines()]
    tracker = Tracker(cfg, uri=f"sqlite:///{tmp_path}/other/mlflow.db")
    assert tracker.replay_pending() == 0
    tracker.close()
    after = [json.loads(line) for line in spill.read_text().splitlines()]
    assert after == before and after[0] == {"type": "target", "uri": elsewhere,
                                             "experiment": cfg.tracking.experiment}
