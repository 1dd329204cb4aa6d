"""vLLM serving plugins of r4b: the `r4b` reasoning parser and a request/response middleware
(the thinking budget and the mode metrics they apply are in r4b_thinking.py, the same folder).

Loaded into the vLLM OpenAI server process (this folder is on its PYTHONPATH, locally through
r4b_core/rollout/vllm_server.py, in the vLLM image through docker/vllm.Dockerfile) by the flags
that `r4b_core.serve.serving_args()` adds:

    --reasoning-parser-plugin r4b_vllm_serving --reasoning-parser r4b
    --logits-processors r4b_thinking:ThinkingBudgetProcessor
    --middleware r4b_vllm_serving.R4BServingMiddleware

Why our own parser: the chat template (r4b_core/models/tokenizer.py) puts the opening of the think
block into the prompt: auto ends the prompt with `<think>`, long with `<think>\\n`, and short with
the whole empty block `<think>\\n\\n</think>\\n\\n`. vLLM's `deepseek_r1` parser handles the first
two (no `<think>` in the output: reasoning until `</think>`) but, without streaming, it files a
short-mode answer as reasoning, because the parser never sees the prompt. `qwen3` has the same
problem unless the client sends `enable_thinking: false`. This parser is `deepseek_r1` plus the
per-request mode (`chat_template_kwargs`), and splits a complete output exactly as
`r4b_core.modes.parse_response` does (tests/integration/test_serving.py checks they agree). Its
usage count of reasoning tokens is the one a thinking budget limits (r4b_thinking.ThinkTokens).

Why a middleware (and not a proxy in front): it runs inside the server, so it costs no extra hop,
and it sees every route vLLM registers, the ones added by a vLLM upgrade included.
- API key: with `R4B_SERVE_API_KEY` set, every route but /health, /ping and /metrics needs
  `Authorization: Bearer <key>` (401 otherwise). vLLM's own `--api-key` guards only /v1/*, leaving
  /invocations, /tokenize and admin routes such as /scale_elastic_ep open.
- media, on every route that takes a request body (chat, /invocations, /v1/responses,
  /v1/messages, /tokenize, batches): a modality the model does not take (video_url for LLaVA,
  image_embeds without --enable-mm-embeds) is refused with 400; an inline item over
  `R4B_MAX_IMAGE_BYTES` (serve.max_image_bytes) with 413; a URL with 400 unless it is http(s) on a
  host of `R4B_ALLOWED_MEDIA_DOMAINS` (serve.allowed_media_domains, empty = none), so clients cannot
  make the server fetch from the cluster's network. vLLM alone fetches any URL, and checks sizes
  only of what it downloads. Messages name the part (`messages[0].content[1].image_url`).
- thinking budget, on chat and text completions: the request's or the server's default is checked
  and handed to the logits processor (r4b_thinking.apply_budget); a bad or too large one is a 400.
- vLLM 0.32 names the reasoning field `reasoning`; clients written for DeepSeek / older vLLM read
  `reasoning_content`. Chat responses (JSON and server-sent events) carry both.
- mode metrics of every completed /v1/chat/completions request (r4b_thinking.ModeMetrics), read
  from the response and the usage vLLM leaves in the request's state.

The platform environment imports this module too (tests): everything but the parser class is
plain Python, and the parser is defined only where vLLM is importable.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from r4b_thinking import (DIRECT_MODES, IM_END, THINK_CLOSE, THINK_OPEN, BudgetError, BudgetPolicy, ModeMetrics,
                          ThinkTokens, apply_budget, has_answer_text, requested_mode)

ENV_MAX_IMAGE_BYTES = "R4B_MAX_IMAGE_BYTES"
DEFAULT_MAX_IMAGE_BYTES = 2_000_000   # = ServeConfig.max_image_bytes (a test keeps them equal)
ENV_ALLOWED_MEDIA_DOMAINS = "R4B_ALLOWED_MEDIA_DOMAINS"   # comma-separated host names
ENV_API_KEY = "R4B_SERVE_API_KEY"
# routes answered in the chat completion shape (their reasoning field gets aliased)
CHAT_PATHS = frozenset({"/v1/chat/completions", "/v1/chat/completions/batch", "/invocations"})
# routes whose requests may carry a thinking budget (chat: with thinking_mode; text: a raw prompt)
CHAT_COMPLETIONS, TEXT_COMPLETIONS = "/v1/chat/completions", "/v1/completions"
# routes open without the API key: kubelet probes, SageMaker's ping, Prometheus scrapes
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics"})


# ---------------------------------------------------------------------------------------------
# Reasoning split
# ---------------------------------------------------------------------------------------------
def is_direct(chat_template_kwargs: dict | None) -> bool:
    """Did the template render the short-mode prompt (closed, empty think block)? Same precedence
    as the template: thinking_mode first, then enable_thinking, default auto."""
    return requested_mode(chat_template_kwargs) in DIRECT_MODES


def split_reasoning(text: str, direct: bool) -> tuple[str | None, str | None]:
    """(reasoning, content) of a complete output generated after the template's prefix.

    Mirrors `modes.parse_response(text, prefix_mode)`: reasoning and answer stripped; an output
    that never closed its think block (truncated) has no content; a second think block after
    the answer is dropped. Empty parts are None, as in vLLM's responses.
    """
    text = text.replace(IM_END, "")
    if direct:
        body = text   # the prompt closed the (empty) block already
        reasoning = ""
    else:
        # generation started inside the open block; a repeated `<think>` is noise
        body = text.lstrip()
        if body.startswith(THINK_OPEN):
            body = body[len(THINK_OPEN):]
        if THINK_CLOSE not in body:
            return (body.replace(THINK_OPEN, "").strip() or None), None
        reasoning, _, body = body.partition(THINK_CLOSE)
        reasoning = reasoning.replace(THINK_OPEN, "").strip()
    answer = body.split(THINK_OPEN)[0].replace(THINK_CLOSE, "").strip()
    return reasoning or None, answer or None


# ---------------------------------------------------------------------------------------------
# Request checks
# ---------------------------------------------------------------------------------------------
# Content-part `type`s that carry media, and the modality vLLM files them under: OpenAI chat and
# Responses parts (vLLM's renderers/chat_utils.py MM_PARSER_MAP) and Anthropic `image` blocks.
MEDIA_PART_TYPES = {
    "image_url": "image", "input_image": "image", "image_pil": "image", "image": "image",
    "video_url": "video", "audio_url": "audio", "input_audio": "audio",
    "image_embeds": "image_embeds", "video_embeds": "video_embeds", "audio_embeds": "audio_embeds",
    "prompt_embeds": "prompt_embeds",
}
# vLLM also reads a part without a `type` by these keys (the first one present wins)
MEDIA_KEYS = ("image_url", "image_pil", "image_embeds", "video_embeds", "audio_embeds", "video_url",
              "audio_url", "input_audio")
URL_FIELDS = frozenset({"image_url", "input_image", "video_url", "audio_url"})   # the rest is inline base64


@dataclass(frozen=True)
class MediaPolicy:
    """What a request may carry: `max_bytes` per inline item, URLs only from `domains` (host
    names; empty = none), and only the modalities in `kinds` (None = not known: vLLM decides)."""

    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    domains: frozenset[str] = frozenset()
    kinds: frozenset[str] | None = None


def _b64_bytes(payload: str) -> int:
    payload = "".join(payload.split())
    return len(payload) * 3 // 4 - (len(payload) - len(payload.rstrip("=")))


def _data_url_bytes(url: str) -> int | None:
    """Decoded size of a data: URL's payload (None for other URLs)."""
    if url[:5].lower() != "data:":
        return None
    header, _, payload = url.partition(",")
    return _b64_bytes(payload) if ";base64" in header else len(payload.encode())


