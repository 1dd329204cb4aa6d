"""Tracking without a server: name sanitizing, params, URIs, a real SQLite MLflow store, and a
real unreachable endpoint (a closed port) for buffering and spilling."""

from __future__ import annotations

import json
import logging
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r4b_core.config import RunConfig
from servers import dead_uri
from r4b_core.tracking import (MAX_NAME_LENGTH, MAX_PARAM_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH, PENDING_FILE,
                               Tracker, TrackingError, flatten_params, local_run_dir, sanitize_metric_name,
                               tracking_uri)


def _mlflow_accepts(name: str) -> None:
    """MLflow's own client-side validators (the server runs the same ones)."""
    from mlflow.utils.validation import _validate_metric_name, _validate_param_name, _validate_tag_name

    _validate_metric_name(name)
    _validate_param_name(name)
    _validate_tag_name(name)
    assert len(name) <= MAX_NAME_LENGTH


# -- names -------------------------------------------------------------------------------------
@settings(max_examples=3000, deadline=None)
@given(st.text(max_size=400))
def test_any_string_becomes_a_valid_mlflow_name(name):
    out = sanitize_metric_name(name)
    _mlflow_accepts(out)
    assert out == sanitize_metric_name(name)  # deterministic
    assert out.isascii() and ":" not in out  # also valid for MLflow on Windows


_SAFE_SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=20)


@settings(max_examples=500, deadline=None)
@given(st.lists(_SAFE_SEGMENT, min_size=1, max_size=5))
def test_valid_names_pass_unchanged(segments):
    name = "/".join(segments)
    assert sanitize_metric_name(name) == name


PEER_NAMES = [
    # verl / EasyR1 / TRL style names, including the ones MLflow refuses (verl issue #119).
    "timing(s)/gen", "timing(s)/ref", "timing(s)/update_actor", "timing_per_token(ms)/gen",
    "val-core/math/acc/mean@8", "val-core/math/acc/best@8/mean", "val-core/math/acc/maj@8/mean",
    "val-aux/math/reward/mean@8", "acc@1", "acc@8", "pass@1", "pass@8", "mean@16", "std@16",
    "critic/score/mean", "critic/score/max", "critic/advantages/mean", "actor/pg_clipfrac",
    "actor/ppo_kl", "actor/entropy", "actor/grad_norm", "perf/max_memory_allocated_gb",
    "perf/throughput", "response_length/mean", "response_length/clip_ratio", "prompt_length/mean",
    "rewards/accuracy_reward/mean", "rewards/accuracy_reward/std", "completions/mean_length",
    "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/region_mean", "kl", "entropy",
    "num_tokens", "grad_norm", "learning_rate", "loss", "train/loss", "eval/loss",
    # ours
    "reward/think", "reward/no_think", "length/think", "length/no_think", "think_rate/auto",
    "advantage/mean", "advantage/std", "clip_frac", "is_ratio/mean", "time/rollout(s)",
    "time/reward(s)", "time/train(s)", "time/sync(s)", "acc[auto]", "acc[think]", "acc[no_think]",
    "accuracy%", "think%", "tokens/s", "sync/max_abs_logprob_diff", "lr/vision", "lr/projector",
    "lr/llm", "reward/think@8", "reward/no_think@8", "auto/math_accuracy", "no_think/math_accuracy",
]


def test_realistic_names_stay_distinct():
    out = [sanitize_metric_name(n) for n in PEER_NAMES]
    assert len(set(PEER_NAMES)) == len(PEER_NAMES)
    assert len(set(out)) == len(out), sorted(n for n in out if out.count(n) > 1)
    for n in out:
        _mlflow_accepts(n)
    assert sanitize_metric_name("timing(s)/gen") == "timing_s_/gen"
    assert sanitize_metric_name("val-core/math/acc/mean@8") == "val-core/math/acc/mean_at_8"
    assert sanitize_metric_name("accuracy%") == "accuracy_pct"


_WORDS = st.sampled_from(["reward", "think", "no_think", "auto", "length", "acc", "loss", "kl", "clip",
                          "timing", "gen", "ref", "mean", "std", "max", "min", "actor", "critic", "lr",
                          "entropy", "val", "train", "eval", "math", "perception", "score", "tokens"])
_DECOR = st.sampled_from(["", "@1", "@4", "@8", "@16", "(s)", "(ms)", "%", "[think]", "[no_think]", "/mean"])


@settings(max_examples=300, deadline=None)
@given(st.sets(st.builds(lambda ws, d, sep: sep.join(ws) + d,
                         st.lists(_WORDS, min_size=1, max_size=4), _DECOR, st.sampled_from(["/", "_", "-", "."])),
               min_size=2, max_size=60))
def test_generated_realistic_sets_stay_distinct(names):
    out = {sanitize_metric_name(n) for n in names}
    assert len(out) == len(names)


def test_long_names_are_cut_and_stay_distinct():
    a, b = "m/" + "x" * 300 + "a", "m/" + "x" * 300 + "b"
    sa, sb = sanitize_metric_name(a), sanitize_metric_name(b)
    assert len(sa) <= MAX_NAME_LENGTH and sa != sb
    _mlflow_accepts(sa)


