"""Pipeline faults around the tracking server: the real `mlflow server` is SIGKILLed while a
training stage runs, as the local launcher runs it (`stage_command`: `python -m r4b_core.cli
<stage> --config <URI>` with the pipeline run id in its environment).

1. anneal: the server dies mid-training and comes back on the same port and database while the
   stage still runs -> the stage finishes, every step's metrics are in MLflow (buffered, then sent).
2. BPO: the server dies mid-training and stays down until the stage ends -> the stage finishes and
   prints one line naming the spilled metrics and their file; when the server is back, the next
   stage's tracker sends them and removes the file.

The restart is made to land while anneal is still training by pausing the stage's process group
(SIGSTOP) during the ~10-40 s the server takes to start here; training itself never waits on MLflow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from r4b_core import layout
from r4b_core.config import load_config

REPO = Path(__file__).resolve().parents[2]

STEPS = 20
MICRO = [
    "data.synthetic.train_size=24", "data.synthetic.rl_size=8", "data.synthetic.eval_size=4",
    "model.pretrain.steps=0", f"anneal.steps={STEPS}", "anneal.log_every=1", "anneal.checkpoint_every=100", "anneal.compliance_samples=2",
    "anneal.optim.warmup_steps=1", "anneal.distributed.nproc_per_node=1", "anneal.pack_length=256",
    "bpo.steps=5", "bpo.prompts_per_step=2", "bpo.group_size=2", "bpo.micro_batch_size=8", "bpo.engine=hf",
    "bpo.max_new_tokens_think=8", "bpo.max_new_tokens_no_think=4", "bpo.probe_size=2", "bpo.probe_every=100",
    "bpo.checkpoint_every=100",
]


class Stage:
    """A stage process whose output lines are collected (with arrival times) as they come."""

    def __init__(self, stage: str, cfg, config_uri: str, env: dict, cwd: Path) -> None:
        from r4b_core.launch.local import stage_command

        cmd = stage_command(stage, config_uri, [], getattr(cfg, stage).distributed)
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, needle: str, timeout_s: float = 240.0, after: float = 0.0) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if t >= after and needle in line:
                    return t
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"no line with {needle!r}; output:\n{self.text()[-4000:]}")

    def wait_count(self, prefix: str, n: int, after: float, timeout_s: float = 240.0) -> None:
        """Until `n` lines starting with `prefix` arrived after time `after`."""
        deadline = time.monotonic() + timeout_s
        while sum(t > after and line.startswith(prefix) for t, line in list(self.lines)) < n:
            if time.monotonic() > deadline or (self.proc.poll() is not None and not self._reader.is_alive()):
                raise AssertionError(f"fewer than {n} {prefix!r} lines; output:\n{self.text()[-4000:]}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def finish(self, timeout_s: float = 300.0) -> int:
        rc = self.proc.wait(timeout=timeout_s)
        self._reader.join(timeout=10)
        return rc

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _kill(server) -> None:
    """SIGKILL, no grace: the server vanishes mid-request."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.stop(grace_s=0)


def _sft_records(cfg, store) -> None:
    """Curated data without the curate stage: the train split, half thinking and half direct."""
    from r4b_core.curate import resolve_ref
    from r4b_core.data.schema import Record

    train = layout.split_uri(cfg, "train")
    rows = []
    for i, line in enumerate(store.read_text(train).splitlines()):
        rec = Record.model_validate_json(line)
        rows.append(rec.model_copy(update={"label": "reasoning" if i % 2 else "direct",
                                           "images": [resolve_ref(train, im) for im in rec.images]}))
    store.write_text(layout.curated_uri(cfg), "".join(r.model_dump_json() + "\n" for r in rows))