def _list_items(body) -> list[tuple[str, dict]]:
    """(path, dict) of every object that is an element of a list anywhere in `body`: where content
    parts live on every route (messages[i].content[j], input[i].content[j], batches of those).
    Iterative, so a deeply nested body cannot exhaust the stack."""
    found, stack = [], [("", body)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in node.items())
        elif isinstance(node, list):
            for i, item in enumerate(node):
                if isinstance(item, dict):
                    found.append((f"{path}[{i}]", item))
                stack.append((f"{path}[{i}]", item))
    return sorted(found)


def _media_item(part: dict) -> tuple[str, str, str | None, int | None] | None:
    """(modality, key, URL, inline bytes) of a media part, else None. `key` holds the media in the
    part; URL and bytes are None where absent."""
    kind = part.get("type")
    if kind in MEDIA_PART_TYPES:
        field = kind
    elif kind is None or "uuid" in part:
        field = next((k for k in MEDIA_KEYS if k in part), None)
        if field is None:
            return None
    else:
        return None
    modality = MEDIA_PART_TYPES[field]
    if field == "image":     # Anthropic: "source": {"type": "base64", "data": ...} or {"type": "url", "url": ...}
        key = "source"
        source = part.get(key) if isinstance(part.get(key), dict) else {}
        is_url = source.get("type") == "url"
        value = source.get("url" if is_url else "data")
    else:
        key = {"input_image": "image_url", "prompt_embeds": "data"}.get(field, field)
        value = part.get(key)
        if isinstance(value, dict) and ("url" in value or "data" in value):
            value = value.get("url", value.get("data"))   # {"url": ...}; input_audio {"data": ..., "format": ...}
        is_url = field in URL_FIELDS
    if isinstance(value, str):
        return (modality, key, value, None) if is_url else (modality, key, None, _b64_bytes(value))
    if isinstance(value, dict):                          # embeddings given per name: {name: base64}
        return modality, key, None, sum(_b64_bytes(v) for v in value.values() if isinstance(v, str))
    return modality, key, None, None


