"""Checkpoint pruning (training/checkpoint.py `prune`) on a local folder and on S3 (SeaweedFS).

Real checkpoints (`save` of a small torch model with its optimizer and scheduler), saved and pruned
the way the anneal and BPO loops do it: after each save, keep the newest `keep`. Old folders must be
gone file by file (not just hidden), the survivors complete and loadable.
"""

from __future__ import annotations

import pytest
import torch

from r4b_core.storage import COMPLETE_MARKER, Store
from r4b_core.training import checkpoint as ckpt
from r4b_core.training.distributed import DistEnv
from training_helpers import small_trainee


def _train_and_prune(store: Store, root: str, steps: int, keep: int) -> tuple[ckpt.Trainee, list[list[str]]]:
    trainee, env = small_trainee(0), DistEnv()
    pruned = []
    for step in range(1, steps + 1):
        loss = trainee.model(torch.ones(2, 8)).pow(2).mean()
        loss.backward()
        trainee.optimizer.step()
        trainee.scheduler.step()
        trainee.optimizer.zero_grad()
        ckpt.save(store, root, step, trainee, env, {"config_hash": "h", "loss": loss.item()})
        pruned.append(ckpt.prune(store, root, keep))
    return trainee, pruned


def _check(store: Store, root: str, trainee: ckpt.Trainee, pruned: list[list[str]], tmp_path) -> None:
    step_uri = lambda s: f"{root}/{ckpt.step_name(s)}"  # noqa: E731
    assert pruned == [[], [], [step_uri(1)], [step_uri(2)], [step_uri(3)]]
    assert ckpt.list_checkpoints(store, root) == [(4, step_uri(4)), (5, step_uri(5))]
    # The old folders are gone, not just unmarked: nothing of steps 1-3 is left anywhere.
    names = {uri[len(root):].strip("/").split("/")[0] for uri in store.list(root)}
    assert names == {ckpt.step_name(4), ckpt.step_name(5)}, sorted(store.list(root))
    for step in (4, 5):
        assert store.exists(f"{step_uri(step)}/{COMPLETE_MARKER}")
    # The newest survivor restores the trained weights exactly.
    fresh = small_trainee(1)
    state = ckpt.load(store, step_uri(5), fresh, DistEnv(), tmp_path / "cache")
    assert state["step"] == 5
    for a, b in zip(fresh.model.parameters(), trainee.model.parameters()):
        assert torch.equal(a, b)
    # keep=0 prunes nothing (it means "keep all"), pruning again is a no-op.
    assert ckpt.prune(store, root, 0) == [] and ckpt.prune(store, root, 2) == []


def test_prune_local(tmp_path):
    store = Store()
    root = str(tmp_path / "run" / "anneal" / "checkpoints")
    trainee, pruned = _train_and_prune(store, root, steps=5, keep=2)
    _check(store, root, trainee, pruned, tmp_path)
    assert sorted(p.name for p in (tmp_path / "run" / "anneal" / "checkpoints").iterdir()) == [
        ckpt.step_name(4), ckpt.step_name(5)]  # no hidden staging folders either


def test_prune_s3(s3_store, s3_root, tmp_path):
    root = f"{s3_root}/anneal/checkpoints"
    trainee, pruned = _train_and_prune(s3_store, root, steps=5, keep=2)
    _check(s3_store, root, trainee, pruned, tmp_path)


def test_prune_cut_short_leaves_no_complete_checkpoint_with_missing_files(s3_store, s3_root, tmp_path):
    """The marker goes first: a folder whose files are half deleted is never listed as complete."""
    root = f"{s3_root}/bpo/checkpoints"
    _train_and_prune(s3_store, root, steps=2, keep=0)
    victim = f"{root}/{ckpt.step_name(1)}"
    original = s3_store.delete
    calls = []

    def interrupted(uri):  # the process dies after its first delete request
        calls.append(uri)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return original(uri)

    s3_store.delete = interrupted
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune(s3_store, root, 1)
    del s3_store.delete
    assert calls[0] == f"{victim}/{COMPLETE_MARKER}"
    assert s3_store.exists(f"{victim}/state.json")  # its files are still there, but it no longer counts
    assert ckpt.latest(s3_store, root) == (2, f"{root}/{ckpt.step_name(2)}")
    assert ckpt.list_checkpoints(s3_store, root) == [(2, f"{root}/{ckpt.step_name(2)}")]
