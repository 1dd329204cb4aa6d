"""Helpers shared by the checkpoint and distributed-training tests (tests/unit/test_checkpoint.py,
tests/integration/test_checkpoint_prune.py, tests/integration/test_bpo_distributed.py)."""

from __future__ import annotations

import contextlib
import socket

import torch

from r4b_core.training import checkpoint as ckpt


def small_trainee(seed: int) -> ckpt.Trainee:
    """A Linear model with AdamW and a LambdaLR schedule: what a checkpoint holds, in miniature."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return ckpt.Trainee(model=model, optimizer=optimizer, scheduler=scheduler)


@contextlib.contextmanager
def world_of_one(monkeypatch):
    """A gloo process group of one in this process (DeepSpeed engines need one), torn down after."""
    from r4b_core.training.distributed import init_distributed, teardown

    port = socket.create_server(("127.0.0.1", 0))          # a free port for the world of one
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port.getsockname()[1]), "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(k, v)
    port.close()
    env = init_distributed("gloo", force=True)
    try:
        yield env
    finally:
        teardown(env)
