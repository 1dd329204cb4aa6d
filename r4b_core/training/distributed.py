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
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from r4b_core.errors import R4BError, first_line


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
        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and ds_comm.is_initialized():
            # DeepSpeed keeps its own references to the groups; its destroy releases them too, so
            # a later engine in this process (repro runs anneal, then BPO) meets no dead group.
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few numbers over all ranks (float64 on the training device)."""
    if not env.initialized:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


# Classes DeepSpeed's ZeRO optimizers put in their state dicts (a loss scaler, the stage enum,
# parameter offsets): plain data that torch's weights-only unpickler rebuilds without running code.
# Anything else that is not tensors and containers is refused.
_DEEPSPEED_STATE_TYPES = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
}


class UnsafePayloadError(R4BError):
    """Bytes that would unpickle Python objects other than tensors, containers and DeepSpeed's state."""


def safe_load(source, what: str):
    """torch.load(source) with weights_only=True: tensors, containers and DeepSpeed's optimizer
    state only. A payload naming any other Python object (one that could run code when loaded:
    optim.pt from a writable bucket, bytes from a peer) raises UnsafePayloadError in one line;
    bytes torch cannot read raise it too, saying why."""
    import importlib

    data = source if isinstance(source, bytes) else None
    opened = (lambda: io.BytesIO(data)) if data is not None else (lambda: open(source, "rb"))
    try:
        with opened() as f:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(f)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for damaged files
        raise UnsafePayloadError(f"{what}: unreadable ({first_line(exc)})") from None
    foreign = sorted(set(names) - _DEEPSPEED_STATE_TYPES)
    if foreign:
        raise UnsafePayloadError(f"{what}: refused: it names Python objects that are not tensors or plain data "
                                 f"({', '.join(foreign[:3])}), and loading it could run code; restore it from "
                                 "a trusted copy or delete it")
    classes = []
    for name in names:
        module, _, attr = name.rpartition(".")
        classes.append(getattr(importlib.import_module(module), attr))
    try:
        with opened() as f, torch.serialization.safe_globals(classes):
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UnsafePayloadError(f"{what}: unreadable ({first_line(exc)})") from None


def _to_bytes(obj) -> bytes:
    # torch.save, not plain pickle: tensors inside `obj` (RNG states, optimizer shards) then
    # round-trip; pickled tensor storages fail to unpickle inside gather_object (torch 2.13).
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


# Objects travel between ranks as raw uint8 tensors holding torch.save bytes, read back with
# safe_load; torch's own gather_object / broadcast_object_list would unpickle whatever a peer sent.
def _as_tensor(data: bytes, length: int, env: DistEnv) -> torch.Tensor:
    out = torch.zeros(length, dtype=torch.uint8, device=_wire_device(env))
    if data:
        out[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return out


def _wire_device(env: DistEnv) -> torch.device:
    return env.device if env.backend == "nccl" else torch.device("cpu")


def gather_objects(obj, env: DistEnv) -> list | None:
    """Every rank's `obj` on rank 0 (None elsewhere); [obj] without a process group. `obj` holds
    tensors, plain data and DeepSpeed optimizer state only (see safe_load)."""
    if not env.initialized:
        return [obj]
    data = _to_bytes(obj)
    sizes = [torch.zeros(1, dtype=torch.int64, device=_wire_device(env)) for _ in range(env.world_size)]
    dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64, device=_wire_device(env)))
    lengths = [int(s.item()) for s in sizes]
    mine = _as_tensor(data, max(lengths), env)
    boxes = [torch.empty_like(mine) for _ in range(env.world_size)] if env.is_main else None
    dist.gather(mine, boxes, dst=0)
    if boxes is None:
        return None
    return [safe_load(box[:n].cpu().numpy().tobytes(), f"data from rank {r}")
            for r, (box, n) in enumerate(zip(boxes, lengths))]


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank (same contents rule as gather_objects)."""
    if not env.initialized:
        return obj
    data = _to_bytes(obj) if env.is_main else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=_wire_device(env))
    dist.broadcast(size, src=0)
    box = _as_tensor(data, int(size.item()), env)
    dist.broadcast(box, src=0)
    return safe_load(box.cpu().numpy().tobytes(), "data from rank 0")
