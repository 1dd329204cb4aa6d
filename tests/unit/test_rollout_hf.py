"""HFEngine on the real tiny VLM: greedy output equals `model.generate`, logprobs equal a
teacher-forced forward (greedy and sampled), batching/padding does not change results, seeds
reproduce, n samples are consecutive, EOS stops a row, and the live module is shared."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from PIL import Image

from r4b_core import modes
from r4b_core.modes import Mode
from r4b_core.rollout.base import GenerationRequest, RolloutEngine
from r4b_core.rollout.hf import HFEngine, RolloutError, teacher_forced_logprobs

QUESTIONS = ["What is 12 + 30?", "What colour is the square in the middle of the picture?", "Add 3 and 4"]
COLOURS = [(200, 30, 30), (10, 200, 10), (0, 0, 250)]
MODES = [Mode.THINK, Mode.NO_THINK, Mode.AUTO]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from r4b_core.models.loading import load_model

    return load_model(str(tiny_model_dir))


def _requests(max_new=(9, 5, 14), **kw) -> list[GenerationRequest]:
    return [GenerationRequest(prompt=modes.chat_prompt(q, 1, m), images=[Image.new("RGB", (64, 64), c)], mode=m,
                              max_new_tokens=k, key=f"r{i}", **kw)
            for i, (q, c, m, k) in enumerate(zip(QUESTIONS, COLOURS, MODES, max_new))]


def test_greedy_equals_generate_and_logprobs_equal_teacher_forcing(tiny):
    model, processor = tiny
    engine = HFEngine(model, processor)
    assert isinstance(engine, RolloutEngine)
    reqs = _requests()
    outs = engine.generate(reqs)           # one left-padded batch of three prompt lengths
    assert [o.key for o in outs] == ["r0", "r1", "r2"] and [o.mode for o in outs] == MODES
    for req, out in zip(reqs, outs):
        enc = processor(text=[req.prompt], images=req.images, return_tensors="pt")
        with torch.no_grad():
            ref = model.generate(**enc, max_new_tokens=req.max_new_tokens, do_sample=False,
                                 suppress_tokens=engine.suppress_ids)
        assert out.token_ids == ref[0, enc["input_ids"].shape[1]:].tolist()
        assert out.prompt_token_ids == enc["input_ids"][0].tolist()
        assert out.finish_reason == ("stop" if out.token_ids[-1] == processor.tokenizer.eos_token_id else "length")
        tf = teacher_forced_logprobs(model, processor, req.prompt, req.images, out.token_ids)
        assert len(out.logprobs) == len(out.token_ids)
        assert max(abs(a - b) for a, b in zip(tf, out.logprobs)) < 1e-4
        assert all(lp <= 0 for lp in out.logprobs)
        assert out.text == processor.tokenizer.decode(out.token_ids, skip_special_tokens=True)


def test_batching_does_not_change_results(tiny):
    model, processor = tiny
    reqs = _requests(temperature=1.0, seed=11, n=2)
    together = HFEngine(model, processor).generate(reqs)
    alone = [c for r in reqs for c in HFEngine(model, processor, max_batch_size=1).generate([r])]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    for a, b in zip(together, alone):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_shared_prefill_and_dropping_finished_rows_do_not_change_results(tiny):
    """The engine prefills each request once for its n samples, draws sampling noise in blocks and
    drops finished rows from the batch; none of it may change a sample: greedy and sampled rows with
    budgets from 1 to 24 tokens (rows leave the batch at many different steps) give the same ids as
    each sample generated alone, and logprobs within 1e-5."""
    model, processor = tiny
    reqs = [dataclasses.replace(r, temperature=t, n=3, seed=20 + i, max_new_tokens=k)
            for i, (r, t, k) in enumerate(zip(_requests() * 2, (0.0, 1.0, 0.8, 1.0, 0.0, 1.3), (1, 24, 3, 17, 6, 11)))]
    together = HFEngine(model, processor).generate(reqs)
    alone = [c for r in reqs for c in HFEngine(model, processor, max_batch_size=1).generate([r])]
    assert [len(c.token_ids) for c in together] == [len(c.token_ids) for c in alone]
    assert len({len(c.token_ids) for c in together}) >= 5                       # rows finished at many steps
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.prompt_token_ids for c in together] == [c.prompt_token_ids for c in alone]
    for a, b in zip(together, alone):
        assert a.finish_reason == b.finish_reason
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


def test_static_cache_decoder_matches_the_models_forward(tiny):
    """The engine decodes the tiny Qwen3 text model with its own static-cache step (checked once
    against the model's forward); forcing the model's forward instead gives the same tokens and
    logprobs within 1e-5, also while finished rows leave the batch."""
    model, processor = tiny
    reqs = [dataclasses.replace(r, temperature=t, n=4, seed=40 + i, max_new_tokens=k)
            for i, (r, t, k) in enumerate(zip(_requests(), (1.0, 0.0, 1.2), (20, 7, 13)))]
    fast_engine = HFEngine(model, processor)
    fast = fast_engine.generate(reqs)
    assert fast_engine._fast_checked == {id(model): True}
    hf_engine = HFEngine(model, processor)
    hf_engine._fast_checked[id(model)] = False              # as if the check had failed
    slow = hf_engine.generate(reqs)
    assert [c.token_ids for c in fast] == [c.token_ids for c in slow]
    assert len({len(c.token_ids) for c in fast}) > 2
    for a, b in zip(fast, slow):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-5


def test_sampling_is_seeded_and_logprobs_follow_the_temperature(tiny):
    model, processor = tiny
    engine = HFEngine(model, processor)
    req = GenerationRequest(prompt=modes.chat_prompt(QUESTIONS[0], 1, Mode.THINK), images=[Image.new("RGB", (64, 64))],
                            mode=Mode.THINK, n=4, temperature=0.7, seed=5, max_new_tokens=12, key="s")
    a, b = engine.generate([req]), engine.generate([req])
    assert len(a) == 4 and all(c.key == "s" for c in a)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]                 # same seed, same samples
    assert len({tuple(c.token_ids) for c in a}) > 1                              # n samples differ
    other = engine.generate([dataclasses.replace(req, seed=6)])
    assert [c.token_ids for c in other] != [c.token_ids for c in a]
    for c in a:
        tf = teacher_forced_logprobs(model, processor, req.prompt, req.images, c.token_ids, temperature=0.7)
        assert max(abs(x - y) for x, y in zip(tf, c.logprobs)) < 1e-4
        t1 = teacher_forced_logprobs(model, processor, req.prompt, req.images, c.token_ids, temperature=1.0)
        assert max(abs(x - y) for x, y in zip(t1, c.logprobs)) > 1e-3           # not the T=1 distribution


def test_sampling_follows_the_distribution(tiny):
    """First-token frequencies of 1000 samples match softmax(logits / T) within 4.5 sigma (top tokens
    and the rest as one bucket)."""
    model, processor = tiny
    prompt = modes.chat_prompt(QUESTIONS[1], 1, Mode.NO_THINK)
    img = Image.new("RGB", (64, 64), (90, 90, 90))
    t, n = 0.5, 1000
    outs = HFEngine(model, processor, max_batch_size=n).generate(
        [GenerationRequest(prompt=prompt, images=[img], n=n, temperature=t, seed=1, max_new_tokens=1)])
    enc = processor(text=[prompt], images=[img], return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**enc).logits[0, -1].float() / t, dim=-1)
    freq = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=probs.numel()).double() / n
    top = probs.topk(5).indices
    p = torch.cat([probs[top].double(), 1 - probs[top].double().sum().unsqueeze(0)])
    f = torch.cat([freq[top], 1 - freq[top].sum().unsqueeze(0)])
    sigma = (p * (1 - p) / n).sqrt()
    assert bool(((f - p).abs() <= 4.5 * sigma + 1e-9).all()), (f, p)


def test_eos_stops_and_is_kept_in_ids_not_text(tiny):
    model, processor = tiny
    eos = processor.tokenizer.eos_token_id
    boosted = copy.deepcopy(model)
    req = _requests()[0]
    enc = processor(text=[req.prompt], images=req.images, return_tensors="pt")
    with torch.no_grad():
        logits = boosted(**enc).logits[0, -1]
        first = int(logits.argmax())
        assert logits[first] > 0
        boosted.lm_head.weight[eos] = boosted.lm_head.weight[first] * 10   # EOS now wins at step one
    out = HFEngine(boosted, processor).generate([req])[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop" and out.text == ""
    assert len(out.logprobs) == 1


def test_image_placeholder_is_never_generated(tiny):
    """A completion containing <image> could not be fed back to Llava: both engines mask it."""
    model, processor = tiny
    image_id = processor.tokenizer.convert_tokens_to_ids(modes.IMAGE_TOKEN)
    boosted = copy.deepcopy(model)
    req = _requests()[0]
    enc = processor(text=[req.prompt], images=req.images, return_tensors="pt")
    with torch.no_grad():
        logits = boosted(**enc).logits[0, -1]
        first = int(logits.argmax())
        assert logits[first] > 0
        boosted.lm_head.weight[image_id] = boosted.lm_head.weight[first] * 10   # <image> would win
        assert int(boosted(**enc).logits[0, -1].argmax()) == image_id
    engine = HFEngine(boosted, processor)
    assert engine.suppress_ids == [image_id]
    for out in engine.generate([req, dataclasses.replace(req, temperature=1.0, n=4, seed=2)]):
        assert image_id not in out.token_ids
        tf = teacher_forced_logprobs(boosted, processor, req.prompt, req.images, out.token_ids,
                                     temperature=1.0)
        assert max(abs(a - b) for a, b in zip(tf, out.logprobs)) < 1e-4


def test_update_weights_shares_the_live_module(tiny, tiny_model_dir):
    model, processor = tiny
    live = copy.deepcopy(model)
    engine = HFEngine(live, processor)
    req = _requests()[:1]
    before = engine.generate(req)[0]
    with torch.no_grad():
        for p in live.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    engine.update_weights(live, version=3)
    after = engine.generate(req)[0]
    assert engine.policy_version == 3 and after.policy_version == 3 and before.policy_version == 0
    assert after.token_ids != before.token_ids or after.logprobs != before.logprobs
    engine.update_weights(str(tiny_model_dir), version=4)                      # a saved folder
    assert engine.generate(req)[0].token_ids == before.token_ids


def test_bad_requests_are_rejected_with_the_key(tiny):
    model, processor = tiny
    engine = HFEngine(model, processor)
    with pytest.raises(RolloutError, match=r"request 'k1'.*1 <image> placeholder\(s\) but 0 image"):
        engine.generate([GenerationRequest(prompt=modes.chat_prompt("q", 1), images=[], key="k1")])
    with pytest.raises(RolloutError, match="max_new_tokens >= 1"):
        engine.generate([GenerationRequest(prompt=modes.chat_prompt("q", 0), max_new_tokens=0, key="k2")])


def test_text_only_and_image_paths(tiny, tmp_path):
    model, processor = tiny
    path = tmp_path / "img.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    engine = HFEngine(model, processor)
    with_path = engine.generate([GenerationRequest(prompt=modes.chat_prompt("q", 1), images=[str(path)], max_new_tokens=4)])
    with_pil = engine.generate([GenerationRequest(prompt=modes.chat_prompt("q", 1),
                                                  images=[Image.open(path)], max_new_tokens=4)])
    assert with_path[0].token_ids == with_pil[0].token_ids
    text_only = engine.generate([GenerationRequest(prompt=modes.chat_prompt("q", 0), max_new_tokens=4)])
    assert len(text_only[0].token_ids) == 4 and text_only[0].finish_reason == "length"


def test_prompt_too_long_for_the_model_is_refused_before_any_prefill(tiny):
    """A prompt that leaves no room in the model's positions (2048 here) is a PromptTooLong naming
    the requests, raised before the prefill that would cost minutes and GBs; a prompt that fits
    generates at most the positions left (as vLLM clamps max_tokens)."""
    from r4b_core.rollout.base import PromptTooLong

    model, processor = tiny
    engine = HFEngine(model, processor)
    assert engine.max_positions == model.config.text_config.max_position_embeddings == 2048

    def prompt(terms: int) -> str:
        return modes.chat_prompt("What is " + " + ".join(str(i % 10) for i in range(terms)) + "?", 0, Mode.NO_THINK)

    def length(terms: int) -> int:
        return len(processor.tokenizer(prompt(terms))["input_ids"])

    near = next(t for t in range(600, 800) if 2040 <= length(t) < 2048)   # leaves 1 to 8 positions
    reqs = [GenerationRequest(prompt=prompt(3), max_new_tokens=4, key="ok"),
            GenerationRequest(prompt=prompt(6000), max_new_tokens=4, key="long"),
            GenerationRequest(prompt=prompt(2000), max_new_tokens=1, key="long2")]
    with pytest.raises(PromptTooLong) as info:
        engine.generate(reqs)
    assert info.value.keys == ["long", "long2"]
    msg = str(info.value)
    assert msg.startswith(f"request 'long': a prompt of {length(6000)} tokens leaves no room in the model's 2048 "
                          "positions (and 1 more requests); shorten the question") and "\n" not in msg
    out = engine.generate([reqs[0], GenerationRequest(prompt=prompt(near), max_new_tokens=64, key="near")])
    assert [c.key for c in out] == ["ok", "near"]
    assert len(out[1].token_ids) <= 2048 - length(near) and out[1].finish_reason in ("length", "stop")


BUDGET_QUESTIONS = ["What is 12 + 30?", "What colour is the square?", "Add 3 and 4", "How many shapes are there?"]


def test_thinking_budget_closes_the_block_where_the_served_rule_does(tiny, one_torch_thread):
    """A request's thinking_budget runs the rule of the served logits processor
    (r4b_core/assets/r4b_thinking.py, ThinkingBudget): the output is the unbudgeted one up to the
    token where the reasoning has used the budget, then THINK_END is forced (logprob 0 each, as vLLM
    reports a forced token) and the model answers; reasoning never exceeds the budget; a budget above
    the think block's length (the random model closes some blocks itself) changes no token; a
    no-think prompt is never forced; budgeted and unbudgeted rows share a batch unchanged."""
    from r4b_core.assets.r4b_thinking import ThinkingBudget, ThinkTokens

    model, processor = tiny
    engine = HFEngine(model, processor)
    tk = ThinkTokens.of(processor.tokenizer)
    reqs = [GenerationRequest(prompt=modes.chat_prompt(q, 1, m), images=[Image.new("RGB", (64, 64), (60 * i, 30, 90))],
                              mode=m, max_new_tokens=40, key=f"{i}-{m.value}")
            for i, q in enumerate(BUDGET_QUESTIONS) for m in (Mode.THINK, Mode.AUTO, Mode.NO_THINK)]
    plain = engine.generate(reqs)
    length = {}      # the think block's tokens up to the model's own `</think>` (the budget's count)
    for c in plain:
        unlimited = ThinkingBudget(10**9, c.prompt_token_ids, tk)
        unlimited.advance(c.token_ids)
        length[c.key] = len(unlimited.block)
    closed_itself = [c.key for c in plain if tk.close_id in c.token_ids and length[c.key] > 0]
    assert len(closed_itself) >= 2, "the tiny model no longer closes a think block: pick other questions"
    cut = unchanged = 0
    for budget in (0, 4, 16):
        outs = engine.generate([dataclasses.replace(r, thinking_budget=budget) for r in reqs])
        for req, before, out in zip(reqs, plain, outs):
            if req.mode is Mode.NO_THINK or budget > length[req.key]:
                assert (out.token_ids, out.logprobs) == (before.token_ids, before.logprobs), (budget, req.key)
                unchanged += req.mode is not Mode.NO_THINK
                continue
            state, forced_at, seen = ThinkingBudget(budget, out.prompt_token_ids, tk), [], []
            for i, t in enumerate(out.token_ids):
                forced = state.advance(seen)
                if forced is not None:
                    assert t == forced
                    forced_at.append(i)
                seen.append(t)
            first = forced_at[0]
            assert out.token_ids[:first] == before.token_ids[:first]
            assert [out.logprobs[i] for i in forced_at] == [0.0] * len(forced_at)
            end = forced_at[-1] + 1        # the forced tokens finish our closing string (or the length limit hit)
            assert forced_at == list(range(first, end))
            assert processor.tokenizer.decode(out.token_ids[:end]).endswith(modes.THINK_END) or end == len(out.token_ids)
            assert tk.reasoning_count(out.token_ids, tk.open_at_end(out.prompt_token_ids)) <= budget
            assert modes.parse_response(out.text, req.mode).closed
            cut += 1
    assert cut >= 10 and unchanged >= 2
    mixed = [dataclasses.replace(r, thinking_budget=4 if k % 2 else None) for k, r in enumerate(reqs)]
    alone = engine.generate([r for r in mixed if r.thinking_budget]) + engine.generate([r for r in mixed if not r.thinking_budget])
    together = engine.generate(mixed)
    assert sorted((c.key, c.token_ids) for c in together) == sorted((c.key, c.token_ids) for c in alone)
    with pytest.raises(RolloutError, match="thinking_budget=-1; need a number of tokens >= 0"):
        engine.generate([dataclasses.replace(reqs[0], thinking_budget=-1)])