def test_limits_match_installed_mlflow():
    from mlflow.utils import validation as v

    assert (MAX_NAME_LENGTH, MAX_PARAM_VALUE_LENGTH, MAX_TAG_VALUE_LENGTH) == (
        v.MAX_ENTITY_KEY_LENGTH, v.MAX_PARAM_VAL_LENGTH, v.MAX_TAG_VAL_LENGTH)


# -- params and URIs ---------------------------------------------------------------------------
def test_flatten_params_nested_model_and_truncation():
    cfg = RunConfig()
    flat = flatten_params(cfg.anneal)
    assert flat["optim.lr"] == "4e-05" and flat["distributed.deepspeed"] == "none"
    assert flat["optim.betas"] == "[0.9, 0.95]" and flat["packing"] == "true"
    nested = flatten_params({"a": {"b": {"c": 1}}, "s": "x" * 10_000, "e": {}, "n": None})
    assert nested["a.b.c"] == "1" and len(nested["s"]) == MAX_PARAM_VALUE_LENGTH
    assert nested["e"] == "{}" and nested["n"] == "null"


def test_tracking_uri_defaults_to_sqlite_in_the_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    local = RunConfig(name="demo", storage={"root": str(tmp_path / "out")})
    assert tracking_uri(local) == f"sqlite:///{tmp_path}/out/demo/mlflow.db"
    file_uri = RunConfig(name="demo", storage={"root": (tmp_path / "out2").as_uri()})
    assert tracking_uri(file_uri) == f"sqlite:///{tmp_path}/out2/demo/mlflow.db"
    relative = RunConfig(name="demo")  # root "./runs"
    assert tracking_uri(relative) == f"sqlite:///{tmp_path}/runs/demo/mlflow.db"
    s3 = RunConfig(name="demo", storage={"root": "s3://bucket/prefix"})
    assert tracking_uri(s3) == f"sqlite:///{tmp_path}/runs/demo/mlflow.db"
    assert local_run_dir(s3).as_posix() == "runs/demo"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.kubeflow:5000")
    assert tracking_uri(s3) == "http://mlflow.kubeflow:5000"
    explicit = RunConfig(name="demo", tracking={"uri": "http://127.0.0.1:5000"})
    assert tracking_uri(explicit) == "http://127.0.0.1:5000"


# -- a real SQLite store --------------------------------------------------------------------------
@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def sqlite_root(tmp_path_factory):
    """One run folder (so one SQLite database: creating its tables takes seconds) per module."""
    return tmp_path_factory.mktemp("sqlite-runs")


def test_sqlite_pipeline_with_nested_stages(sqlite_root, clean_env):
    from mlflow import MlflowClient

    tmp_path = sqlite_root
    cfg = RunConfig(name="unit", storage={"root": str(tmp_path)})
    with Tracker(cfg) as tracker:
        assert tracker.uri == f"sqlite:///{tmp_path}/unit/mlflow.db"
        tracker.log_params({"seed": 0})
        with tracker.stage("anneal") as run:
            run.log_params(cfg.anneal)
            for step in range(3):
                run.log_metrics({"timing(s)/gen": 0.5 * step, "acc@8": step / 10, "skip": "n/a"}, step=step)
            run.log_dict({"k": [1, 2]}, "samples/a.json")
        with pytest.raises(RuntimeError):
            with tracker.stage("bpo"):
                raise RuntimeError("diverged")
        pipeline_id = tracker.run_id

    client = MlflowClient(tracker.uri)
    pipeline = client.get_run(pipeline_id)
    assert pipeline.info.status == "FINISHED" and pipeline.data.params == {"seed": "0"}
    assert pipeline.info.run_name.startswith("unit-")
    children = {r.info.run_name: r for r in client.search_runs(
        [pipeline.info.experiment_id], f"tags.mlflow.parentRunId = '{pipeline_id}'")}
    assert set(children) == {"anneal", "bpo"}
    anneal = children["anneal"]
    assert anneal.info.status == "FINISHED" and children["bpo"].info.status == "FAILED"
    assert anneal.data.params["optim.lr"] == "4e-05"
    assert sorted(anneal.data.metrics) == ["acc_at_8", "timing_s_/gen"]
    assert [(m.step, m.value) for m in client.get_metric_history(anneal.info.run_id, "acc_at_8")] == [
        (0, 0.0), (1, 0.1), (2, 0.2)]
    assert [f.path for f in client.list_artifacts(anneal.info.run_id, "samples")] == ["samples/a.json"]
    artifact_root = tmp_path / "unit" / "mlartifacts"  # next to the database, not in the CWD
    assert list(artifact_root.rglob("a.json"))
    assert not (tmp_path / "unit" / "mlflow-spool").exists()