def _history(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def _stage_run(client, exp_id: str, stage: str):
    runs = client.search_runs([exp_id], f"tags.`r4b.stage` = '{stage}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


@pytest.mark.timeout(600)
def test_training_survives_mlflow_outages_and_nothing_is_lost(mlflow_server, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from r4b_core.prepare import run_prepare
    from r4b_core.storage import Store
    from r4b_core.tracking import PENDING_FILE, local_run_dir, pipeline_tracker

    experiment = f"faults-{uuid.uuid4().hex[:8]}"
    cfg = load_config(REPO / "configs/tiny.yaml", [*MICRO, f"storage.root={tmp_path / 'runs'}",
                                                   f"tracking.uri={mlflow_server.uri}",
                                                   f"tracking.experiment={experiment}"])
    store = Store.from_config(cfg.storage)
    config_uri = run_prepare(cfg, store)["config_uri"]
    _sft_records(cfg, store)
    pid = f"faults-{uuid.uuid4().hex[:6]}"
    for name in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    env = {**os.environ, "R4B_PIPELINE_RUN_ID": pid}  # what the launcher passes to a stage
    client = MlflowClient(mlflow_server.uri)
    spill = local_run_dir(cfg) / PENDING_FILE
    t0 = time.monotonic()

    # -- 1. anneal: down mid-training, back before the stage ends -------------------------------
    anneal = Stage("anneal", cfg, config_uri, env, tmp_path)
    anneal.wait_for(f"step 2/{STEPS}")
    anneal.signal(signal.SIGSTOP)  # steps take ~0.1 s: hold it while the server goes
    _kill(mlflow_server)
    killed = time.monotonic()
    anneal.signal(signal.SIGCONT)
    anneal.wait_count("step ", 3, after=killed)  # training goes on while the server is gone
    anneal.signal(signal.SIGSTOP)
    try:
        mlflow_server.start()
    finally:
        anneal.signal(signal.SIGCONT)
    assert anneal.finish() == 0, anneal.text()[-4000:]
    steps_while_down = [line for t, line in anneal.lines if t > killed and line.startswith("step ")]
    assert len(steps_while_down) >= 3, anneal.text()
    out = anneal.text()
    assert "unreachable" in out and "training continues" in out, out[-3000:]
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    run = _stage_run(client, exp_id, "anneal")
    assert run.info.status == "FINISHED"
    assert _history(client, run.info.run_id, "loss") == list(range(1, STEPS + 1)), "steps lost in the outage"
    assert not spill.exists(), spill.read_text()[:2000]
    anneal_s = time.monotonic() - t0

    # -- 2. BPO: down mid-training and still down when it ends ----------------------------------
    bpo = Stage("bpo", cfg, config_uri, env, tmp_path)
    bpo.wait_for("bpo step 1/5")
    _kill(mlflow_server)
    try:
        assert bpo.finish() == 0, bpo.text()[-4000:]
        out = bpo.text()
        notice = [line for line in out.splitlines() if "NOT in MLflow" in line]
        assert len(notice) == 1, out[-3000:]
        assert str(spill) in notice[0] and "reward/think" in notice[0] and "of run bpo" in notice[0], notice[0]
        records = [json.loads(line) for line in spill.read_text().splitlines()]
        spilled_steps = sorted({r["step"] for r in records if r["type"] == "metric" and r["key"] == "reward/think"})
        assert spilled_steps and spilled_steps[-1] == 4, spilled_steps  # BPO logs steps from 0
    finally:
        mlflow_server.start()

    # The next stage (eval, in the pipeline) opens its tracker: it finds the file and sends it.
    tracker = pipeline_tracker(cfg, pid)
    tracker.close()
    assert not spill.exists()
    run = _stage_run(client, exp_id, "bpo")
    assert _history(client, run.info.run_id, "reward/think") == [0, 1, 2, 3, 4]
    assert run.info.status == "FINISHED"
    print(notice[0])
    print(f"mlflow outages: anneal part {anneal_s:.0f} s, whole test {time.monotonic() - t0:.0f} s")


@pytest.mark.timeout(600)
def test_s3_down_10s_while_a_training_stage_uploads_its_model(seaweedfs, s3_env, s3_root, tmp_path):
    """SeaweedFS stopped for 10 s right before anneal publishes its model: the upload is retried,
    the stage finishes, model + manifest are complete on S3, and a rerun skips."""
    from r4b_core.prepare import run_prepare
    from r4b_core.storage import Store

    cfg = load_config(REPO / "configs/tiny.yaml", [*MICRO, f"storage.root={s3_root}",
                                                   f"storage.s3_endpoint_url={seaweedfs.endpoint_url}"])
    store = Store.from_config(cfg.storage)
    config_uri = run_prepare(cfg, store)["config_uri"]
    _sft_records(cfg, store)
    env = {**os.environ, "R4B_CACHE_DIR": str(tmp_path / "cache")}
    anneal = Stage("anneal", cfg, config_uri, env, tmp_path)
    anneal.wait_for(f"step {STEPS - 2}/{STEPS}")
    anneal.signal(signal.SIGSTOP)  # hold it before its uploads while S3 goes away
    seaweedfs.stop(grace_s=0.5)
    down_at = time.monotonic()
    anneal.signal(signal.SIGCONT)
    try:
        anneal.wait_for("retrying", after=down_at, timeout_s=60)  # the model upload hit the outage
        time.sleep(max(0.0, 10 - (time.monotonic() - down_at)))
    finally:
        seaweedfs.start()
    assert anneal.finish() == 0, anneal.text()[-4000:]
    model = layout.model_dir(cfg, "anneal")
    manifest = store.read_manifest(model)
    assert manifest is not None and manifest["steps"] == STEPS
    for name in ("model.safetensors", "config.json"):
        assert store.exists(f"{model}/{name}"), name
    rerun = Stage("anneal", cfg, config_uri, env, tmp_path)
    assert rerun.finish() == 0 and "skipped" in rerun.text(), rerun.text()[-2000:]
    assert store.read_manifest(model)["committed_at"] == manifest["committed_at"]
