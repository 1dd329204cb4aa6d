"""The thinking budget without vLLM (r4b_core/assets/r4b_thinking.py): the per-request state the
logits processor runs, driven through a decoding loop on the tiny tokenizer; the usage count it
limits; the request policy (fields, server default, limit, short mode); the middleware that applies
it. The served budget with the real openai client: tests/integration/test_serving.py."""

from __future__ import annotations

import asyncio
import json

import pytest
from serving_plugin import PLUGIN, THINKING

from r4b_core import modes, serve
from r4b_core.rollout import vllm_server
from r4b_core.config import RunConfig

CORPUS = ["What is 12 + 30?", "12 + 30 = 42", "A = 14\nB = 2\nA - B = 12", "red: C = 8942", "14", "8942"] * 20


@pytest.fixture(scope="module")
def tok():
    from r4b_core.models.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, 400)


@pytest.fixture(scope="module")
def tokens(tok):
    return THINKING.ThinkTokens(tok)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def decode(tokens, budget: int | None, prompt: list[int], natural: list[int]) -> list[int]:
    """Greedy decoding as vLLM runs it with the processor: each step the budget may force a token;
    otherwise the "model" continues its natural output, and after a `</think>` continues with what
    followed its own `</think>` (its answer)."""
    close = tokens.close_id
    after_close = natural[natural.index(close) + 1:] if close in natural else []
    state = THINKING.ThinkingBudget(budget, prompt, tokens) if budget is not None else None
    out: list[int] = []
    while True:
        forced = state.advance(out) if state else None
        if forced is not None:
            out.append(forced)
            continue
        if close in out and close in natural:
            k = len(out) - out.index(close) - 1
            if k >= len(after_close):
                return out
            out.append(after_close[k])
        elif len(out) < len(natural):
            out.append(natural[len(out)])
        else:
            return out


LONG_PROMPT = modes.chat_prompt("What is 12 + 30?", 0, "long")
AUTO_PROMPT = modes.chat_prompt("What is 12 + 30?", 0, "auto")
SHORT_PROMPT = modes.chat_prompt("What is 12 + 30?", 0, "short")
REASONING = "A = 14\nB = 2\nA - B = 12"


@pytest.mark.parametrize("prompt,lead", [(LONG_PROMPT, ""), (AUTO_PROMPT, "\n")], ids=["long", "auto"])
def test_a_budget_closes_the_block_with_think_end_after_that_many_reasoning_tokens(tok, tokens, prompt, lead):
    natural = ids(tok, lead + REASONING + modes.THINK_END + "12" + modes.IM_END)
    reasoning = ids(tok, REASONING)
    assert tokens.reasoning_count(natural) == len(reasoning)
    for budget in range(len(reasoning)):
        out = decode(tokens, budget, ids(tok, prompt), natural)
        kept = reasoning[:budget]
        if kept and kept[-1:] == tokens.end_head:   # the model's own "\n": the closing string goes on from it
            kept = kept[:-1]
        # at budget 0 the block is closed before the model writes anything (the auto decision too)
        opening = ids(tok, lead) if budget else []
        assert out == opening + kept + tokens.end_ids + ids(tok, "12" + modes.IM_END), (budget, tok.decode(out))
        assert tokens.reasoning_count(out) == len(kept) <= budget
        text = tok.decode(out)
        assert modes.parse_response(text, modes.Mode.THINK if not lead else modes.Mode.AUTO).answer == "12"
    # a budget at least the reasoning's length changes no token (the model closes the block itself)
    for budget in (len(reasoning), len(reasoning) + 1, len(reasoning) + 3, 10_000):
        assert decode(tokens, budget, ids(tok, prompt), natural) == natural, budget


