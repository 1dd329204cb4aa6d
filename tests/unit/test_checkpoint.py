"""Checkpoints that do not load (training/checkpoint.py `resume`): real checkpoints of a small torch
model, optimizer and scheduler, damaged on disk (or on S3) the ways a crash, a full disk or a bad
copy damages them. Each is reported in one line, set aside (renamed, kept) and the run resumes from
the newest checkpoint that loads. optim.pt and bytes between ranks are read weights-only: a planted
pickle that would run code is refused.
"""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from r4b_core.storage import COMPLETE_MARKER, Store, local_dir_of
from r4b_core.training import checkpoint as ckpt
from r4b_core.training.distributed import DistEnv, UnsafePayloadError, safe_load
from training_helpers import small_trainee, world_of_one


def _train(store: Store, root: str, trainee: ckpt.Trainee, env: DistEnv, steps: int) -> list[list[torch.Tensor]]:
    """Save after each step; returns the weights at each checkpoint."""
    weights = []
    for step in range(1, steps + 1):
        loss = (trainee.engine or trainee.model)(torch.ones(2, 8)).pow(2).mean()
        if trainee.engine is not None:
            trainee.engine.backward(loss)
            trainee.engine.step()
        else:
            loss.backward()
            trainee.optimizer.step()
            trainee.optimizer.zero_grad()
        trainee.scheduler.step()
        ckpt.save(store, root, step, trainee, env, {"config_hash": "h"})
        weights.append([p.detach().clone() for p in trainee.model.parameters()])
    return weights


