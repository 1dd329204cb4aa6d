"""Tracker against a real `mlflow server` (SQLite backend, artifacts proxied to SeaweedFS)."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from r4b_core.config import RunConfig
from r4b_core.storage import Store
from r4b_core.tracking import PENDING_FILE, Tracker


@pytest.fixture
def cfg(mlflow_server, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return RunConfig(name="itest", storage={"root": str(tmp_path / "runs")},
                     tracking={"uri": mlflow_server.uri, "experiment": f"itest-{uuid.uuid4().hex[:8]}"})


@pytest.fixture
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.uri)


def test_nested_stage_runs_params_metrics_and_s3_artifact(cfg, client, mlflow_server, s3_env, tmp_path):
    sample = tmp_path / "completions.jsonl"
    sample.write_text('{"mode": "think", "text": "<think>\\n1+1=2\\n</think>\\n\\n2"}\n')
    with Tracker(cfg) as tracker:
        tracker.set_tags({"r4b.git_sha": "abc123"})
        with tracker.stage("anneal") as anneal:
            anneal.log_params({"optim": {"lr": 4e-5}, "steps": 3})
            for step in range(3):
                anneal.log_metrics({"loss": 2.0 - step, "timing(s)/step": 0.1}, step=step)
        with tracker.stage("bpo") as bpo:
            bpo.log_metrics({"reward/think@8": 0.5}, step=0)
            bpo.log_artifact(sample, "samples")
        pipeline_id = tracker.run_id

    pipeline = client.get_run(pipeline_id)
    assert pipeline.info.status == "FINISHED" and pipeline.data.tags["r4b.git_sha"] == "abc123"
    children = {r.info.run_name: r for r in client.search_runs(
        [pipeline.info.experiment_id], f"tags.mlflow.parentRunId = '{pipeline_id}'")}
    assert set(children) == {"anneal", "bpo"}
    anneal_run = children["anneal"]
    assert anneal_run.data.params == {"optim.lr": "4e-05", "steps": "3"}
    assert anneal_run.data.tags["r4b.stage"] == "anneal" and anneal_run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(anneal_run.info.run_id, "loss")] == [2.0, 1.0, 0.0]
    assert children["bpo"].data.metrics == {"reward/think_at_8": 0.5}

    # The artifact went through the server's proxy into the SeaweedFS bucket under mlartifacts/.
    bpo_id = children["bpo"].info.run_id
    assert children["bpo"].info.artifact_uri.startswith("mlflow-artifacts:")
    assert [f.path for f in client.list_artifacts(bpo_id, "samples")] == ["samples/completions.jsonl"]
    keys = Store(s3_endpoint_url=s3_env.endpoint_url).list(f"s3://{s3_env.bucket}/mlartifacts")
    hits = [k for k in keys if bpo_id in k and k.endswith("samples/completions.jsonl")]
    assert len(hits) == 1, keys
    assert Store(s3_endpoint_url=s3_env.endpoint_url).read_text(hits[0]) == sample.read_text()


def test_reuses_mlflow_run_id(cfg, client, monkeypatch):
    exp = client.create_experiment(f"plugin-{uuid.uuid4().hex[:8]}")
    outer = client.create_run(exp, run_name="kfp-pipeline-run")  # what the KFP MLflow plugin does
    monkeypatch.setenv("MLFLOW_RUN_ID", outer.info.run_id)
    with Tracker(cfg) as tracker:
        assert tracker.run_id == outer.info.run_id
        assert tracker.env() == {"MLFLOW_TRACKING_URI": cfg.tracking.uri, "MLFLOW_RUN_ID": outer.info.run_id}
        with tracker.stage("eval") as run:
            run.log_metrics({"auto/math_accuracy": 0.25})
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{outer.info.run_id}'")
    assert [r.info.run_name for r in children] == ["eval"]  # nested in the plugin's experiment and run
    assert children[0].data.metrics == {"auto/math_accuracy": 0.25}
    assert client.get_run(outer.info.run_id).info.status == "RUNNING"  # not ours to end


def test_outage_buffers_then_flushes_in_order_or_spills_at_close(cfg, client, mlflow_server, tmp_path):
    """One server outage, two trackers: `live` keeps going and delivers everything after the
    restart; `ending` closes during the outage and writes its pending metrics to the JSONL file."""
    live = Tracker(cfg, retry_interval_s=0.5)
    ending = Tracker(cfg.model_copy(update={"storage": cfg.storage.model_copy(
        update={"root": str(tmp_path / "ending")})}), retry_interval_s=60)
    with live.stage("bpo") as run:
        run.log_metrics({"reward": 0.0}, step=0)
        with ending.stage("eval") as doomed:
            mlflow_server.stop(grace_s=2)
            t0 = time.monotonic()
            for step in range(1, 21):
                run.log_metrics({"reward": step / 100, "acc@8": step}, step=step)
            run.log_params({"group_size": 4})
            doomed.log_metrics({"acc@8": 0.5}, step=3)
            assert time.monotonic() - t0 < 15, "logging stalled while the server was down"
            assert not live.online
        ending.close()
        mlflow_server.start()
        time.sleep(0.6)  # past retry_interval_s: the next call delivers everything
        run.log_metrics({"reward": 0.21}, step=21)
        assert live.online
    live.close()

    stage_id = run.run_id
    assert [(m.step, m.value) for m in client.get_metric_history(stage_id, "reward")] == [
        (s, s / 100) for s in range(22)]
    assert [m.step for m in client.get_metric_history(stage_id, "acc_at_8")] == list(range(1, 21))
    data = client.get_run(stage_id)
    assert data.data.params == {"group_size": "4"} and data.info.status == "FINISHED"
    assert not (tmp_path / "runs" / "itest" / PENDING_FILE).exists()  # nothing had to be spilled
    assert live.spilled == 0

    recs = [json.loads(line) for line in (tmp_path / "ending" / "itest" / PENDING_FILE).read_text().splitlines()]
    metric = [r for r in recs if r["type"] == "metric"]
    assert metric == [{"type": "metric", "run_id": doomed.run_id, "run_name": "eval",
                       "parent_run_id": ending.run_id, "parent_run_name": ending.pipeline.name,
                       "key": "acc_at_8", "value": 0.5, "timestamp": metric[0]["timestamp"], "step": 3}]
    ends = {r["run_name"]: r["status"] for r in recs if r["type"] == "end"}
    assert ends == {"eval": "FINISHED", ending.pipeline.name: "FINISHED"}
    assert ending.spilled == 1 and doomed.run_id is not None


def test_registry_version_and_alias_roundtrip(cfg, s3_env):
    name = f"r4b-itest-{uuid.uuid4().hex[:6]}"
    tracker = Tracker(cfg)
    try:
        assert tracker.get_version(name, "champion") is None  # no such model yet
        v1 = tracker.register_version(name, f"s3://{s3_env.bucket}/runs/a/bpo/model", {"stage": "bpo"})
        v2 = tracker.register_version(name, f"s3://{s3_env.bucket}/runs/b/bpo/model", {"stage": "bpo"},
                                      run_id=tracker.run_id)
        assert (v1.version, v2.version) == (1, 2) and v1.tags == {"stage": "bpo"}
        assert tracker.get_version(name, "champion") is None  # model exists, alias does not
        tracker.set_alias(name, "champion", v1.version)
        tracker.set_alias(name, "challenger", v2.version)
        champ = tracker.get_version(name, "champion")
        assert champ.version == 1 and champ.source == f"s3://{s3_env.bucket}/runs/a/bpo/model"
        assert "champion" in champ.aliases
        tracker.set_version_tags(name, v2.version, {"gate": "passed", "auto_math_accuracy": 0.31})
        tracker.set_alias(name, "champion", v2.version)  # promotion moves the alias
        new = tracker.get_version(name, "champion")
        assert new.version == 2 and new.run_id == tracker.run_id
        assert new.tags == {"stage": "bpo", "gate": "passed", "auto_math_accuracy": "0.31"}
        assert set(new.aliases) == {"champion", "challenger"}
    finally:
        tracker.close()
