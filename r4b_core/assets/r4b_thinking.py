"""Thinking budget and mode metrics of r4b serving, in the vLLM server process.

The middleware and the reasoning parser of r4b_vllm_serving.py (the same folder, on the server's
PYTHONPATH) call into this module; vLLM loads its logits processor with
`--logits-processors r4b_thinking:ThinkingBudgetProcessor` (r4b_core.serve.serving_args).

A request's budget is `thinking_token_budget` (vLLM's field) or chat_template_kwargs
`thinking_budget`, else the server's default `R4B_THINKING_BUDGET` (serve.thinking_budget), which
is also the most a request may ask for unless `R4B_THINKING_BUDGET_IS_LIMIT=0`. It counts the
reasoning tokens the model writes, not the template's newline after `<think>` nor the auto-mode
decision newline, and equals usage.completion_tokens_details.reasoning_tokens. When it runs out,
the think block is closed with `modes.THINK_END` (`\\n</think>\\n\\n`) token by token, from
whatever part of it the output already ends with, and the model writes its answer. A `</think>` the
model writes itself ends the block at once, so a budget at least as long as the reasoning changes
no token. Short mode has no budget; budget 0 renders the short-mode prompt (the empty block the
model was trained on).

Why not vLLM 0.32's own `thinking_token_budget` (driven by the reasoning config's start/end ids):
it forces the parser's end string, a bare `</think>`, straight after the last reasoning token, a
context the model never saw in training, and answers degrade or go empty. Configuring our closing
string instead (`--reasoning-config '{"reasoning_end_str": ...}'`) breaks on the V1 model runner
(CPU, and GPU when Model Runner V2 is off): it recognises a natural end only as that whole string,
so an auto-mode answer that skipped thinking (`\\n\\n</think>`) still counts as thinking, and gets
`\\n</think>\\n\\n` forced into the middle of its answer (seen with the tiny champion). The logits
processor here has vLLM's V1 interface, so serving runs Model Runner V1
(`VLLM_USE_V2_MODEL_RUNNER=0`, set by serve.serving_env and the Helm chart).

Mode metrics: the r4b_* series that `/metrics` serves beside vLLM's own (docs/serving.md).

The platform imports this module too (tests, and r4b_core.rollout.hf, whose decode loop runs the
same ThinkingBudget): only the logits processor needs vLLM, and it is defined when vLLM asks for it.
"""

from __future__ import annotations

import os

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
THINK_END = "\n" + THINK_CLOSE + "\n\n"   # = r4b_core.modes.THINK_END (a test keeps them equal)
IM_END = "<|im_end|>"
SERVING_MODES = ("auto", "long", "short")  # = r4b_core.modes.SERVING_MODE_NAMES
# thinking_mode values whose prompt already holds the closed, empty think block (the template's
# "short"); `enable_thinking: false` means the same when thinking_mode is not given.
DIRECT_MODES = frozenset({"short"})

ENV_THINKING_BUDGET = "R4B_THINKING_BUDGET"                     # serve.thinking_budget ("" = none)
ENV_THINKING_BUDGET_IS_LIMIT = "R4B_THINKING_BUDGET_IS_LIMIT"   # serve.thinking_budget_is_limit
# the request field that carries the budget to the logits processor (SamplingParams.extra_args)
BUDGET_XARG = "r4b_thinking_budget"


def requested_mode(chat_template_kwargs: dict | None) -> str:
    """The mode the template renders: thinking_mode first, then enable_thinking, default auto
    (lower-cased; an unknown name comes back as it is, and the template refuses it)."""
    kw = chat_template_kwargs if isinstance(chat_template_kwargs, dict) else {}
    mode = kw.get("thinking_mode")
    if mode is not None:
        return str(mode).strip().lower()
    enable = kw.get("enable_thinking")
    if enable is None:
        return "auto"
    return "long" if enable else "short"