def _refuse_url(url: str, param: str, domains: frozenset[str]) -> tuple[int, str, str] | None:
    scheme, _, _ = url.partition(":")
    if scheme.lower() not in ("http", "https"):
        return (400, f"{param}: {scheme or 'this'} URLs are not accepted; send the media inline as a data: URL "
                     f"(data:image/png;base64,...)", param)
    host = (urlsplit(url).hostname or "").lower()
    if not domains:
        return (400, f"{param}: this server does not fetch media from URLs (serve.allowed_media_domains is "
                     f"empty); send the media inline as a data: URL (data:image/png;base64,...)", param)
    if host not in domains:
        return (400, f"{param}: {host or url[:80]!r} is not one of this server's media domains "
                     f"({', '.join(sorted(domains))}; serve.allowed_media_domains); send the media inline "
                     f"as a data: URL", param)
    return None


def check_request(request, policy: MediaPolicy) -> tuple[int, str, str] | None:
    """(status, message, param) for a request body the server must refuse, else None.

    Every media item of any route is checked (chat, /invocations, /v1/responses, /v1/messages,
    /tokenize, batches): its modality must be one the served model takes, an inline payload must
    fit `policy.max_bytes`, a URL must be http(s) on one of `policy.domains`. What vLLM checks
    itself is left to it: an unknown thinking_mode (the chat template, 400), max_tokens beyond the
    model length (400).
    """
    if (isinstance(request, dict) and request.get("prompt_embeds") and policy.kinds is not None
            and "prompt_embeds" not in policy.kinds):                # /v1/completions
        return (400, "prompt_embeds: this server does not take prompt embeddings; send the prompt as text",
                "prompt_embeds")
    for path, part in _list_items(request):
        found = _media_item(part)
        if found is None:
            continue
        modality, key, url, size = found
        param = f"{path}.{key}" if key in part else path
        if policy.kinds is not None and modality not in policy.kinds:
            takes = ", ".join(sorted(policy.kinds)) or "text only"
            return (400, f"{param}: this server's model does not take {modality} input (it takes: {takes}); "
                         f"remove that part", param)
        if url is not None:
            size = _data_url_bytes(url)
            if size is None:
                refused = _refuse_url(url, param, policy.domains)
                if refused:
                    return refused
        if size is not None and size > policy.max_bytes:
            noun = "image" if modality == "image" else f"{modality} item"
            return (413, f"{param}: the {noun} is {size} bytes, more than this server's limit of "
                         f"{policy.max_bytes} bytes (serve.max_image_bytes); send a smaller or downscaled "
                         f"{noun}", param)
    return None


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """An error in the OpenAI / vLLM shape, so clients raise it with its message."""
    kind = {401: "AuthenticationError", 413: "RequestTooLargeError"}.get(status, "BadRequestError")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}},
                      separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------
