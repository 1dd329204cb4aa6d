"""Rollouts from a vLLM OpenAI-compatible server (the sidecar): the `vllm` RolloutEngine.

    from r4b_core.rollout.vllm import VLLMEngine
    with VLLMServer(model_dir, cfg.vllm) as server:            # or a URL: the pod's native sidecar
        engine = VLLMEngine(server, processor, sync_tolerance=cfg.bpo.sync_tolerance)
        outs = engine.generate(requests)                         # same protocol as HFEngine
        engine.update_weights(model, version)                    # push + verify, raises on mismatch

Prompt control. Requests go to `/v1/chat/completions` with a pass-through chat template (the
server runs with `--trust-request-chat-template`): the single user message carries the images and,
as its text, the whole prompt already built with `ChatFormat.prompt` (forced prefix included), and
the template emits that text unchanged. So the server tokenizes exactly the string the trainer
tokenizes, images are expanded by vLLM's processor for the model, and per-token logprobs
(`--logprobs-mode processed_logprobs`: under the sampling distribution) and token ids come back.
The completions endpoint would be simpler but takes no images. Requests run concurrently on a
thread pool; each request's `seed` goes to vLLM's sampler.

Weight sync (`update_weights`): the trainer's tensors are written as safetensors in vLLM's key
layout into shared memory (`shm_dir`, else the server's `vllm.sync_dir`, else `$R4B_SHM_DIR`, else
`/dev/shm`; on a cluster an emptyDir mounted in the trainer and the sidecar), then one
`POST /collective_rpc r4b_reload_weights` (dev mode; the worker extension copies the tensors into
the served model in place, or falls back to vLLM's `reload_weights`, and re-packs the output
layer — the tied-embedding trap), then the encoder cache and the prefix cache are reset, both at
once (vision embeddings and KV blocks computed with the old weights; a stale encoder-cache entry
crashes the engine on the next request with the same image). Finally **verification**: one fixed
probe (image, question, forced prefix and a fixed answer) is scored on the server in a single
prefill (`prompt_logprobs`) while the trainer's model scores it too; if any position's logprob
differs by more than `sync_tolerance`, `WeightSyncError` names the difference. The probe's
encoding is computed once per engine. With `overlap_verify` the server's half of the check runs
alongside the next `generate` call's requests, which returns its completions only once the probe
matched; the trainer's half always runs on the caller's thread, at push time.

The image placeholder token is masked (logit_bias -100) as in HFEngine: see
`hf.suppressed_token_ids`.

Thinking budget: a request's `thinking_budget` goes to the server as `vllm_xargs` for the budget's
logits processor (assets/r4b_thinking.py; a server started with `vllm_server.BUDGET_ARGS`, as
`open_engine(..., thinking_budgets=True)` starts it), and each budgeted completion is checked
against the same rule, so a server without the processor fails loudly instead of overspending.

A server that is down or stops answering raises `VLLMEngineError` (health is checked every few
seconds while requests are in flight, each check on a connection of its own; a server that
refuses connections fails at once, a silent one after `health_grace_s`), never a hang. A call
whose pooled keep-alive connection the server reset unread is sent once more on a new one.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import os
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from r4b_core.assets.r4b_thinking import BUDGET_XARG, ThinkTokens, budget_replay
from r4b_core.errors import R4BError
from r4b_core.models.chat import ChatFormat
from r4b_core.modes import Mode
from r4b_core.rollout.base import Completion, GenerationRequest, PromptTooLong
from r4b_core.rollout.hf import (check_prompt_lengths, check_request, encode_prompts, load_images,
                                  suppressed_token_ids)
from r4b_core.rollout.vllm_server import BUDGET_ARGS, BUDGET_ENV

# Renders the user message's text part verbatim: the prompt is built by ChatFormat.prompt.
PASS_THROUGH_TEMPLATE = (
    "{%- for message in messages -%}{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endfor -%}{%- endif -%}{%- endfor -%}"
)
PROBE_QUESTIONS = ("What is 7 + 5?", "Which colour is the largest shape?")
PROBE_ANSWER = "7 + 5 = 12\n</think>\n\nThe answer is 12."


class VLLMEngineError(R4BError):
    """The vLLM server is unreachable, stopped answering, or refused a request."""


class WeightSyncError(R4BError):
    """The sidecar does not serve the trainer's weights after a sync."""


