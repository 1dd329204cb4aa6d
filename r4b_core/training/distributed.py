"""Process-group set-up for the training stages: one process, torchrun, or a PyTorchJob pod.

    env = init_distributed("auto")          # reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT
    ...                                     # (torchrun sets them; so does the Kubeflow operator)
    teardown(env)                           # barrier + destroy_process_group

Without those variables the stage runs as a single process and no process group exists, unless
`force=True` (DeepSpeed always wants one): then a world of one is created on a free local port.
Backend "auto" = nccl with CUDA, gloo otherwise. Only `env.is_main` writes files and logs.
"""

from __future__ import annotations

import datetime
import io
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.backend is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str = "auto", force: bool = False, timeout_s: float = 1800.0) -> DistEnv:
    """Join the process group described by the environment (see module docstring)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world <= 1 and not force:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return DistEnv(device=device)
    if world <= 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        from r4b_core.errors import R4BError

        raise R4BError(f"WORLD_SIZE={world} but {', '.join(missing)} is not set; launch with torchrun "
                       "or set MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE for every process")
    # Bare processes started by an operator (RANK/WORLD_SIZE only) have no LOCAL_RANK.
    n_local = max(1, torch.cuda.device_count())
    local_rank = int(os.environ.get("LOCAL_RANK", rank % n_local))
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=max(world, 1),
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistEnv(rank=rank, world_size=max(world, 1), local_rank=local_rank, device=device, backend=backend)


def barrier(env: DistEnv) -> None:
    if env.initialized:
        dist.barrier()


def teardown(env: DistEnv) -> None:
    """End cleanly: gloo programs can abort at exit (rc -6) without the barrier + destroy."""
    if env.initialized and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few numbers over all ranks (float64 on the training device)."""
    if not env.initialized:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def _to_bytes(obj) -> bytes:
    # torch.save, not plain pickle: tensors inside `obj` (RNG states, optimizer shards) then
    # round-trip; pickled tensor storages fail to unpickle inside gather_object (torch 2.13).
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)  # our own bytes


def gather_objects(obj, env: DistEnv) -> list | None:
    """Every rank's `obj` on rank 0 (None elsewhere); [obj] without a process group."""
    if not env.initialized:
        return [obj]
    out = [None] * env.world_size if env.is_main else None
    dist.gather_object(_to_bytes(obj), out, dst=0)
    return [_from_bytes(b) for b in out] if out is not None else None


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank."""
    if not env.initialized:
        return obj
    box = [_to_bytes(obj) if env.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return _from_bytes(box[0])