# Response aliasing: `reasoning` -> also `reasoning_content`
# ---------------------------------------------------------------------------------------------
def alias_reasoning(payload: dict, key: str) -> bool:
    """Copy choices[*].<key>.reasoning to reasoning_content; True if anything changed."""
    changed = False
    for choice in payload.get("choices") or ():
        part = choice.get(key) if isinstance(choice, dict) else None
        if isinstance(part, dict) and "reasoning" in part and "reasoning_content" not in part:
            part["reasoning_content"] = part["reasoning"]
            changed = True
    return changed


def _alias_json(body: bytes) -> bytes:
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    if isinstance(payload, dict) and alias_reasoning(payload, "message"):
        return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return body


def _alias_event(event: bytes, on_answer=None) -> bytes:
    """One server-sent event (without its blank-line terminator); `on_answer()` is called when it
    carries answer text."""
    if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
        return event
    try:
        payload = json.loads(event[6:])
    except ValueError:
        return event
    if not isinstance(payload, dict):
        return event
    if on_answer is not None and has_answer_text(payload):
        on_answer()
    if alias_reasoning(payload, "delta"):
        return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return event


def served_media_kinds(app) -> frozenset[str] | None:
    """The modalities the served model takes, as vLLM's own processor for it reports them
    (`image` for LLaVA, `image` + `video` for Qwen2-VL, none for a text model; `*_embeds` only where
    the server enables embedding inputs). None when this vLLM keeps them elsewhere: vLLM decides."""
    try:
        engine = app.state.engine_client
        config = engine.model_config
        kinds = set()
        if config.is_multimodal_model:
            limits = engine.renderer.get_mm_processor().info.allowed_mm_limits
            kinds = {modality for modality, most in limits.items() if most}
            if config.multimodal_config.enable_mm_embeds:
                kinds |= {f"{modality}_embeds" for modality in kinds}
        if config.enable_prompt_embeds:
            kinds.add("prompt_embeds")
        return frozenset(kinds)
    except Exception:  # noqa: BLE001 - another vLLM layout; its own checks still apply
        return None


def _header(scope, name: bytes) -> str:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


async def _respond(send, status: int, message: str, param: str | None = None, headers=()) -> None:
    data = error_body(status, message, param)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()), *headers]})
    await send({"type": "http.response.body", "body": data})


class R4BServingMiddleware:
    """Pure ASGI middleware in front of every route: the API key, the media checks of every
    request body, and the reasoning alias of chat responses."""

    def __init__(self, app):
        self.app = app
        self.max_image_bytes = int(os.environ.get(ENV_MAX_IMAGE_BYTES) or DEFAULT_MAX_IMAGE_BYTES)
        self.domains = frozenset(d.strip().lower() for d in os.environ.get(ENV_ALLOWED_MEDIA_DOMAINS, "").split(",")
                                 if d.strip())
        key = os.environ.get(ENV_API_KEY) or ""
        self.key_digest = hashlib.sha256(key.encode()).digest() if key else None
        self.kinds: frozenset[str] | None = None   # looked up from vLLM at the first request
        self.budgets = BudgetPolicy.from_env()
        self.metrics = ModeMetrics.get()

    def authorized(self, scope) -> bool:
        """`Authorization: Bearer <key>` (OpenAI clients) or `x-api-key: <key>` (Anthropic clients)."""
        scheme, _, token = _header(scope, b"authorization").partition(" ")
        if scheme.lower() != "bearer":
            token = _header(scope, b"x-api-key")
        return hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self.key_digest)

    async def __call__(self, scope, receive, send):
        if scope.get("type") not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope.get("path")
        if (self.key_digest is not None and scope.get("method") != "OPTIONS" and path not in OPEN_PATHS
                and not self.authorized(scope)):
            if scope["type"] == "websocket":   # closing before accept answers the handshake with 403
                await send({"type": "websocket.close", "code": 1008})
                return
            await _respond(send, 401, f"{path}: missing or wrong API key; send the header 'Authorization: Bearer "
                                      f"<key>' (the key this server was started with, {ENV_API_KEY})",
                           headers=[(b"www-authenticate", b"Bearer")])
            return
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            request = None   # not JSON: vLLM answers it itself (400)
        if request is not None:
            if self.kinds is None and "app" in scope:
                self.kinds = served_media_kinds(scope["app"])
            problem = check_request(request, MediaPolicy(self.max_image_bytes, self.domains, self.kinds))
            if problem is not None:
                await _respond(send, *problem)
                return
        mode = budget = None
        if isinstance(request, dict) and path in (CHAT_COMPLETIONS, TEXT_COMPLETIONS):
            chat = path == CHAT_COMPLETIONS
            mode = requested_mode(request.get("chat_template_kwargs")) if chat else None   # before the budget's rewrite
            try:
                changed, budget = apply_budget(request, self.budgets, chat)
            except BudgetError as bad:
                await _respond(send, 400, str(bad), bad.param)
                return
            if changed:
                body = json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()   # later calls: disconnect detection

        if path not in CHAT_PATHS:
            await self.app(scope, replay, send)
            return
        state = scope.setdefault("state", {})   # where vLLM leaves the final usage (request_metadata)
        out = _AliasingSend(send, started)
        await self.app(scope, replay, out)
        if self.metrics is not None and mode is not None and out.status == 200:
            usage = getattr(state.get("request_metadata"), "final_usage_info", None)
            self.metrics.record(mode, budget, usage, out.first_answer_s)