# ---------------------------------------------------------------------------------------------
# Token rules: what counts as reasoning, and the budget's state per request
# ---------------------------------------------------------------------------------------------
class ThinkTokens:
    """The think-block token ids of one tokenizer: `<think>`, `</think>`, the ids of THINK_END, and
    which ids are blank (whitespace only; each decoded once, when first met at a block's start)."""

    _of: dict[int, ThinkTokens] = {}

    @classmethod
    def of(cls, tokenizer) -> ThinkTokens:
        """One instance per tokenizer (the parser is made per request)."""
        tokens = cls._of.get(id(tokenizer))
        if tokens is None or tokens.tokenizer is not tokenizer:
            tokens = cls._of[id(tokenizer)] = cls(tokenizer)
        return tokens

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.open_id = self._single(tokenizer, THINK_OPEN)
        self.close_id = self._single(tokenizer, THINK_CLOSE)
        self.end_ids = list(tokenizer.encode(THINK_END, add_special_tokens=False))
        if self.close_id not in self.end_ids:
            raise ValueError(f"thinking budget: the tokenizer merges {THINK_CLOSE!r} into its neighbours in "
                             f"{THINK_END!r} ({self.end_ids})")
        self.end_head = self.end_ids[:self.end_ids.index(self.close_id)]   # THINK_END's ids before `</think>`
        self._blank: dict[int, bool] = {}

    @staticmethod
    def _single(tokenizer, text: str) -> int:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"thinking budget: {text!r} is not one token of this tokenizer ({ids}); the "
                             f"model's chat template must use it as a single think tag")
        return ids[0]

    def is_blank(self, token_id: int) -> bool:
        blank = self._blank.get(token_id)
        if blank is None:
            blank = self._blank[token_id] = not self.tokenizer.decode([token_id]).strip()
        return blank

    def open_at_end(self, prompt_ids) -> bool:
        """Does the prompt end inside an open think block (the auto and long prompts do)?"""
        for t in reversed(prompt_ids or ()):
            if t == self.open_id:
                return True
            if t == self.close_id:
                return False
        return False

    def reasoning_count(self, output_ids, open_at_start: bool = True) -> int:
        """Reasoning tokens of an output: its first think block's tokens from the first non-blank
        one, without `<think>` tags and without THINK_END's head before the `</think>` that closed
        it. The budget limits this number; usage.completion_tokens_details reports it."""
        in_block = open_at_start
        block: list[int] = []
        for t in output_ids:
            if t == self.open_id:
                in_block = True
            elif not in_block:
                continue
            elif t == self.close_id:
                head = len(self.end_head)
                if head and block[-head:] == self.end_head:
                    del block[-head:]
                break
            elif block or not self.is_blank(t):
                block.append(t)
        return len(block)


class ThinkingBudget:
    """One request's think block under a budget of `budget` reasoning tokens.

    `advance(output_ids)` reads the tokens generated so far and returns the id the next token must
    be (one of THINK_END's) or None. The block is open from the prompt (auto and long prompts end
    inside it) or from a `<think>` in the output; it ends at the model's own `</think>` or after the
    forced closing string, and the request is left alone from then on (`done`).
    """

    def __init__(self, budget: int, prompt_ids, tokens: ThinkTokens):
        self.budget = budget
        self.tokens = tokens
        self.in_block = tokens.open_at_end(prompt_ids)
        self.done = False
        self.block: list[int] = []       # the block's counted tokens
        self.forcing: int | None = None  # index in tokens.end_ids of the next forced token
        self.seen = 0

    def advance(self, output_ids) -> int | None:
        tk = self.tokens
        while self.seen < len(output_ids) and not self.done:
            t = output_ids[self.seen]
            if t < 0:      # an async-scheduling placeholder: not sampled yet
                break
            self.seen += 1
            if self.forcing is not None:
                self.forcing += 1
                self.done = self.forcing >= len(tk.end_ids)
            elif not self.in_block:
                self.in_block = t == tk.open_id
            elif t == tk.close_id:
                self.done = True
            elif t != tk.open_id and (self.block or not tk.is_blank(t)):
                self.block.append(t)
        if self.done or not self.in_block:
            return None
        if self.forcing is None:
            if len(self.block) < self.budget:
                return None
            # close from where the output already is: its tail may be the start of THINK_END
            self.forcing = next((k for k in range(len(tk.end_ids) - 1, 0, -1)
                                 if self.block[-k:] == tk.end_ids[:k]), 0)
        return tk.end_ids[self.forcing]


def budget_replay(budget: int, prompt_ids, output_ids, tokens: ThinkTokens) -> str:
    """An output replayed token by token under ThinkingBudget: "closed" (the budget closed its think
    block), "within" (it never had to) or "over" (a token where the rule forces another: the output
    was not generated under this budget)."""
    state = ThinkingBudget(budget, prompt_ids, tokens)
    seen: list[int] = []
    closed = False
    for t in output_ids:
        forced = state.advance(seen)
        if state.done:
            break
        if forced is not None:
            if t != forced:
                return "over"
            closed = True
        seen.append(t)
    return "closed" if closed else "within"


