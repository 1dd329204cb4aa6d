"""Resumable training checkpoints: atomic folders `<root>/step-NNNNNN/` on any storage URI.

A checkpoint folder holds

    model.safetensors     the full model state (consolidated from ZeRO-3 shards when needed)
    optim.pt              optimizer state (one entry per rank under DeepSpeed ZeRO, which shards it),
                          LR scheduler state, RNG states of every rank
    state.json            step, data position, config hash and the config it was written under,
                          world size, the loss history so far

Saving is collective (every rank calls `save`, rank 0 writes) and goes through
`Store.atomic_dir`, so a folder is either complete or invisible, and its `_COMPLETE` marker lists
each file's sha256; `latest` only looks at complete ones. `load` is also collective and puts each
rank's RNG and optimizer shard back; optim.pt is read with torch's weights-only unpickler, so a
planted payload cannot run code (training/distributed.safe_load).

    found = resume(store, root, trainer, env, cache, accept, say)   # (uri, state.json) or None
    save(store, root, step, trainer, env, state)   # then prune(store, root, keep)

`resume` tries the newest complete checkpoint first. One whose files are missing, damaged (checksum,
truncation, unparsable) or refused is reported in one line, set aside as
`step-NNNNNN.unreadable-<time>` (renamed, never deleted) and the next older one is tried.
`accept(uri, state)` raises for a checkpoint that reads fine but does not fit (another config).

`trainer` is a `Trainee`: the model (possibly wrapped by DDP or DeepSpeed), the optimizer and the
scheduler; the same code serves the SFT and BPO stages.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r4b_core.errors import R4BError, first_line
from r4b_core.training.distributed import (DistEnv, UnsafePayloadError, barrier, broadcast_object, gather_objects,
                                           safe_load)

STEP_RE = re.compile(r"^step-(\d{6,})$")


class CheckpointError(R4BError):
    """A checkpoint that cannot be used (different config, unreadable files)."""


class UnreadableCheckpoint(CheckpointError):
    """A checkpoint whose files are missing or damaged: set aside, the previous one is tried."""


@dataclass
class Trainee:
    model: torch.nn.Module  # the bare module (not the DDP wrapper)
    optimizer: Any  # torch optimizer, or DeepSpeed's ZeRO optimizer when `engine` is set
    scheduler: Any
    engine: Any = None  # DeepSpeed engine, when training under DeepSpeed

    @property
    def zero_stage(self) -> int:
        return int(self.engine.zero_optimization_stage()) if self.engine is not None else 0


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached)
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Config drift
# ---------------------------------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def config_diff(saved: dict, current: dict) -> list[str]:
    """'key: <saved> (checkpoint) -> <current> (now)' for every differing leaf."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: {a.get(k, '<absent>')!r} (checkpoint) -> {b.get(k, '<absent>')!r} (now)"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------