def test_the_closing_string_is_ours_and_a_skipped_block_is_never_forced(tok, tokens):
    assert THINKING.THINK_END == modes.THINK_END and tok.decode(tokens.end_ids) == modes.THINK_END
    skipped = ids(tok, "\n\n" + modes.THINK_CLOSE + "\n\n14" + modes.IM_END)   # auto mode answering directly
    for budget in (1, 2, 5):
        assert decode(tokens, budget, ids(tok, AUTO_PROMPT), skipped) == skipped
    assert tokens.reasoning_count(skipped) == 0
    # short mode: the prompt closed the block, nothing is counted or forced (even at budget 0)
    answer = ids(tok, "14" + modes.IM_END)
    assert decode(tokens, 0, ids(tok, SHORT_PROMPT), answer) == answer
    # a block the output opens itself (a raw /v1/completions prompt) is budgeted too
    opened = ids(tok, modes.THINK_OPEN + "\n" + REASONING + modes.THINK_END + "12")
    out = decode(tokens, 3, ids(tok, "What is 12 + 30?"), opened)
    assert tok.decode(out) == modes.THINK_OPEN + "\n" + tok.decode(ids(tok, REASONING)[:3]) + modes.THINK_END + "12"


def test_budget_state_waits_for_async_placeholders_and_stops_after_the_block(tok, tokens):
    prompt = ids(tok, LONG_PROMPT)
    state = THINKING.ThinkingBudget(1, prompt, tokens)
    first = ids(tok, "A")
    assert state.advance(first + [-1]) == tokens.end_ids[0]      # the placeholder is not a token yet
    out = first + tokens.end_ids
    assert state.advance(out[:2]) == tokens.end_ids[1] and state.advance(out) is None and state.done
    assert state.advance(out + ids(tok, "A = 14")) is None        # the answer is never touched


POLICY = THINKING.BudgetPolicy(default=32, is_limit=True)


@pytest.mark.parametrize("request_,policy,expected", [
    # (request body, policy, (budget, chat_template_kwargs after, vllm_xargs after))
    ({"thinking_token_budget": 8}, POLICY, (8, None, {"r4b_thinking_budget": 8})),
    ({"chat_template_kwargs": {"thinking_mode": "long", "thinking_budget": 4}}, POLICY,
     (4, {"thinking_mode": "long"}, {"r4b_thinking_budget": 4})),
    ({"thinking_token_budget": 4, "chat_template_kwargs": {"thinking_budget": 4}}, POLICY,
     (4, {}, {"r4b_thinking_budget": 4})),
    ({}, POLICY, (32, None, {"r4b_thinking_budget": 32})),                       # the server default
    ({}, THINKING.BudgetPolicy(), (None, None, None)),                              # no default: no budget
    ({"thinking_token_budget": 99}, THINKING.BudgetPolicy(32, is_limit=False), (99, None, {"r4b_thinking_budget": 99})),
    ({"thinking_token_budget": 0, "chat_template_kwargs": {"thinking_mode": "auto"}}, POLICY,
     (0, {"thinking_mode": "short"}, None)),                                      # 0: the short-mode prompt
    ({"thinking_token_budget": 5, "chat_template_kwargs": {"thinking_mode": "short"}}, POLICY, (None, {"thinking_mode": "short"}, None)),
    ({"thinking_token_budget": 5, "chat_template_kwargs": {"enable_thinking": False}}, POLICY, (None, {"enable_thinking": False}, None)),
    ({"thinking_token_budget": 5, "vllm_xargs": {"other": 1}}, POLICY, (5, None, {"other": 1, "r4b_thinking_budget": 5})),
], ids=["vllm-field", "our-kwarg", "both-equal", "default", "none", "not-a-limit", "zero", "short", "disabled",
        "xargs-kept"])
def test_budget_policy(request_, policy, expected):
    request = json.loads(json.dumps(request_))
    _, budget = THINKING.apply_budget(request, policy, chat=True)
    assert (budget, request.get("chat_template_kwargs"), request.get("vllm_xargs")) == expected
    assert "thinking_token_budget" not in request     # vLLM's own budget never runs beside ours