# ---------------------------------------------------------------------------------------------
# The request's budget (the middleware applies it before vLLM sees the request)
# ---------------------------------------------------------------------------------------------
class BudgetError(ValueError):
    """A budget the server refuses: HTTP 400 with this message, `param` naming the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class BudgetPolicy:
    """The server's rules: `default` budget (None = none) and whether it is also the most a request
    may ask for (serve.thinking_budget, serve.thinking_budget_is_limit)."""

    def __init__(self, default: int | None = None, is_limit: bool = True):
        self.default = default
        self.is_limit = is_limit

    @classmethod
    def from_env(cls, env=None) -> BudgetPolicy:
        env = os.environ if env is None else env
        raw = (env.get(ENV_THINKING_BUDGET) or "").strip()
        return cls(int(raw) if raw else None, (env.get(ENV_THINKING_BUDGET_IS_LIMIT) or "1").strip() != "0")


def _asked(value, field: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise BudgetError(f"{field} must be a non-negative whole number of tokens (got {value!r})", field)
    return value


def apply_budget(request: dict, policy: BudgetPolicy, chat: bool) -> tuple[bool, int | None]:
    """Rewrite `request` to run its thinking budget; returns (request changed, budget or None).

    The budget is `thinking_token_budget` or `chat_template_kwargs.thinking_budget` (equal when both
    are given), else the policy's default; BudgetError for a bad value or one above the limit. Both
    fields are removed (vLLM's own budget must not run beside ours) and the budget goes to the
    logits processor as `vllm_xargs.r4b_thinking_budget`. For chat requests, short mode has no
    budget and budget 0 renders the short-mode prompt.
    """
    kwargs = request.get("chat_template_kwargs") if chat else None
    kwargs = kwargs if isinstance(kwargs, dict) else None
    vllm_field = _asked(request.pop("thinking_token_budget", None), "thinking_token_budget")
    our_field = _asked(kwargs.pop("thinking_budget", None) if kwargs else None, "chat_template_kwargs.thinking_budget")
    changed = vllm_field is not None or our_field is not None
    if vllm_field is not None and our_field is not None and vllm_field != our_field:
        raise BudgetError(f"thinking_token_budget={vllm_field} and chat_template_kwargs.thinking_budget={our_field} "
                          f"disagree; give one of them", "thinking_token_budget")
    asked = vllm_field if vllm_field is not None else our_field
    if chat and requested_mode(kwargs) in DIRECT_MODES:
        return changed, None
    limit = policy.default if policy.is_limit else None
    if asked is not None and limit is not None and asked > limit:
        raise BudgetError(f"thinking budget {asked} is above this server's limit of {limit} tokens "
                          f"(serve.thinking_budget); ask for at most {limit}", "thinking_token_budget")
    budget = asked if asked is not None else policy.default
    if budget is None:
        return changed, None
    if chat and budget == 0:
        request["chat_template_kwargs"] = {**(kwargs or {}), "thinking_mode": "short"}
    else:
        xargs = request.get("vllm_xargs")
        request["vllm_xargs"] = {**(xargs if isinstance(xargs, dict) else {}), BUDGET_XARG: budget}
    return True, budget


# ---------------------------------------------------------------------------------------------
# Mode metrics (docs/serving.md lists them)
# ---------------------------------------------------------------------------------------------
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class ModeMetrics:
    """The r4b_* series in prometheus_client's default registry, which vLLM's /metrics serves; one
    set per process (`get()`), None where prometheus_client is missing (the platform's tests)."""

    _instance: ModeMetrics | None = None

    def __init__(self, registry=None):
        from prometheus_client import Counter, Histogram

        kw = {} if registry is None else {"registry": registry}
        self.requests = Counter("r4b_requests_total", "Chat completions answered, by requested thinking mode",
                                ["mode"], **kw)
        self.decisions = Counter("r4b_auto_think_decisions_total", "Auto-mode chat completions by what the model "
                                 "chose: thought (reasoning tokens > 0) or skipped", ["decision"], **kw)
        self.reasoning_tokens = Counter("r4b_reasoning_tokens_total", "Reasoning tokens generated, by requested "
                                        "mode", ["mode"], **kw)
        self.answer_tokens = Counter("r4b_answer_tokens_total", "Completion tokens that are not reasoning (the "
                                     "answer, think tags, end of turn), by requested mode", ["mode"], **kw)
        self.budgeted = Counter("r4b_thinking_budget_requests_total", "Chat completions that ran under a thinking "
                                "budget, by requested mode", ["mode"], **kw)
        self.exhausted = Counter("r4b_thinking_budget_exhausted_total", "Chat completions whose reasoning used "
                                 "its whole budget (the budget closed the think block, or max_tokens ended the "
                                 "request right there)", ["mode"], **kw)
        self.first_answer = Histogram("r4b_time_to_first_answer_token_seconds", "Seconds from the request to its "
                                      "first non-blank answer text (streamed) or to the whole response (not "
                                      "streamed), by requested mode", ["mode"], buckets=LATENCY_BUCKETS, **kw)

    @classmethod
    def get(cls) -> ModeMetrics | None:
        if cls._instance is None:
            try:
                cls._instance = cls()
            except ImportError:
                return None
        return cls._instance

    def record(self, mode: str, budget: int | None, usage, first_answer_s: float | None) -> None:
        """One completed chat completion; `usage` is vLLM's final UsageInfo (None: not completed)."""
        if mode not in SERVING_MODES or usage is None:
            return
        details = getattr(usage, "completion_tokens_details", None)
        reasoning = int(getattr(details, "reasoning_tokens", 0) or 0)
        self.requests.labels(mode).inc()
        self.reasoning_tokens.labels(mode).inc(reasoning)
        self.answer_tokens.labels(mode).inc(max(0, int(usage.completion_tokens or 0) - reasoning))
        if mode == "auto":
            self.decisions.labels("thought" if reasoning else "skipped").inc()
        if budget is not None:
            self.budgeted.labels(mode).inc()
            if reasoning >= budget:
                self.exhausted.labels(mode).inc()
        if first_answer_s is not None:
            self.first_answer.labels(mode).observe(first_answer_s)


def has_answer_text(payload: dict) -> bool:
    """Does a streamed chat chunk carry answer text that is not just whitespace?"""
    return any(isinstance(c, dict) and isinstance(c.get("delta"), dict)
               and str(c["delta"].get("content") or "").strip() for c in payload.get("choices") or ())


# ---------------------------------------------------------------------------------------------
# The logits processor (vLLM environment only)
# ---------------------------------------------------------------------------------------------
def __getattr__(name: str):
    """`ThinkingBudgetProcessor`, defined on first access: vLLM loads it by name
    (`--logits-processors r4b_thinking:ThinkingBudgetProcessor`), while the platform (the HF
    rollout engine shares ThinkTokens and ThinkingBudget) imports this module without vLLM."""
    if name != "ThinkingBudgetProcessor":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    processor = globals()[name] = _define_processor()
    return processor


def _define_processor():
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    class ThinkingBudgetProcessor(LogitsProcessor):
        """Forces THINK_END where a request's reasoning reached `vllm_xargs.r4b_thinking_budget`
        (set by the middleware from the request and the server default, or by the rollout
        client); see ThinkingBudget."""

        @classmethod
        def validate_params(cls, params):
            _asked((params.extra_args or {}).get(BUDGET_XARG), f"vllm_xargs.{BUDGET_XARG}")

        def __init__(self, vllm_config, device, is_pin_memory):
            from vllm.tokenizers import cached_tokenizer_from_config

            self.tokens = ThinkTokens.of(cached_tokenizer_from_config(vllm_config.model_config))
            self.requests: dict[int, tuple[ThinkingBudget, list[int]]] = {}   # batch index -> state, output ids

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if not batch_update:
                return
            for index in batch_update.removed:
                self.requests.pop(index, None)
            for index, params, prompt_ids, output_ids in batch_update.added:
                budget = (params.extra_args or {}).get(BUDGET_XARG)
                if budget is None:
                    self.requests.pop(index, None)
                else:
                    self.requests[index] = (ThinkingBudget(budget, prompt_ids, self.tokens), output_ids)
            for a, b, direction in batch_update.moved:
                first, second = self.requests.pop(a, None), self.requests.pop(b, None)
                if first is not None:
                    self.requests[b] = first
                if direction == MoveDirectionality.SWAP and second is not None:
                    self.requests[a] = second

        def apply(self, logits):
            # read the output ids here, not in update_state: with async scheduling they are filled
            # in just before sampling
            for index, (state, output_ids) in list(self.requests.items()):
                forced = state.advance(output_ids)
                if state.done:
                    del self.requests[index]
                elif forced is not None and index < logits.shape[0]:
                    logits[index] = float("-inf")
                    logits[index, forced] = 0.0
            return logits

    ThinkingBudgetProcessor.__qualname__ = "ThinkingBudgetProcessor"   # pickled by name, found by __getattr__
    return ThinkingBudgetProcessor