def image_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _default_shm_dir() -> Path:
    env = os.environ.get("R4B_SHM_DIR")
    if env:
        return Path(env)
    return Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())


def _reset_after_connecting(exc: Exception) -> bool:
    """Whether a requests ConnectionError came from a connection that was open and then reset or
    closed (urllib3 ProtocolError), as opposed to one that could not be opened (refused, no route)."""
    from urllib3.exceptions import MaxRetryError, ProtocolError

    cause = exc.args[0] if exc.args else None
    if isinstance(cause, MaxRetryError):
        cause = cause.reason
    return isinstance(cause, ProtocolError)


class VLLMEngine:
    """RolloutEngine over a vLLM OpenAI server (a `VLLMServer` or its base URL)."""

    def __init__(self, server_or_url: Any, processor, sync_tolerance: float = 1e-3, max_workers: int = 16,
                 request_timeout_s: float = 600.0, health_timeout_s: float = 5.0, health_every_s: float = 5.0,
                 health_grace_s: float = 15.0,
                 shm_dir: str | Path | None = None, probe_images: list[Any] | None = None,
                 overlap_verify: bool = False, in_place_reload: bool = True):
        import requests

        self.server = server_or_url if not isinstance(server_or_url, str) else None
        self.url = (server_or_url if isinstance(server_or_url, str) else server_or_url.url).rstrip("/")
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.chat = ChatFormat.of(processor) if processor is not None else None
        end = self.tokenizer.convert_tokens_to_ids(self.chat.end_of_turn) if self.chat is not None else None
        self.eos_ids = {i for i in (end, getattr(self.tokenizer, "eos_token_id", None)) if i is not None}
        self.sync_tolerance = sync_tolerance
        self.request_timeout_s = request_timeout_s
        self.health_timeout_s = health_timeout_s
        self.health_every_s = health_every_s
        self.health_grace_s = health_grace_s
        self.policy_version = 0
        self.last_sync: dict[str, float] = {}
        self.overlap_verify = overlap_verify
        self.in_place_reload = in_place_reload
        self._pending_verify: tuple | None = None
        self.last_rollout_verify: dict[str, float] | None = None
        self.sync_checks: list[dict] = []     # every passed check: version, verify_s, max_abs_diff
        self.reload_path = ""
        self._requests = requests
        self._local = threading.local()
        self._pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="r4b-vllm")
        cfg_dir = getattr(getattr(self.server, "cfg", None), "sync_dir", None)
        self._shm_root = Path(shm_dir or cfg_dir) if (shm_dir or cfg_dir) else _default_shm_dir()
        self._sync_dir: Path | None = None
        self._probe_images = probe_images
        self._probe = None
        # The most negative bias vLLM accepts: e^-100 is below float32 resolution of any logprob.
        self._logit_bias = {str(t): -100 for t in suppressed_token_ids(processor)} if processor is not None else {}
        if not self.healthy():
            raise VLLMEngineError(f"vLLM server at {self.url} is unreachable (GET /health failed within "
                                  f"{health_timeout_s:.0f} s); start it (VLLMServer) or fix R4B_VLLM_URL")
        card = self._get("/v1/models")["data"][0]
        self.model_name = card["id"]
        self.max_positions = card.get("max_model_len")   # the server's context length

    # -- HTTP ------------------------------------------------------------------------------------
    def _session(self):
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = self._requests.Session()
        return s

    def healthy(self) -> bool:
        return self._health() == "ok"

    def _request(self, method: str, path: str, **kw):
        """One HTTP call on this thread's pooled connection, retried once on a fresh connection if
        the server reset the pooled one. uvicorn closes connections idle past its keep-alive (5 s);
        a request that reaches such a connection as it closes (or while a frozen server's timer runs
        out) is reset unread. Resending is safe in any case: generation and reloading one weights
        folder are idempotent."""
        try:
            return self._session().request(method, self.url + path, **kw)
        except self._requests.ConnectionError as exc:
            if not _reset_after_connecting(exc):
                raise
            stale, self._local.session = self._local.session, None
            stale.close()
            return self._session().request(method, self.url + path, **kw)

    def _get(self, path: str) -> Any:
        try:
            r = self._request("GET", path, timeout=self.health_timeout_s * 2)
        except self._requests.RequestException as exc:
            raise VLLMEngineError(f"vLLM server at {self.url}: GET {path} failed: {exc}") from None
        if r.status_code != 200:
            raise VLLMEngineError(f"vLLM server at {self.url}: GET {path} -> HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    def _post(self, path: str, body: dict, what: str, timeout: float | None = None) -> Any:
        try:
            r = self._request("POST", path, json=body, timeout=(self.health_timeout_s, timeout or self.request_timeout_s))
        except self._requests.RequestException as exc:
            raise VLLMEngineError(f"vLLM server at {self.url}: {what} failed: {type(exc).__name__}: {exc}") from None
        if r.status_code != 200:
            raise VLLMEngineError(f"vLLM server at {self.url}: {what} -> HTTP {r.status_code}: {r.text[:500]}")
        return r.json() if r.content else None

    def _health(self) -> str:
        """The server's state: "ok", "down" (no connection can be opened, or the local server
        process has exited) or "slow" (no answer within health_timeout_s, a reset, or an error
        status). Each check opens its own connection: a pooled one may have been closed by the
        server's keep-alive timer while it was frozen, and that reset says nothing about whether
        the server is alive."""
        if self.server is not None and hasattr(self.server, "alive") and not self.server.alive():
            return "down"
        try:
            r = self._requests.get(self.url + "/health", timeout=self.health_timeout_s,
                                   headers={"Connection": "close"})
        except self._requests.ConnectTimeout:
            return "slow"
        except self._requests.ConnectionError as exc:
            return "slow" if _reset_after_connecting(exc) else "down"
        except self._requests.RequestException:
            return "slow"
        return "ok" if r.status_code == 200 else "slow"

    def _wait(self, futures: list[cf.Future]) -> list[Any]:
        """Results of submitted calls; while waiting, check /health so a dead server fails fast.

        A server that refuses connections (or whose process exited) fails at the next check; one
        that stops answering fails once it has been silent for `health_grace_s`. The grace is for
        a live but saturated API server: a burst of image requests on a 2-core machine kept vLLM's
        event loop from answering /health for over 5 s while it was generating."""
        pending = set(futures)
        silent_since: float | None = None
        while pending:
            done, pending = cf.wait(pending, timeout=self.health_every_s, return_when=cf.FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    for p in pending:
                        p.cancel()
                    raise f.exception()
            if not pending:
                break
            started = time.monotonic()
            state = self._health()
            if state == "ok":
                silent_since = None
                continue
            if state == "slow":
                silent_since = started if silent_since is None else silent_since
                if time.monotonic() - silent_since < self.health_grace_s:
                    continue
            for p in pending:
                p.cancel()
            what = (f"stopped answering /health for {time.monotonic() - silent_since:.0f} s" if state == "slow"
                    else "is down (refuses connections or its process exited)")
            raise VLLMEngineError(f"vLLM server at {self.url} {what} with {len(pending)} request(s) in flight; "
                                  f"is the sidecar alive? "
                                  + (f"(log: {self.server.log_path})" if self.server is not None else ""))
        return [f.result() for f in futures]

    # -- generation ------------------------------------------------------------------------------
    def _body(self, req: GenerationRequest, images: list[Any]) -> dict:
        content = [{"type": "image_url", "image_url": {"url": image_data_url(im)}} for im in images]
        content.append({"type": "text", "text": req.prompt})
        body = {
            "model": self.model_name,
            "messages": [{"role": "user", "content": content}],
            "chat_template": PASS_THROUGH_TEMPLATE,
            "add_generation_prompt": False,
            "max_tokens": req.max_new_tokens,
            "n": req.n,
            "temperature": req.temperature,
            "top_p": 1.0,
            "top_k": -1,
            "logprobs": True,
            "top_logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": True,
        }
        if self._logit_bias:
            body["logit_bias"] = self._logit_bias
        if req.seed is not None:
            body["seed"] = int(req.seed)
        if req.thinking_budget is not None:     # for the budget's logits processor (BUDGET_ARGS)
            body["vllm_xargs"] = {BUDGET_XARG: req.thinking_budget}
        return body

    def _one(self, req: GenerationRequest) -> list[Completion]:
        images = load_images(req.images)
        try:
            resp = self._post("/v1/chat/completions", self._body(req, images), f"generate (request {req.key!r})")
        except VLLMEngineError as exc:
            if "maximum context length" not in str(exc):
                raise
            detail = str(exc).split("maximum context length", 1)[1][:200]
            raise PromptTooLong(f"request {req.key!r}: the vLLM server refused the prompt as too long (maximum "
                                f"context length{detail}); shorten the question (records longer than "
                                "data.max_question_chars are refused) or lower max_new_tokens", [req.key]) from None
        prompt_ids = resp.get("prompt_token_ids") or []
        comps = []
        for choice in sorted(resp["choices"], key=lambda c: c["index"]):
            ids = list(choice.get("token_ids") or [])
            lps = [e["logprob"] for e in (choice.get("logprobs") or {}).get("content") or []]
            if len(lps) != len(ids):
                raise VLLMEngineError(f"vLLM server at {self.url}: request {req.key!r} returned {len(ids)} token ids "
                                      f"but {len(lps)} logprobs; the server must run with logprobs enabled")
            if req.thinking_budget is not None:
                self._check_budget(req, prompt_ids, ids)
            finish = choice.get("finish_reason") or "length"
            # Decode here, as HFEngine does: vLLM's incremental detokenizer drops unfinished UTF-8
            # byte sequences, so its text can differ from the same ids decoded at once.
            body = ids[:-1] if finish == "stop" and ids and ids[-1] in self.eos_ids else ids
            text = self.tokenizer.decode(body, skip_special_tokens=True)
            comps.append(Completion(key=req.key, mode=req.mode, text=text,
                                    token_ids=ids, logprobs=[float(x) for x in lps],
                                    finish_reason="stop" if finish == "stop" else "length",
                                    prompt_token_ids=list(prompt_ids), policy_version=self.policy_version))
        return comps

    def _check_budget(self, req: GenerationRequest, prompt_ids: list[int], ids: list[int]) -> None:
        """A budgeted completion must follow the budget's rule token by token: a server without the
        logits processor ignores `vllm_xargs` and would hand back unbudgeted rollouts silently."""
        if budget_replay(req.thinking_budget, prompt_ids, ids, ThinkTokens.of(self.tokenizer)) == "over":
            raise VLLMEngineError(
                f"vLLM server at {self.url}: request {req.key!r} went past its thinking budget of "
                f"{req.thinking_budget} tokens; the server must run the budget's logits processor "
                f"({' '.join(BUDGET_ARGS)}, with {' '.join(f'{k}={v}' for k, v in BUDGET_ENV.items())}; "
                f"open_engine(..., thinking_budgets=True) starts it so)")

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Completions of all requests, run concurrently. If the last weight push is still being
        verified (`overlap_verify`), the check finishes here and a mismatch raises WeightSyncError
        instead of returning rollouts of stale weights. `last_rollout_verify`: that check's figures
        (None if there was none), with wait_s = how long the rollouts, once done, waited for it
        (the part of it the overlap did not hide)."""
        for req in requests:
            check_request(req, self.chat.image_placeholder)
        # The text alone (each image placeholder counted as one token) already too long: refused
        # before any request is sent; a prompt that only its images make too long, the server refuses.
        check_prompt_lengths(requests, [len(self.tokenizer(r.prompt, add_special_tokens=False)["input_ids"])
                                        for r in requests], self.max_positions, counted="text tokens")
        finished: list[float] = []
        futures = [self._pool.submit(self._one, req) for req in requests]
        for f in futures:
            f.add_done_callback(lambda _f: finished.append(time.perf_counter()))
        self.last_rollout_verify = None
        try:
            if self._pending_verify is not None:
                checked = self.wait_verified()
                done = time.perf_counter()
                ended = list(finished)
                wait = done - max(ended) if len(ended) == len(futures) and ended else 0.0
                self.last_rollout_verify = dict(checked, wait_s=max(0.0, wait))
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        results = self._wait(futures)
        return [c for comps in results for c in comps]

    # -- weight sync -----------------------------------------------------------------------------
    def push_weights(self, model_or_path: Any, while_reloading: Callable[[], Any] | None = None) -> dict[str, float]:
        """Make the server load the given weights (no verification; see `update_weights`).
        `while_reloading` runs on the calling thread while the server reloads."""
        from r4b_core.models.loading import saved_state_dict, write_safetensors

        t0 = time.perf_counter()
        if isinstance(model_or_path, (str, Path)):
            folder = Path(model_or_path)
        else:
            if self._sync_dir is None:
                self._sync_dir = self._shm_root / f"r4b-weights-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                self._sync_dir.mkdir(parents=True, exist_ok=True)
            folder = self._sync_dir
            tensors = {k: v.detach().to("cpu", copy=False).float().contiguous()
                       for k, v in saved_state_dict(model_or_path).items()}
            for old in folder.glob("*.safetensors*"):
                old.unlink()
            write_safetensors(tensors, folder)
        t1 = time.perf_counter()
        server = self.reload_from(folder, while_waiting=while_reloading)
        t2 = time.perf_counter()
        # reload_path: "in place" (the worker extension's fast path) or why vLLM's reload_weights ran
        self.reload_path = "in place" if server.get("fast") else f"vLLM reload_weights ({server.get('slow_reason')})"
        # reload_s: the RPC + resets as the trainer waits (anything run meanwhile included);
        # server_reload_s: the reload and the output-layer refresh inside the worker
        return {"write_s": t1 - t0, "reload_s": t2 - t1,
                "server_reload_s": float(server.get("reload_s", 0.0) + server.get("refresh_s", 0.0)),
                "fast_reload": float(bool(server.get("fast")))}

    def reload_from(self, folder: str | Path, refresh_output_layer: bool = True, fast: bool | None = None,
                    while_waiting: Callable[[], Any] | None = None) -> dict:
        """Reload RPC (with the output-layer refresh) + cache resets on the server (no verification).
        Returns what the worker reported (LM heads refreshed, server-side seconds).

        The three requests go out together: with no request running on the server, emptying the
        caches before or after the reload leaves the same state, and the engine handles them one
        at a time. `while_waiting` runs on the calling thread while the server works.
        `refresh_output_layer=False` sends vLLM's bare `reload_weights`, to demonstrate the
        tied-embedding trap in tests.
        """
        folder = str(Path(folder).absolute())
        if refresh_output_layer:
            # the reload + r4b_refresh_output_layer inside the worker: one round trip
            rpc = {"method": "r4b_reload_weights",
                   "kwargs": {"weights_path": folder, "fast": self.in_place_reload if fast is None else fast}}
        else:
            rpc = {"method": "reload_weights", "kwargs": {"weights_path": folder}}
        # The scheduler still lists vision embeddings and KV blocks computed with the old weights:
        # without the resets a repeated image crashes the engine ("Encoder cache miss") and a
        # repeated prompt prefix is served from stale KV.
        futures = [self._pool.submit(self._post, "/collective_rpc", rpc, f"{rpc['method']} from {folder}"),
                   self._pool.submit(self._post, "/reset_encoder_cache", {}, "reset_encoder_cache"),
                   self._pool.submit(self._post, "/reset_prefix_cache", {}, "reset_prefix_cache")]
        if while_waiting is not None:
            while_waiting()
        reloaded, _, reset = self._wait(futures)
        results = (reloaded or {}).get("results") or [{}]
        if refresh_output_layer and (not isinstance(results[0], dict) or not results[0].get("heads")):
            raise WeightSyncError(f"vLLM server at {self.url}: the output-layer refresh found no LM head "
                                  f"({reloaded}); start the server with --worker-extension-cls "
                                  f"r4b_vllm_worker.R4BWorkerExtension (VLLMServer does)")
        deadline = time.monotonic() + self.health_timeout_s
        while isinstance(reset, dict) and reset.get("success") is False and time.monotonic() < deadline:
            # vLLM refuses while requests run: ones abandoned by an earlier failure may still be finishing
            time.sleep(0.1)
            reset = self._post("/reset_prefix_cache", {}, "reset_prefix_cache")
        if isinstance(reset, dict) and reset.get("success") is False:
            raise WeightSyncError(f"vLLM server at {self.url}: reset_prefix_cache refused (requests still "
                                  f"running?); weights were reloaded while rollouts were in flight")
        return results[0] if isinstance(results[0], dict) else {}

    def probe_requests(self) -> list[GenerationRequest]:
        """The fixed verification probe: an image, a question, the forced thinking prefix and a
        fixed answer (`PROBE_ANSWER`), all as prompt text (greedy, one new token)."""
        from PIL import Image

        image = (self._probe_images or [Image.new("RGB", (64, 64), (180, 40, 40))])[0]
        prompt = self.chat.prompt(PROBE_QUESTIONS[0], 1, Mode.THINK) + PROBE_ANSWER
        return [GenerationRequest(prompt=prompt, images=[image], mode=Mode.THINK, max_new_tokens=1,
                                  temperature=0.0, key="probe")]

    def _probe_inputs(self):
        """(request, trainer-side processor output) of the probe, encoded once per engine."""
        if self._probe is None:
            req = self.probe_requests()[0]
            images = load_images(req.images)
            self._probe = (req, images, encode_prompts(self.processor, [req.prompt], [images]))
        return self._probe

    def verify(self, model, version: int | None = None) -> float:
        """Max |logprob difference| between the server and the trainer's model on every position of
        the fixed probe (image, question, forced prefix, answer), scored in one prefill on the server
        (`prompt_logprobs`) while the trainer runs its own forward; raises WeightSyncError above the
        tolerance or if the server tokenized the probe differently.

        Teacher forcing a fixed text checks the same thing as scoring a generated one — every
        position's full-vocabulary log-softmax depends on every weight — without a decode loop on
        the server or a dependency between the two sides. Logprobs here are plain log_softmax(logits)
        (prompt logprobs see no sampling processors), on both sides."""
        return self._check_probe(*self._start_probe(model), version)

    def _start_probe(self, model) -> tuple[cf.Future, list[int], list[float]]:
        """Score the probe with the trainer's model and send it to the server (a pool future)."""
        future = self._send_probe()
        return (future, *self._trainer_probe(model))

    def _send_probe(self) -> cf.Future:
        req, images, _ = self._probe_inputs()
        body = self._body(req, images)
        body.update({"prompt_logprobs": 0, "logprobs": False})
        body.pop("top_logprobs", None)
        return self._pool.submit(self._post, "/v1/chat/completions", body, "weight-sync probe")

    def _trainer_probe(self, model) -> tuple[list[int], list[float]]:
        """The probe's token ids and the trainer's logprob of each next token. Runs on the calling
        thread: the model is never touched from another thread."""
        import torch

        _, _, enc = self._probe_inputs()
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = model(**{k: v.to(device) for k, v in enc.items()}).logits[0].float()
        finally:
            model.train(was_training)
        ids = enc["input_ids"][0].tolist()
        ours = torch.log_softmax(logits[:-1], dim=-1).gather(1, enc["input_ids"][0, 1:].to(device).unsqueeze(1))
        return ids, ours.flatten().tolist()

    def _check_probe(self, future: cf.Future, ids: list[int], ours: list[float], version: int | None) -> float:
        resp = self._wait([future])[0]
        server_ids = resp.get("prompt_token_ids") or []
        if server_ids != ids:
            raise WeightSyncError(f"weight sync: the server tokenized the probe differently from the trainer "
                                  f"({len(server_ids)} vs {len(ids)} ids); the sidecar serves a different "
                                  f"tokenizer or processor")
        theirs = resp.get("prompt_logprobs") or []
        if len(theirs) != len(ids):
            raise VLLMEngineError(f"vLLM server at {self.url}: the probe returned {len(theirs)} prompt logprobs "
                                  f"for {len(ids)} prompt tokens; the server must support prompt_logprobs")
        worst = 0.0
        for t in range(1, len(ids)):
            entry = theirs[t].get(str(ids[t])) or theirs[t].get(ids[t])
            worst = max(worst, abs(float(entry["logprob"]) - ours[t - 1]))
        label = f"v{version}" if version is not None else "(check)"
        if worst > self.sync_tolerance:
            raise WeightSyncError(f"weight sync {label}: sidecar logprobs differ from the trainer's by max "
                                  f"{worst:.3e} > bpo.sync_tolerance {self.sync_tolerance:g}; the sidecar is "
                                  f"serving stale or different weights")
        return worst

    def update_weights(self, model_or_path: Any, version: int) -> None:
        """Push the weights, then verify them against the trainer's model; raise on mismatch.

        The trainer scores the probe while the server reloads. With `overlap_verify` the server's
        answer is checked by the next `generate` (or `wait_verified`): the probe prefill runs
        alongside the next rollouts instead of before them, and those rollouts are returned only
        once it matched."""
        self.wait_verified()               # an earlier push's check is never dropped
        model = model_or_path
        if isinstance(model_or_path, (str, Path)):
            from r4b_core.models.loading import load_model

            model, _ = load_model(str(model_or_path))
        scored: list = []
        timings = self.push_weights(model_or_path, while_reloading=lambda: scored.append(self._trainer_probe(model)))
        ids, ours = scored[0]
        self._pending_verify = (self._send_probe(), ids, ours, version, time.perf_counter())
        self.last_sync = dict(timings)
        if not self.overlap_verify:
            self.wait_verified()
        self.policy_version = version

    def wait_verified(self) -> dict[str, float] | None:
        """Finish the pending sync check, if any: its figures (also merged into `last_sync`:
        verify_s from sending the probe to checking the answer, max_abs_diff), or None if none
        was pending. Raises WeightSyncError on a mismatch."""
        if self._pending_verify is None:
            return None
        future, ids, ours, version, t0 = self._pending_verify
        self._pending_verify = None
        diff = self._check_probe(future, ids, ours, version)
        result = {"verify_s": time.perf_counter() - t0, "max_abs_diff": diff}
        self.last_sync.update(result)
        self.sync_checks.append(dict(result, version=version))
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._sync_dir is not None:
            shutil.rmtree(self._sync_dir, ignore_errors=True)
            self._sync_dir = None