def list_checkpoints(store, root: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `root`, oldest first, as (step, uri)."""
    found = []
    for entry in store.list_complete(root):
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        m = STEP_RE.match(name)
        if m:
            found.append((int(m.group(1)), _join(root, name)))
    return sorted(found)


def latest(store, root: str) -> tuple[int, str] | None:
    found = list_checkpoints(store, root)
    return found[-1] if found else None


def prune(store, root: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints; returns the deleted URIs."""
    from r4b_core.storage import COMPLETE_MARKER

    found = list_checkpoints(store, root)
    doomed = [uri for _, uri in found[:-keep]] if keep > 0 else []
    for uri in doomed:
        # Marker first: a prune cut short leaves a folder that `latest` ignores, never a
        # "complete" checkpoint with files missing (an S3 prefix is deleted in no set order).
        store.delete(_join(uri, COMPLETE_MARKER))
        store.delete(uri)
    return doomed


# ---------------------------------------------------------------------------------------------
# Save / load (collective)
# ---------------------------------------------------------------------------------------------
def model_state(trainee: Trainee, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """Full model state on rank 0, None elsewhere (collective under ZeRO-3, which shards parameters)."""
    if trainee.zero_stage == 3:
        return trainee.engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in trainee.model.state_dict().items()} if env.is_main else None


def save(store, root: str, step: int, trainee: Trainee, env: DistEnv, state: dict) -> str | None:
    """Write checkpoint `step` under `root` (every rank calls this). Returns its URI on rank 0."""
    from safetensors.torch import save_file

    full_model = model_state(trainee, env)
    sharded = trainee.engine is not None  # ZeRO optimizers hold one partition per rank
    optim_part = trainee.optimizer.state_dict() if (sharded or env.is_main) else None
    optim_parts = gather_objects(optim_part, env) if sharded else [optim_part]
    rngs = gather_objects(rng_state(), env)
    uri = None
    if env.is_main:
        uri = _join(root, step_name(step))
        with store.atomic_dir(uri) as tmp:
            tmp = Path(tmp)
            # Shared tensors (tied embeddings) are stored once; clone breaks the aliasing.
            tensors = {k: v.detach().cpu().contiguous().clone() for k, v in full_model.items()}
            save_file(tensors, str(tmp / "model.safetensors"))
            torch.save({"optimizer": optim_parts, "scheduler": trainee.scheduler.state_dict(), "rng": rngs,
                        "zero_stage": trainee.zero_stage}, tmp / "optim.pt")
            full = dict(state, step=step, world_size=env.world_size)
            (tmp / "state.json").write_text(json.dumps(full, indent=1, sort_keys=True))
    barrier(env)
    return uri


FILES = ("model.safetensors", "optim.pt", "state.json")


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnreadableCheckpoint(f"state.json: not valid JSON ({first_line(exc)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise UnreadableCheckpoint("state.json: not a checkpoint state (no integer 'step')")
    return state


def verify(store, uri: str, cache_dir: str | Path) -> dict:
    """state.json of the checkpoint at `uri` once its files check out: every file present and equal
    to the checksum in `_COMPLETE`, or (older checkpoints without checksums) each one readable.
    UnreadableCheckpoint naming the problems otherwise. (Rank 0 calls this; it fetches into the
    cache folder that rank 0's `load` reads again.)"""
    from safetensors import safe_open

    local = Path(store.local_path(uri, Path(cache_dir) / "rank0"))
    problems = [f"{name}: missing" for name in FILES if not (local / name).is_file()]
    problems += store.verify_dir(uri, local)
    if problems:
        raise UnreadableCheckpoint("; ".join(dict.fromkeys(problems)))
    state = _read_state(local / "state.json")
    try:
        with safe_open(str(local / "model.safetensors"), "pt") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
        raise UnreadableCheckpoint(f"model.safetensors: unreadable ({first_line(exc)})") from None
    return state


@dataclass
class _Files:
    state: dict
    blob: dict  # optim.pt
    weights: dict[str, torch.Tensor] | None  # model.safetensors (None under ZeRO-3)


def _read_files(store, uri: str, trainee: Trainee, env: DistEnv, cache_dir: str | Path) -> _Files:
    """Everything `load` restores, read and checked before anything is restored."""
    from safetensors.torch import load_file

    # Rank 0 fetches (S3) into its cache; on one node every rank can read the same local copy,
    # across nodes each rank fetches its own.
    local = Path(store.local_path(uri, Path(cache_dir) / f"rank{env.rank}"))
    missing = [name for name in FILES if not (local / name).is_file()]
    if missing:
        raise UnreadableCheckpoint(f"{', '.join(missing)}: missing")
    state = _read_state(local / "state.json")
    try:
        blob = safe_load(local / "optim.pt", "optim.pt")
    except UnsafePayloadError as exc:
        raise UnreadableCheckpoint(str(exc)) from None
    if not isinstance(blob, dict) or not {"optimizer", "scheduler", "rng"} <= set(blob):
        raise UnreadableCheckpoint("optim.pt: not a checkpoint's optimizer state")
    weights = None
    if trainee.zero_stage != 3 and blob.get("zero_stage", 0) == trainee.zero_stage:
        # ZeRO-3 restores its parameter partitions from the optimizer's fp32 copies.
        try:
            weights = load_file(str(local / "model.safetensors"))
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
            raise UnreadableCheckpoint(f"model.safetensors: unreadable ({first_line(exc)})") from None
    return _Files(state, blob, weights)


def _restore(uri: str, files: _Files, trainee: Trainee, env: DistEnv) -> dict:
    """Put the read files into the trainee (the same on every rank); CheckpointError when they do
    not fit (ZeRO stage, world size, shapes)."""
    blob = files.blob
    if blob.get("zero_stage", 0) != trainee.zero_stage:
        raise CheckpointError(f"{uri}: written with ZeRO stage {blob.get('zero_stage', 0)}, now stage "
                              f"{trainee.zero_stage}; set the stage's distributed.deepspeed (anneal or bpo) back "
                              "or start fresh (delete the checkpoints folder)")
    parts = blob["optimizer"]
    if trainee.engine is not None and len(parts) != env.world_size:
        raise CheckpointError(f"{uri}: optimizer sharded over {len(parts)} ranks, now {env.world_size}; "
                              f"resume with {len(parts)} processes or start fresh")
    if files.weights is not None:
        try:
            trainee.model.load_state_dict(files.weights)
        except RuntimeError as exc:
            raise CheckpointError(f"{uri}: model.safetensors does not fit the model ({first_line(exc)}); "
                                  "was the base model changed? start fresh or restore the base model") from None
    if trainee.engine is not None:
        trainee.optimizer.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        trainee.optimizer.load_state_dict(parts[0])
    trainee.scheduler.load_state_dict(blob["scheduler"])
    rngs = blob["rng"]
    set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
    barrier(env)
    return files.state


def load(store, uri: str, trainee: Trainee, env: DistEnv, cache_dir: str | Path) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from `uri`; returns state.json.
    Collective. An UnreadableCheckpoint leaves the trainee as it was (see `resume`)."""
    return _restore(uri, _read_files(store, uri, trainee, env, cache_dir), trainee, env)


def set_aside(store, uri: str, reason: str) -> str:
    """Rename the checkpoint folder `uri` out of the resume order (kept for inspection, with the
    reason in UNREADABLE.txt); returns its new URI."""
    from datetime import datetime, timezone

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = f"{uri.rstrip('/')}.unreadable-{stamp}"
    store.move(uri, dest)
    store.write_text(_join(dest, "UNREADABLE.txt"), reason + "\n")
    return dest


def resume(store, root: str, trainee: Trainee, env: DistEnv, cache_dir: str | Path,
           accept=lambda uri, state: None, say=print) -> tuple[str, dict] | None:
    """Load the newest checkpoint under `root` that reads; (uri, state.json) or None for none.

    Collective. Rank 0 checks the files (`verify`), then every rank reads them; a checkpoint that
    fails either is set aside with one line through `say`, and the next older one is tried.
    `accept(uri, state)` raises for a readable checkpoint that must not be resumed (a different
    config): that error is no reason to fall back, it reaches the caller."""
    while True:
        found = agree(latest(store, root) if env.is_main else None, env)
        if found is None:
            return None
        uri, reason, state, files = found[1], None, None, None
        if env.is_main:
            try:
                state = verify(store, uri, cache_dir)
            except UnreadableCheckpoint as exc:
                reason = str(exc)
        reason, state = agree((reason, state), env)
        if reason is None:
            accept(uri, state)
            try:
                files = _read_files(store, uri, trainee, env, cache_dir)
            except UnreadableCheckpoint as exc:
                reason = str(exc)
            reasons = gather_objects(reason, env)   # a rank that cannot read it stops every rank
            reason = agree(next((r for r in reasons if r), None) if env.is_main else None, env)
        if reason is None:
            return uri, _restore(uri, files, trainee, env)
        if env.is_main:
            dest = set_aside(store, uri, reason)
            say(f"checkpoint {uri} is unreadable ({reason}); set aside as {dest.rsplit('/', 1)[-1]}, "
                "trying the previous one")
        barrier(env)


def agree(value, env: DistEnv):
    """Rank 0's view of `value` on every rank (so all ranks resume from the same checkpoint)."""
    return broadcast_object(value, env)
