"""vLLM serving plugins of r4b: the `r4b` reasoning parser and a request/response middleware.

Loaded into the vLLM OpenAI server process (this folder is on its PYTHONPATH, locally through
r4b_core/rollout/vllm_server.py, in the vLLM image through docker/vllm.Dockerfile) by the flags
that `r4b_core.serve.serving_args()` adds:

    --reasoning-parser-plugin r4b_vllm_serving --reasoning-parser r4b
    --middleware r4b_vllm_serving.R4BServingMiddleware

Why our own parser: the chat template (r4b_core/models/tokenizer.py) puts the opening of the think
block into the prompt: auto ends the prompt with `<think>`, long with `<think>\\n`, and short with
the whole empty block `<think>\\n\\n</think>\\n\\n`. vLLM's `deepseek_r1` parser handles the first
two (no `<think>` in the output: reasoning until `</think>`) but, without streaming, it files a
short-mode answer as reasoning, because the parser never sees the prompt. `qwen3` has the same
problem unless the client sends `enable_thinking: false`. This parser is `deepseek_r1` plus the
per-request mode (`chat_template_kwargs`), and splits a complete output exactly as
`r4b_core.modes.parse_response` does (tests/integration/test_serving.py checks they agree).

Why a middleware (and not a proxy in front): it runs inside the server, so it costs no extra hop.
- an image larger than `R4B_MAX_IMAGE_BYTES` (serve.max_image_bytes; base64 data URLs) is refused
  with HTTP 413 and a message naming the message/part and the limit; vLLM alone accepts it;
- vLLM 0.32 names the reasoning field `reasoning`; clients written for DeepSeek / older vLLM read
  `reasoning_content`. Chat responses (JSON and server-sent events) carry both.

The platform environment imports this module too (tests): everything but the parser class is
plain Python, and the parser is defined only where vLLM is importable.
"""

from __future__ import annotations

import json
import os

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
IM_END = "<|im_end|>"
# thinking_mode values whose prompt already holds the closed, empty think block (the template's
# "short"); `enable_thinking: false` means the same when thinking_mode is not given.
DIRECT_MODES = frozenset({"short"})

ENV_MAX_IMAGE_BYTES = "R4B_MAX_IMAGE_BYTES"
DEFAULT_MAX_IMAGE_BYTES = 2_000_000   # = ServeConfig.max_image_bytes (a test keeps them equal)
CHAT_PATHS = frozenset({"/v1/chat/completions"})
IMAGE_PART_TYPES = ("image_url", "input_image")


# ---------------------------------------------------------------------------------------------
# Reasoning split
# ---------------------------------------------------------------------------------------------
def is_direct(chat_template_kwargs: dict | None) -> bool:
    """Did the template render the short-mode prompt (closed, empty think block)? Same precedence
    as the template: thinking_mode first, then enable_thinking, default auto."""
    kw = chat_template_kwargs or {}
    mode = kw.get("thinking_mode")
    if mode is not None:
        return str(mode).strip().lower() in DIRECT_MODES
    enable = kw.get("enable_thinking")
    return enable is not None and not enable


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
def _data_url_bytes(url: str) -> int | None:
    """Decoded size of a data: URL's payload (None for other URLs)."""
    if not url.startswith("data:"):
        return None
    header, _, payload = url.partition(",")
    if ";base64" in header:
        payload = "".join(payload.split())
        return len(payload) * 3 // 4 - (len(payload) - len(payload.rstrip("=")))
    return len(payload.encode())


def check_chat_request(request: dict, max_image_bytes: int) -> tuple[int, str, str] | None:
    """(status, message, param) for a request the server must refuse, else None.

    Only what vLLM does not check itself: an unknown thinking_mode is refused by the chat
    template (400) and max_tokens beyond the model length by vLLM (400).
    """
    messages = request.get("messages") if isinstance(request, dict) else None
    if not isinstance(messages, list):
        return None
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in IMAGE_PART_TYPES:
                continue
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            size = _data_url_bytes(url) if isinstance(url, str) else None
            if size is not None and size > max_image_bytes:
                param = f"messages[{i}].content[{j}].image_url"
                return (413, f"{param}: the image is {size} bytes, more than this server's limit of "
                             f"{max_image_bytes} bytes (serve.max_image_bytes); send a smaller or "
                             f"downscaled image", param)
    return None


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """An error in the OpenAI / vLLM shape, so clients raise it with its message."""
    kind = {400: "BadRequestError", 413: "RequestTooLargeError"}.get(status, "BadRequestError")
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


def _alias_event(event: bytes) -> bytes:
    """One server-sent event (without its blank-line terminator)."""
    if not event.startswith(b"data: ") or event.startswith(b"data: [DONE]"):
        return event
    try:
        payload = json.loads(event[6:])
    except ValueError:
        return event
    if isinstance(payload, dict) and alias_reasoning(payload, "delta"):
        return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    return event


class R4BServingMiddleware:
    """Pure ASGI middleware on the chat endpoint: refuse oversize images, alias the reasoning field."""

    def __init__(self, app):
        self.app = app
        self.max_image_bytes = int(os.environ.get(ENV_MAX_IMAGE_BYTES) or DEFAULT_MAX_IMAGE_BYTES)

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in CHAT_PATHS:
            await self.app(scope, receive, send)
            return
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
        except ValueError:
            request = None   # vLLM answers malformed JSON itself (400)
        problem = check_chat_request(request, self.max_image_bytes) if request is not None else None
        if problem is not None:
            status, text, param = problem
            data = error_body(status, text, param)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
            return

        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()   # later calls: disconnect detection

        await self.app(scope, replay, _AliasingSend(send))


class _AliasingSend:
    """Wraps `send`: JSON bodies are rewritten whole (Content-Length fixed), SSE event by event."""

    def __init__(self, send):
        self.send = send
        self.mode = None
        self.start = None
        self.buffer = b""

    async def __call__(self, message):
        kind = message["type"]
        if kind == "http.response.start":
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
        out = b"".join(_alias_event(e) + b"\n\n" for e in events)
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

        def extract_reasoning(self, model_output, request):
            return split_reasoning(model_output, self.direct)

        def count_reasoning_tokens(self, token_ids):
            # usage.completion_tokens_details.reasoning_tokens: the output opens inside the block
            # (its `<think>` is in the prompt), so count up to the first `</think>`
            if self.direct:
                return 0
            ids = list(token_ids)
            end = ids.index(self.end_token_id) if self.end_token_id in ids else len(ids)
            return sum(1 for t in ids[:end] if t != self.start_token_id)
