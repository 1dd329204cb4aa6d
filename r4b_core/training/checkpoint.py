"""Resumable training checkpoints: atomic folders `<root>/step-NNNNNN/` on any storage URI.

A checkpoint folder holds

    model.safetensors     the full model state (consolidated from ZeRO-3 shards when needed)
    optim.pt              optimizer state (one entry per rank under DeepSpeed ZeRO, which shards it),
                          LR scheduler state, RNG states of every rank
    state.json            step, data position, config hash and the config it was written under,
                          world size, the loss history so far

Saving is collective (every rank calls `save`, rank 0 writes) and goes through
`Store.atomic_dir`, so a folder is either complete or invisible; `latest` only looks at complete
ones. `load` is also collective and puts each rank's RNG and optimizer shard back.

    ckpt = latest(store, root)                     # (step, uri) or None
    state = load(store, uri, trainer, env, cache)  # -> state.json dict
    save(store, root, step, trainer, env, state)   # then prune(store, root, keep)

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

from r4b_core.errors import R4BError
from r4b_core.training.distributed import DistEnv, barrier, broadcast_object, gather_objects

STEP_RE = re.compile(r"^step-(\d{6,})$")


class CheckpointError(R4BError):
    """A checkpoint that cannot be used (different config, unreadable files)."""


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


def read_state(store, uri: str) -> dict:
    return json.loads(store.read_text(_join(uri, "state.json")))


def load(store, uri: str, trainee: Trainee, env: DistEnv, cache_dir: str | Path) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from `uri`; returns state.json."""
    from safetensors.torch import load_file

    # Rank 0 fetches (S3) into its cache; on one node every rank can read the same local copy,
    # across nodes each rank fetches its own.
    local = Path(store.local_path(uri, Path(cache_dir) / f"rank{env.rank}"))
    state = json.loads((local / "state.json").read_text())
    # Our own files, written by `save` above: full unpickling is needed for DeepSpeed's loss scaler.
    blob = torch.load(local / "optim.pt", map_location="cpu", weights_only=False)
    if blob.get("zero_stage", 0) != trainee.zero_stage:
        raise CheckpointError(f"{uri}: written with ZeRO stage {blob.get('zero_stage', 0)}, now stage "
                              f"{trainee.zero_stage}; set the stage's distributed.deepspeed (anneal or bpo) back "
                              "or start fresh (delete the checkpoints folder)")
    if trainee.zero_stage != 3:
        # ZeRO-3 restores its parameter partitions from the optimizer's fp32 copies below.
        try:
            trainee.model.load_state_dict(load_file(str(local / "model.safetensors")))
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"{uri}: model.safetensors does not fit the model ({first}); "
                                  "was the base model changed? start fresh or restore the base model") from None
    parts = blob["optimizer"]
    if trainee.engine is not None:
        if len(parts) != env.world_size:
            raise CheckpointError(f"{uri}: optimizer sharded over {len(parts)} ranks, now {env.world_size}; "
                                  f"resume with {len(parts)} processes or start fresh")
        trainee.optimizer.load_state_dict(parts, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        trainee.optimizer.load_state_dict(parts[0])
    trainee.scheduler.load_state_dict(blob["scheduler"])
    rngs = blob["rng"]
    set_rng_state(rngs[env.rank] if env.rank < len(rngs) else rngs[0])
    barrier(env)
    return state


def agree(value, env: DistEnv):
    """Rank 0's view of `value` on every rank (so all ranks resume from the same checkpoint)."""
    return broadcast_object(value, env)