@pytest.mark.parametrize("request_,message", [
    ({"thinking_token_budget": 33}, "thinking budget 33 is above this server's limit of 32 tokens "
                                    "(serve.thinking_budget); ask for at most 32"),
    ({"thinking_token_budget": -1}, "thinking_token_budget must be a non-negative whole number of tokens (got -1)"),
    ({"chat_template_kwargs": {"thinking_budget": "8"}},
     "chat_template_kwargs.thinking_budget must be a non-negative whole number of tokens (got '8')"),
    ({"thinking_token_budget": 4, "chat_template_kwargs": {"thinking_budget": 8}},
     "thinking_token_budget=4 and chat_template_kwargs.thinking_budget=8 disagree; give one of them"),
])
def test_budget_policy_refusals(request_, message):
    with pytest.raises(THINKING.BudgetError) as err:
        THINKING.apply_budget(request_, POLICY, chat=True)
    assert str(err.value) == message


def test_server_budget_reaches_the_plugin_through_serving_env():
    cfg = RunConfig.model_validate({"serve": {"thinking_budget": 24, "thinking_budget_is_limit": False}})
    policy = THINKING.BudgetPolicy.from_env(serve.serving_env(cfg))
    assert (policy.default, policy.is_limit) == (24, False)
    policy = THINKING.BudgetPolicy.from_env(serve.serving_env(RunConfig()))
    assert (policy.default, policy.is_limit) == (None, True)
    assert (serve.ENV_THINKING_BUDGET, serve.ENV_THINKING_BUDGET_IS_LIMIT) == (
        THINKING.ENV_THINKING_BUDGET, THINKING.ENV_THINKING_BUDGET_IS_LIMIT)
    module, _, name = vllm_server.BUDGET_PROCESSOR.partition(":")
    assert module == THINKING.__name__ and name == "ThinkingBudgetProcessor"
    assert serve.serving_args(RunConfig())[-4:-2] == ["--logits-processors", vllm_server.BUDGET_PROCESSOR]
    assert serve.serving_env(RunConfig())["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert THINKING.SERVING_MODES == tuple(modes.SERVING_MODE_NAMES)


def test_middleware_rewrites_the_budget_before_vllm_and_refuses_one_above_the_limit(monkeypatch):
    monkeypatch.setenv(THINKING.ENV_THINKING_BUDGET, "16")
    monkeypatch.delenv(THINKING.ENV_THINKING_BUDGET_IS_LIMIT, raising=False)
    monkeypatch.delenv(PLUGIN.ENV_API_KEY, raising=False)
    seen: list[dict] = []

    async def app(scope, receive, send):
        seen.append(json.loads((await receive())["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    def call(path: str, body: dict) -> list[dict]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

        async def send(message):
            sent.append(message)

        asyncio.run(PLUGIN.R4BServingMiddleware(app)({"type": "http", "method": "POST", "path": path}, receive, send))
        return sent

    call("/v1/chat/completions", {"messages": [], "chat_template_kwargs": {"thinking_mode": "long", "thinking_budget": 4}})
    call("/v1/chat/completions", {"messages": []})
    call("/v1/completions", {"prompt": "x", "thinking_token_budget": 2})
    assert [s.get("vllm_xargs") for s in seen] == [{"r4b_thinking_budget": 4}, {"r4b_thinking_budget": 16},
                                                    {"r4b_thinking_budget": 2}]
    assert seen[0]["chat_template_kwargs"] == {"thinking_mode": "long"} and "thinking_token_budget" not in seen[2]
    refused = call("/v1/chat/completions", {"messages": [], "thinking_token_budget": 17})
    assert refused[0]["status"] == 400 and len(seen) == 3
    error = json.loads(refused[-1]["body"])["error"]
    assert error["param"] == "thinking_token_budget" and "above this server's limit of 16 tokens" in error["message"]


def test_the_shared_rule_imports_without_vllm_where_vllm_is_installed(repo_root):
    """r4b_core.rollout.hf runs ThinkingBudget from this module, so importing it must not import vLLM
    (seconds, and a GPU probe) even in an environment that has vLLM; the processor class is made
    when vLLM asks for it by name (the server: tests/integration/test_thinking_budget_engines.py)."""
    import subprocess

    python = repo_root / ".venv-vllm" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv-vllm (make venv-vllm)")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import r4b_thinking; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))")
    done = subprocess.run([str(python), "-c", code, str(repo_root / "r4b_core" / "assets")], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    with pytest.raises(AttributeError, match="has no attribute 'Nothing'"):
        THINKING.Nothing
