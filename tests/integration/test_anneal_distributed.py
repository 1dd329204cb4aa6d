"""`r4b anneal` under torchrun on CPU (gloo), as a PyTorchJob pod runs it: 2-process DDP,
a SIGKILL mid-training and an automatic resume, and DeepSpeed ZeRO-2 (with its own resume).

Each run is a real `python -m torch.distributed.run --standalone --nproc-per-node 2 -m r4b_core.cli
anneal ...` on the tiny VLM and synthetic data; rank 0 logs to a real MLflow SQLite store.
The single-process reference runs in this process: with the same global batch the 2-process
curves must equal it (token-mean loss over the global step, gradients averaged by DDP / ZeRO).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_anneal import make_run  # noqa: E402

from r4b_core.config import dump_config  # noqa: E402

STEP_RE = re.compile(r"^step (\d+)/(\d+) loss ([0-9.]+)")


def _torchrun(cfg, data, base, out, extra: list[str] | None = None) -> list[str]:
    cfg_path = Path(out).parents[2] / f"{Path(out).parent.name}.yaml"
    cfg_path.write_text(dump_config(cfg))
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "r4b_core.cli", "anneal", "--config", str(cfg_path), "--train", str(data),
            "--base-model", str(base), "--out", str(out), *(extra or [])]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
            "DS_ACCELERATOR": "cpu", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"}


def _run(cmd: list[str], timeout: float = 600) -> str:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and its descendants (torchrun starts each rank in its own session)."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    kids = parent.children(recursive=True)
    for p in [parent, *kids]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    psutil.wait_procs(kids, timeout=30)  # not the parent: Popen.wait must still see its exit status


def _losses(output: str) -> dict[int, float]:
    return {int(m.group(1)): float(m.group(3)) for m in map(STEP_RE.match, output.splitlines()) if m}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A 1-process run with the 2-process runs' global batch (2 rows per step); its loss curve."""
    import torch

    from r4b_core.anneal import run_anneal

    root = tmp_path_factory.mktemp("anneal-dist")
    cfg, data, base, out = make_run(root, steps=12, micro_batch_size=2, checkpoint_every=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        manifest = run_anneal(cfg, str(data), str(base), str(out))
    finally:
        torch.set_num_threads(threads)
    return root, cfg, data, base, [h["loss"] for h in manifest["loss_curve"]]


def test_ddp_two_processes_match_one_process_and_log_to_mlflow(reference):
    import mlflow

    root, cfg, data, base, ref = reference
    cfg = cfg.model_copy(deep=True)
    cfg.anneal.micro_batch_size = 1  # 2 ranks x 1 row = the reference's 2 rows per step
    out = root / "runs" / "t" / "ddp" / "model"
    output = _run(_torchrun(cfg, data, base, out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["deepspeed"] == "none"
    curve = [h["loss"] for h in manifest["loss_curve"]]
    assert curve == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert curve[-1] < curve[0] - 1.0
    # rank 0 alone printed the step lines
    assert sum(1 for line in output.splitlines() if STEP_RE.match(line)) == 12
    # MLflow got the stage run with per-step loss per mode, LR per group, throughput and waste
    client = mlflow.tracking.MlflowClient(f"sqlite:///{root / 'runs' / 't' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.mlflow.runName = 'anneal'")
    assert runs, [r.info.run_name for r in client.search_runs([exp.experiment_id])]
    run = runs[0]
    hist = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in hist] == list(range(1, 13))
    for key in ("loss_think", "loss_direct", "lr_llm", "lr_vision", "lr_projector", "tokens_per_s", "padding_waste"):
        assert key in run.data.metrics, key
    assert float(run.data.params["data.reasoning_ratio"]) == 0.5


def test_sigkill_mid_training_then_restart_resumes_from_last_checkpoint(reference):
    from r4b_core.storage import Store

    root, cfg, data, base, _ = reference
    cfg = cfg.model_copy(deep=True)
    cfg.anneal.micro_batch_size = 1
    cfg.anneal.steps = 40
    cfg.anneal.checkpoint_every = 4
    cfg.anneal.keep_checkpoints = 2
    out = root / "runs" / "t" / "killed" / "model"
    ckpts = out.parent / "checkpoints"
    cmd = _torchrun(cfg, data, base, out)

    # Run 1: SIGKILL the agent and both ranks (as a lost node) two steps after a checkpoint.
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first: list[str] = []
    checkpointed = None
    deadline = time.time() + 600
    try:
        for line in proc.stdout:
            first.append(line)
            if line.startswith("checkpoint ") and checkpointed is None:
                checkpointed = int(line.rsplit("step-", 1)[1])
            m = STEP_RE.match(line)
            if checkpointed and m and int(m.group(1)) >= checkpointed + 2:
                break
            assert time.time() < deadline, "".join(first[-20:])
    finally:
        _kill_tree(proc.pid)
        proc.wait(timeout=60)
        dead = proc.stdout.read()
    assert proc.returncode == -signal.SIGKILL, "".join(first[-30:])
    killed = _losses("".join(first) + dead)
    last_killed = max(killed)
    assert last_killed < 40, "the run finished before it was killed"
    assert not (out / "manifest.json").exists()

    # Nothing partial is visible: every checkpoint folder that lists as complete loads its state.
    store = Store.from_config(cfg.storage)
    complete = store.list_complete(str(ckpts))
    assert complete, sorted(os.listdir(ckpts))
    for uri in complete:
        state = json.loads(store.read_text(uri + "/state.json"))
        assert {"model.safetensors", "optim.pt", "state.json", "_COMPLETE"} <= set(os.listdir(uri))
        assert state["step"] % 4 == 0
    visible = [d for d in os.listdir(ckpts) if not d.startswith(".")]
    assert sorted(visible) == sorted(Path(u).name for u in complete)
    resume_step = max(int(Path(u).name.split("-")[1]) for u in complete)

    # Run 2: the same command resumes by itself from the last complete checkpoint.
    second = _run(cmd)
    m = re.search(r"resumed from \S+step-(\d+) \(step (\d+)\)", second)
    assert m and int(m.group(2)) == resume_step, second[-3000:]
    resumed = _losses(second)
    assert min(resumed) == resume_step + 1 and max(resumed) == 40
    # no step trained twice beyond the checkpoint interval ...
    # (0 when the kill landed right after a checkpoint was published)
    assert 0 <= last_killed - resume_step <= cfg.anneal.checkpoint_every
    # ... and the loss curve continues: the re-trained steps give the same losses as before the kill
    for step in range(resume_step + 1, last_killed + 1):
        assert resumed[step] == pytest.approx(killed[step], abs=2e-4), step
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == resume_step and manifest["steps_this_run"] == 40 - resume_step
    curve = manifest["loss_curve"]
    assert [h["step"] for h in curve] == list(range(1, 41))
    for h in curve[:resume_step]:
        assert h["loss"] == pytest.approx(killed[h["step"]], abs=1e-4)
    assert len(store.list_complete(str(ckpts))) == 2  # keep_checkpoints


@pytest.mark.slow
def test_deepspeed_zero2_on_cpu_matches_ddp_and_resumes(reference):
    """Marked slow: each DeepSpeed start-up costs ~30 s more than DDP on 2 loaded cores."""
    root, cfg, data, base, ref = reference
    cfg = cfg.model_copy(deep=True)
    cfg.anneal.micro_batch_size = 1
    cfg.anneal.distributed.deepspeed = "zero2"
    out = root / "runs" / "t" / "zero2" / "model"
    output = _run(_torchrun(cfg, data, base, out))
    assert "all_gather_into_tensor" not in output  # our filter of DeepSpeed's deprecation noise
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["deepspeed"] == "zero2" and manifest["world_size"] == 2
    curve = [h["loss"] for h in manifest["loss_curve"]]
    assert curve == pytest.approx(ref, rel=1e-4, abs=1e-5)
    # Resume from the step-8 checkpoint (sharded optimizer state) after losing the last one:
    # steps 9-12 must repeat exactly.
    ckpts = out.parent / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step-000004", "step-000008"]
    (out / "manifest.json").unlink()
    again = _run(_torchrun(cfg, data, base, out))
    assert re.search(r"resumed from \S+step-000008 \(step 8\)", again), again[-3000:]
    resumed = _losses(again)
    assert sorted(resumed) == [9, 10, 11, 12]
    for step, loss in resumed.items():
        assert loss == pytest.approx(curve[step - 1], abs=2e-4)


def test_anneal_on_s3_publishes_checkpoints_atomically_and_resumes_from_them(s3_env, s3_store, s3_root, tmp_path):
    """Data, base model, checkpoints and output all on a real S3 server (SeaweedFS)."""
    import torch

    from r4b_core.anneal import run_anneal

    cfg, data, base, _ = make_run(tmp_path, n_records=6, steps=6, checkpoint_every=3)
    cfg.storage.root = s3_root
    cfg.storage.s3_endpoint_url = s3_env.endpoint_url
    s3_store.upload_dir(data.parent, f"{s3_root}/data")
    s3_store.upload_dir(base, f"{s3_root}/base")
    train, model, out = f"{s3_root}/data/sft.jsonl", f"{s3_root}/base", f"{s3_root}/anneal/model"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        first = run_anneal(cfg, train, model, out)
        ckpts = s3_store.list_complete(f"{s3_root}/anneal/checkpoints")
        assert ckpts == [f"{s3_root}/anneal/checkpoints/step-000003"]
        assert s3_store.exists(f"{ckpts[0]}/optim.pt") and s3_store.exists(f"{out}/model.safetensors")
        assert s3_store.read_manifest(out)["config_hash"] == first["config_hash"]
        # lose the finished output: the rerun resumes from the S3 checkpoint and repeats steps 4-6
        s3_store.delete(f"{out}/manifest.json")
        again = run_anneal(cfg, train, model, out)
    finally:
        torch.set_num_threads(threads)
    assert again["resumed_from_step"] == 3 and again["steps_this_run"] == 3
    assert [h["loss"] for h in again["loss_curve"]] == pytest.approx([h["loss"] for h in first["loss_curve"]], abs=1e-5)