def test_unknown_mlflow_run_id_is_one_clear_line(sqlite_root, clean_env, monkeypatch):
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    cfg = RunConfig(name="unit", storage={"root": str(sqlite_root)})
    with pytest.raises(TrackingError, match=r"^MLFLOW_RUN_ID=0123456789abcdef0123456789abcdef: no such run at "
                                            r"sqlite:///.*; unset MLFLOW_RUN_ID"):
        Tracker(cfg)


def test_pipeline_tracker_joins_one_pipeline_run_per_pipeline_id(sqlite_root, clean_env, monkeypatch):
    from mlflow import MlflowClient

    from r4b_core.tracking import pipeline_tracker

    monkeypatch.delenv("R4B_PIPELINE_RUN_ID", raising=False)
    cfg = RunConfig(name="unit", storage={"root": str(sqlite_root)})
    monkeypatch.setenv("RANK", "1")
    assert pipeline_tracker(cfg, "kfp-123") is None  # one writer per run: rank 0
    monkeypatch.setenv("RANK", "0")
    first = pipeline_tracker(cfg, "kfp-123")  # e.g. the curate task's process
    with first.stage("curate") as run:
        run.log_metrics({"kept": 10})
    first.close()
    monkeypatch.setenv("R4B_PIPELINE_RUN_ID", "kfp-123")
    second = pipeline_tracker(cfg)  # a later task of the same pipeline run
    assert second.run_id == first.run_id
    with second.stage("eval"):
        pass
    second.close()
    client = MlflowClient(first.uri)
    exp = client.get_run(first.run_id).info.experiment_id
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{first.run_id}'")
    assert sorted(r.info.run_name for r in children) == ["curate", "eval"]
    other = pipeline_tracker(cfg, "kfp-456")  # another pipeline run: another parent
    assert other.run_id not in (None, first.run_id)
    other.close()


# -- a server that is not there ---------------------------------------------------------------------


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_unreachable_server_never_stops_training(tmp_path, clean_env, caplog):
    cfg = RunConfig(name="offline", storage={"root": str(tmp_path)})
    caplog.set_level(logging.WARNING, logger="r4b.tracking")
    t0 = time.monotonic()
    tracker = Tracker(cfg, uri=dead_uri(), retry_interval_s=60)
    with tracker.stage("anneal") as run:
        for step in range(300):
            run.log_metrics({"loss": 1.0 / (step + 1), "acc@8": step}, step=step)
        run.log_params({"lr": 1e-4})
    tracker.close()
    elapsed = time.monotonic() - t0
    assert elapsed < 20, f"logging against a dead server took {elapsed:.1f} s"
    assert not tracker.online and tracker.run_id is None
    recs = _records(tmp_path / "offline" / PENDING_FILE)
    metrics = [r for r in recs if r["type"] == "metric"]
    assert len(metrics) == 600 and tracker.spilled == 600
    assert [r["step"] for r in metrics if r["key"] == "acc_at_8"] == list(range(300))  # in order
    assert {r["run_name"] for r in metrics} == {"anneal"}
    assert [r for r in recs if r["type"] == "param"] and [r for r in recs if r["type"] == "end"]
    unreachable = [r for r in caplog.records if "unreachable (" in r.getMessage() and "buffered" in r.getMessage()]
    spilled = [r for r in caplog.records if "NOT in MLflow" in r.getMessage()]
    assert len(unreachable) == 1 and len(spilled) == 1
    assert str(tmp_path / "offline" / PENDING_FILE) in spilled[0].getMessage()


def test_buffer_overflow_spills_once(tmp_path, clean_env, caplog):
    cfg = RunConfig(name="overflow", storage={"root": str(tmp_path)})
    caplog.set_level(logging.WARNING, logger="r4b.tracking")
    tracker = Tracker(cfg, uri=dead_uri(), max_buffered=50, retry_interval_s=60)
    for step in range(120):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert tracker.spilled >= 100  # overflowed twice: 51 + 51 metrics spilled, the rest buffered
    buffered = sum(len(r.metrics) for r in tracker._runs)
    assert buffered <= 50
    tracker.close()
    steps = [r["step"] for r in _records(tmp_path / "overflow" / PENDING_FILE) if r["type"] == "metric"]
    assert steps == list(range(120))  # nothing lost, nothing duplicated, in order
    assert sum("NOT in MLflow" in r.getMessage() for r in caplog.records) == 1


def test_colliding_metric_names_are_reported(tmp_path, clean_env, caplog):
    cfg = RunConfig(name="collide", storage={"root": str(tmp_path)})
    caplog.set_level(logging.WARNING, logger="r4b.tracking")
    tracker = Tracker(cfg, uri=dead_uri(), retry_interval_s=60)
    tracker.log_metrics({"acc(think)": 1.0, "acc[think]": 2.0, "acc@8": 3.0}, step=0)
    tracker.log_metrics({"acc[think]": 2.0}, step=1)
    tracker.close()
    warnings = [r.getMessage() for r in caplog.records if "both map to" in r.getMessage()]
    assert warnings == ["tracking: metrics 'acc(think)' and 'acc[think]' both map to MLflow name 'acc_think_'; "
                        "rename one of them"]