class _RunsCode:
    """What an attacker with write access to the checkpoints prefix would plant in optim.pt."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (open, (self.flag, "w"))


def _reseal(folder) -> None:
    """Rewrite the marker's checksums for the folder's current files (an attacker who can write
    the prefix can write the marker too)."""
    import hashlib

    marker = json.loads((folder / COMPLETE_MARKER).read_text())
    marker["sha256"] = {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in marker["files"]}
    (folder / COMPLETE_MARKER).write_text(json.dumps(marker))


def _damage(folder, how: str, tmp_path) -> None:
    model, optim, state = folder / "model.safetensors", folder / "optim.pt", folder / "state.json"
    if how == "truncated model.safetensors":
        model.write_bytes(model.read_bytes()[:100])
    elif how == "empty model.safetensors":
        model.write_bytes(b"")
    elif how == "truncated optim.pt":
        optim.write_bytes(optim.read_bytes()[:len(optim.read_bytes()) // 2])
    elif how == "bit-flipped optim.pt":
        data = bytearray(optim.read_bytes())
        data[len(data) // 2] ^= 0x10
        optim.write_bytes(bytes(data))
    elif how == "state.json {":
        state.write_text("{")
    elif how == "missing optim.pt":
        optim.unlink()
    elif how == "pickled payload in optim.pt":
        torch.save({"optimizer": [_RunsCode(tmp_path / "pwned")], "scheduler": {}, "rng": []}, optim)
        _reseal(folder)
    else:
        raise AssertionError(how)


DAMAGE = ["truncated model.safetensors", "empty model.safetensors", "truncated optim.pt", "bit-flipped optim.pt",
          "state.json {", "missing optim.pt", "pickled payload in optim.pt"]


# Without checksums (a marker from before they existed) a flipped bit in tensor data goes unseen.
@pytest.mark.parametrize("how, checksums", [(how, True) for how in DAMAGE]
                         + [(how, False) for how in DAMAGE if how != "bit-flipped optim.pt"])
def test_damaged_latest_checkpoint_is_set_aside_and_the_previous_one_resumes(tmp_path, how, checksums):
    store, env = Store(), DistEnv()
    root = str(tmp_path / "ckpts")
    weights = _train(store, root, small_trainee(0), env, steps=2)
    folders = {s: local_dir_of(u) for s, u in ckpt.list_checkpoints(store, root)}
    if not checksums:       # a checkpoint written before markers carried checksums
        for folder in folders.values():
            marker = json.loads((folder / COMPLETE_MARKER).read_text())
            marker.pop("sha256")
            (folder / COMPLETE_MARKER).write_text(json.dumps(marker))
    _damage(folders[2], how, tmp_path)

    said, fresh = [], small_trainee(1)
    uri, state = ckpt.resume(store, root, fresh, env, tmp_path / "cache", say=said.append)
    assert uri == f"{root}/step-000001" and state["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), weights[0]))
    assert len(said) == 1 and "\n" not in said[0], said
    assert said[0].startswith(f"checkpoint {root}/step-000002 is unreadable (")
    assert said[0].endswith("trying the previous one")
    reason = said[0].split(" is unreadable (", 1)[1]
    expected = {"truncated model.safetensors": "model.safetensors", "empty model.safetensors": "model.safetensors",
                "truncated optim.pt": "optim.pt", "bit-flipped optim.pt": "optim.pt", "state.json {": "state.json",
                "missing optim.pt": "optim.pt: missing", "pickled payload in optim.pt": "optim.pt: refused"}[how]
    assert reason.startswith(expected), reason
    # Set aside, not deleted: renamed out of the resume order, files and the reason kept.
    kept = [p for p in (tmp_path / "ckpts").iterdir() if p.name.startswith("step-000002.unreadable-")]
    assert len(kept) == 1 and (kept[0] / "UNREADABLE.txt").read_text().startswith(expected)
    assert ckpt.list_checkpoints(store, root) == [(1, f"{root}/step-000001")]
    assert not (tmp_path / "pwned").exists()


def test_no_loadable_checkpoint_starts_fresh_and_a_config_mismatch_is_not_damage(tmp_path):
    store, env = Store(), DistEnv()
    root = str(tmp_path / "ckpts")
    _train(store, root, small_trainee(0), env, steps=1)

    def refuse(uri, state):
        raise ckpt.CheckpointError(f"{uri}: another config")

    with pytest.raises(ckpt.CheckpointError, match="another config"):
        ckpt.resume(store, root, small_trainee(1), env, tmp_path / "cache", accept=refuse)
    assert ckpt.latest(store, root) == (1, f"{root}/step-000001")     # a misfit is not set aside
    (local_dir_of(root) / "step-000001" / "state.json").write_text("{")
    said = []
    assert ckpt.resume(store, root, small_trainee(1), env, tmp_path / "cache", say=said.append) is None
    assert len(said) == 1 and ckpt.latest(store, root) is None


def test_damaged_checkpoint_on_s3_is_found_by_its_checksum(s3_store, s3_root, tmp_path):
    """On S3 the checksum is checked on the downloaded copy; the damaged folder is moved aside
    object by object."""
    env = DistEnv()
    root = f"{s3_root}/anneal/checkpoints"
    weights = _train(s3_store, root, small_trainee(0), env, steps=2)
    optim = f"{root}/step-000002/optim.pt"
    data = bytearray(s3_store.read_bytes(optim))
    data[len(data) // 2] ^= 0x10
    s3_store.write_bytes(optim, bytes(data))
    said, fresh = [], small_trainee(1)
    uri, _ = ckpt.resume(s3_store, root, fresh, env, tmp_path / "cache", say=said.append)
    assert uri == f"{root}/step-000001"
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), weights[0]))
    assert "optim.pt: content differs from its checksum in _COMPLETE" in said[0]
    names = {u[len(root) + 1:].split("/")[0] for u in s3_store.list(root)}
    aside = [n for n in names if n.startswith("step-000002.unreadable-")]
    assert len(aside) == 1 and names == {"step-000001", aside[0]}
    assert s3_store.read_bytes(f"{root}/{aside[0]}/optim.pt") == bytes(data)   # kept as it was


def test_zero2_checkpoint_loads_weights_only_and_falls_back(tmp_path, monkeypatch):
    """A ZeRO-2 optimizer state (DeepSpeed's loss scaler, stage enum and offsets inside) passes the
    weights-only reader; a damaged newest one is set aside as for plain training. The resume runs
    in a second process group of this process, as repro runs anneal then BPO: the first group's
    teardown must leave DeepSpeed no dead group behind."""
    from r4b_core.training.zero import deepspeed_engine

    def zero2(seed):
        t = small_trainee(seed)
        engine, opt = deepspeed_engine(t.model, t.optimizer, stage=2, grad_accum=1, grad_clip=1.0, use_bf16=False)
        return ckpt.Trainee(model=engine.module, optimizer=opt, scheduler=t.scheduler, engine=engine)

    store, root = Store(), str(tmp_path / "ckpts")
    with world_of_one(monkeypatch) as env:
        weights = _train(store, root, zero2(0), env, steps=2)
    (local_dir_of(root) / "step-000002" / "model.safetensors").write_bytes(b"")
    with world_of_one(monkeypatch) as env:
        said, fresh = [], zero2(1)
        uri, state = ckpt.resume(store, root, fresh, env, tmp_path / "cache", say=said.append)
    assert uri == f"{root}/step-000001" and state["step"] == 1
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), weights[0]))
    assert "model.safetensors: content differs from its checksum" in said[0]


def test_payload_from_a_peer_rank_is_refused_in_one_line(tmp_path):
    """safe_load reads what gather_objects / broadcast_object receive from other ranks."""
    import io

    buf = io.BytesIO()
    torch.save({"rng": _RunsCode(tmp_path / "pwned")}, buf)
    with pytest.raises(UnsafePayloadError) as info:
        safe_load(buf.getvalue(), "data from rank 1")
    msg = str(info.value)
    assert msg.startswith("data from rank 1: refused: it names Python objects that are not tensors or plain "
                          "data (io.open)") and "\n" not in msg
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(UnsafePayloadError, match=r"^data from rank 1: unreadable \("):
        safe_load(pickle.dumps([1, 2]), "data from rank 1")     # bare pickle, not torch.save bytes
    buf = io.BytesIO()
    torch.save({"t": torch.arange(3), "py": (3, (1, 2), None), "s": "x"}, buf)
    assert safe_load(buf.getvalue(), "x")["py"] == (3, (1, 2), None)
