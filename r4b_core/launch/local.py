"""Run a training stage on this machine, exactly as a PyTorchJob pod runs it.

The stage runs as `python -m r4b_core.cli <stage> --config <URI>` in a child process — under
`torchrun` when `distributed.nproc_per_node > 1` — so the local run and the cluster run execute the
same entry point with the same environment contract (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque

from r4b_core.config import DistributedConfig
from r4b_core.launch import LaunchError


def stage_command(stage: str, config_uri: str, extra_args: list[str], dist: DistributedConfig) -> list[str]:
    entry = ["-m", "r4b_core.cli", stage, "--config", config_uri, *extra_args]
    if dist.nproc_per_node > 1 or dist.nnodes > 1:
        if dist.nnodes > 1:
            raise LaunchError(f"{stage}.distributed.nnodes={dist.nnodes}: the local launcher runs on one "
                              "machine; use launcher.kind=pytorchjob for several nodes")
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={dist.nproc_per_node}", *entry]
    return [sys.executable, *entry]


def run_local(stage: str, config_uri: str, dist: DistributedConfig, extra_args: list[str] | None = None,
              env: dict[str, str] | None = None) -> None:
    """Run the stage to completion, streaming its output; raise LaunchError with its last lines."""
    cmd = stage_command(stage, config_uri, list(extra_args or []), dist)
    child_env = {**os.environ, **(env or {})}
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(cmd, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line.rstrip())
        rc = proc.wait()
    if rc != 0:
        last = "\n".join(tail)
        raise LaunchError(f"stage {stage} failed (exit code {rc}): {' '.join(cmd)}\n--- last output ---\n{last}")