class _AliasingSend:
    """Wraps `send`: JSON bodies are rewritten whole (Content-Length fixed), SSE event by event.
    Notes the status and when the first answer text went out (the whole JSON body: its end)."""

    def __init__(self, send, started: float | None = None):
        self.send = send
        self.started = time.monotonic() if started is None else started
        self.status = None
        self.first_answer_s: float | None = None
        self.mode = None
        self.start = None
        self.buffer = b""

    def _answered(self) -> None:
        if self.first_answer_s is None:
            self.first_answer_s = time.monotonic() - self.started

    async def __call__(self, message):
        kind = message["type"]
        if kind == "http.response.start":
            self.status = message.get("status")
            headers = dict((k.lower(), v) for k, v in message.get("headers", []))
            ctype = headers.get(b"content-type", b"")
            if ctype.startswith(b"application/json"):
                self.mode, self.start = "json", message   # held until the body is complete
                return
            self.mode = "sse" if ctype.startswith(b"text/event-stream") else None
            await self.send(message)
            return
        if kind != "http.response.body" or self.mode is None:
            await self.send(message)
            return
        more = message.get("more_body", False)
        self.buffer += message.get("body", b"")
        if self.mode == "json":
            if more:
                return
            body, self.buffer = _alias_json(self.buffer), b""
            self._answered()
            headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            await self.send({**self.start, "headers": headers})
            await self.send({"type": "http.response.body", "body": body})
            return
        # SSE: rewrite every complete event, keep a partial one for the next chunk
        *events, self.buffer = self.buffer.split(b"\n\n")
        if not more and self.buffer:
            events.append(self.buffer)
            self.buffer = b""
        out = b"".join(_alias_event(e, self._answered) + b"\n\n" for e in events)
        if out or not more:
            await self.send({"type": "http.response.body", "body": out, "more_body": more})


# ---------------------------------------------------------------------------------------------
# The reasoning parser (vLLM environment only)
# ---------------------------------------------------------------------------------------------
try:
    from vllm.reasoning import ReasoningParserManager
    from vllm.reasoning.deepseek_r1_reasoning_parser import DeepSeekR1ReasoningParser
except ImportError:   # the platform environment: no vLLM, nothing to register
    DeepSeekR1ReasoningParser = None

if DeepSeekR1ReasoningParser is not None:

    @ReasoningParserManager.register_module("r4b")
    class R4BReasoningParser(DeepSeekR1ReasoningParser):
        """`deepseek_r1` streaming (the prompt's think tags decide where a stream starts) plus
        the request's mode for complete outputs, split as modes.parse_response does."""

        def __init__(self, tokenizer, *args, **kwargs):
            super().__init__(tokenizer, *args, **kwargs)
            self.direct = is_direct(kwargs.get("chat_template_kwargs"))
            self.think_tokens = ThinkTokens.of(tokenizer)

        def extract_reasoning(self, model_output, request):
            return split_reasoning(model_output, self.direct)

        def count_reasoning_tokens(self, token_ids):
            # usage.completion_tokens_details.reasoning_tokens: the output opens inside the block
            # (its `<think>` is in the prompt); the same count a thinking budget limits
            return 0 if self.direct else self.think_tokens.reasoning_count(token_ids)
