"""Sequence packing: rows fit and keep order, position ids restart, labels cover only targets, and
a sample's logits are the same packed with others as alone (no cross-sample attention) — checked
on the real tiny VLM with real synthetic images."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from r4b_core.training.packing import (IGNORE_INDEX, MODE_DIRECT, MODE_THINK, SEGMENT_ATTENTION, Sample,
                                       block_causal_mask, collate, pack_first_fit, padding_waste,
                                       use_segment_attention, varlen_kwargs)


@given(st.lists(st.integers(1, 64), max_size=60), st.integers(64, 200))
@settings(max_examples=200, deadline=None)
def test_first_fit_places_every_sample_once_in_order_and_within_length(lengths, pack_length):
    rows = pack_first_fit(lengths, pack_length)
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(len(lengths)))
    for row in rows:
        assert sum(lengths[i] for i in row) <= pack_length
        assert row == sorted(row)  # insertion order kept inside a row (the data stays shuffled)
    # First-fit never leaves two rows that could be merged: at most one row is half empty or worse.
    assert sum(1 for row in rows if sum(lengths[i] for i in row) <= pack_length / 2) <= 1


def test_first_fit_fills_gaps_with_later_short_samples():
    assert pack_first_fit([6, 6, 3, 4, 1], 10) == [[0, 2, 4], [1, 3]]


def test_overlong_sample_is_refused():
    with pytest.raises(ValueError, match="sample 1 has 11 tokens > pack_length 10"):
        pack_first_fit([3, 11], 10)


def _sample(ids, n_prompt, mode, pixels=None):
    return Sample(input_ids=list(ids), labels=[IGNORE_INDEX] * n_prompt + list(ids[n_prompt:]), mode=mode,
                  media={"pixel_values": pixels} if pixels is not None else {})


def test_collate_layout_positions_labels_mask_and_images():
    img_a, img_b = torch.full((1, 3, 4, 4), 1.0), torch.full((1, 3, 4, 4), 2.0)
    a = _sample([11, 12, 13, 14], 2, MODE_THINK, img_a)
    b = _sample([21, 22, 23], 1, MODE_DIRECT, img_b)
    c = _sample([31, 32], 1, MODE_DIRECT)
    batch = collate([[a, b], [c]], pad_id=0, length=8)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 23, 0], [31, 32, 0, 0, 0, 0, 0, 0]]
    # positions restart per sample; segments are unique over the batch, a pad tail joins its row's last
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["segment_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1, 1], [2] * 8]
    assert batch["labels"].tolist() == [[-100, -100, 13, 14, -100, 22, 23, -100], [-100, 32] + [-100] * 6]
    assert batch["token_mode"].tolist() == [[0, 0, 0, 0, 1, 1, 1, -1], [1, 1] + [-1] * 6]
    assert torch.equal(batch["pixel_values"], torch.cat([img_a, img_b]))  # token order
    allowed = batch["attention_mask"][:, 0] == 0
    row = allowed[0]
    assert row[5, 4] and row[5, 5] and not row[5, 6]           # causal inside sample b
    assert not row[4, :4].any() and not row[6, :4].any()       # b never sees a
    assert row[3, :4].all() and not row[3, 4:].any()           # a sees itself only
    assert row[7].tolist() == [False] * 7 + [True]             # a pad sees only itself (no NaN row)
    assert padding_waste(batch) == (9, 16)


def test_collate_refuses_a_row_longer_than_length():
    with pytest.raises(ValueError, match="row 0 holds 5 tokens > length 4"):
        collate([[_sample([1, 2, 3], 1, 0), _sample([4, 5], 1, 0)]], pad_id=0, length=4)


def test_collate_without_mask_for_segment_attention_and_with_the_models_own_for_one_sample_rows():
    a, b = _sample([11, 12, 13], 1, MODE_THINK), _sample([21, 22], 1, MODE_DIRECT)
    with_mask = collate([[a, b]], pad_id=0, length=6)
    bare = collate([[a, b]], pad_id=0, length=6, attention="varlen")
    assert "attention_mask" not in bare and "attention_mask" in with_mask
    assert {k: v.tolist() for k, v in bare.items()} == {k: v.tolist() for k, v in with_mask.items()
                                                        if k != "attention_mask"}
    padded = collate([[a], [b]], pad_id=0, attention="padding")
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    with pytest.raises(ValueError, match="one sample per row"):
        collate([[a, b]], pad_id=0, attention="padding")


def test_segment_bounds_come_from_the_segment_ids_not_positions():
    a, b, c = _sample([1, 2, 3], 1, 0), _sample([4, 5, 6, 7], 1, 0), _sample([8, 9], 1, 0)
    batch = collate([[a, b], [c]], pad_id=0, length=9, attention="varlen")
    # row 0: a, then b with the pad tail; row 1: c with its pad tail (one segment: plain padding)
    kw = varlen_kwargs(batch["segment_ids"])
    assert kw["cu_seq_lens_q"].tolist() == [0, 3, 9, 18] and kw["max_length_q"] == 9
    # M-RoPE positions (3, n) of the samples themselves: carried as they are, never read for bounds
    a.positions = torch.tensor([[0, 1, 5], [0, 2, 5], [0, 3, 5]])
    batch = collate([[a, b], [c]], pad_id=0, length=9, attention="varlen")
    assert batch["position_ids"].shape == (3, 2, 9)
    assert batch["position_ids"][:, 0, :3].tolist() == a.positions.tolist()
    assert batch["position_ids"][:, 0, 3:7].tolist() == [[0, 1, 2, 3]] * 3
    assert varlen_kwargs(batch["segment_ids"])["cu_seq_lens_q"].tolist() == [0, 3, 9, 18]


def test_media_of_samples_join_in_token_order_padded_to_the_largest():
    from r4b_core.models.inputs import join_media

    one = {"pixel_values": torch.ones(1, 2, 3), "image_sizes": torch.tensor([[4, 4]])}
    two = {"pixel_values": torch.full((2, 3, 3), 2.0), "image_sizes": torch.tensor([[4, 8], [8, 4]])}
    joined = join_media([one, two])
    assert joined["pixel_values"].shape == (3, 3, 3) and joined["image_sizes"].tolist() == [[4, 4], [4, 8], [8, 4]]
    assert joined["pixel_values"][0, :2].eq(1).all() and joined["pixel_values"][0, 2].eq(0).all()


def test_block_mask_matches_plain_causal_for_one_segment():
    seg = torch.zeros(1, 5, dtype=torch.long)
    mask = block_causal_mask(seg)[0, 0]
    assert torch.equal(mask == 0, torch.ones(5, 5, dtype=torch.bool).tril())


# -- on the real tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from test_anneal import sft_records, tiny_model

    from r4b_core.anneal import encode
    from r4b_core.data.images import load_image
    from r4b_core.data.schema import read_jsonl
    from r4b_core.models.loading import load_model

    root = tmp_path_factory.mktemp("packing")
    data = sft_records(root / "data", 4, both_modes=False)  # 2 thinking + 2 direct samples
    model, processor = load_model(tiny_model(root / "base", data))
    samples = []
    for rec in read_jsonl(data).records:
        images = [load_image(ref, str(data)) for ref in rec.images]
        samples.append(encode(rec, images, model, processor, pack_length=256, overlong="skip"))
    return model.eval(), processor, samples


def _inputs(batch):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "pixel_values") if k in batch}
    return inputs if "attention_mask" in batch else {**inputs, **varlen_kwargs(batch["segment_ids"])}


def _logits(model, batch):
    with torch.no_grad():
        return model(**_inputs(batch)).logits


def test_encoded_sample_follows_the_token_id_contract(tiny):
    from r4b_core import modes

    _, processor, samples = tiny
    tok = processor.tokenizer
    s = samples[0]
    prompt_len = s.meta["prompt_len"]
    assert all(t == IGNORE_INDEX for t in s.labels[:prompt_len])
    assert s.labels[prompt_len:] == s.input_ids[prompt_len:]
    assert s.input_ids[-1] == tok.convert_tokens_to_ids(modes.IM_END)  # the loss covers <|im_end|>
    # one <image> placeholder per image, expanded to the model's 16 image tokens
    image_id = tok.convert_tokens_to_ids(modes.IMAGE_TOKEN)
    assert s.input_ids.count(image_id) == 16 * s.media["pixel_values"].shape[0]
    # the forced prefix of the sample's mode is a token-exact prefix continuation of the prompt
    mode = modes.Mode.THINK if s.mode == MODE_THINK else modes.Mode.NO_THINK
    prefix = tok(modes.generation_prefix(mode), add_special_tokens=False)["input_ids"]
    assert s.input_ids[prompt_len:prompt_len + len(prefix)] == prefix


def test_packed_logits_equal_each_sample_alone(tiny):
    model, processor, samples = tiny
    pad = processor.tokenizer.pad_token_id
    packed = collate([samples[:3], samples[3:]], pad, length=256)
    out = _logits(model, packed)
    starts = {0: 0, 1: len(samples[0]), 2: len(samples[0]) + len(samples[1]), 3: 0}
    rows = {0: 0, 1: 0, 2: 0, 3: 1}
    for k, s in enumerate(samples):
        alone = _logits(model, collate([[s]], pad))[0]
        got = out[rows[k], starts[k]:starts[k] + len(s)]
        assert torch.allclose(got, alone, atol=1e-4), f"sample {k}: max diff {(got - alone).abs().max():.2e}"
    # and the check has teeth: a plain causal mask over the packed row changes the later samples
    leaky = dict(packed, attention_mask=block_causal_mask(torch.zeros_like(packed["position_ids"])))
    leak = _logits(model, leaky)[0, starts[1]:starts[1] + len(samples[1])]
    assert (leak - _logits(model, collate([[samples[1]]], pad))[0]).abs().max() > 1e-3


def test_padded_batch_logits_equal_each_sample_alone(tiny):
    model, processor, samples = tiny
    pad = processor.tokenizer.pad_token_id
    padded = collate([[s] for s in samples], pad)
    out = _logits(model, padded)
    for k, s in enumerate(samples):
        alone = _logits(model, collate([[s]], pad))[0]
        assert torch.allclose(out[k, :len(s)], alone, atol=1e-4)


def _loss_logits_grads(model, batch):
    """Token-mean loss, logits and parameter gradients of one collated batch."""
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    logits = model(**_inputs(batch)).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), logits.detach(), grads


def test_segment_attention_gives_the_mask_paths_loss_logits_and_gradients(tiny):
    model, processor, samples = tiny
    pad = processor.tokenizer.pad_token_id
    rows = [samples[:3], samples[3:]]
    try:
        use_segment_attention(model, False)
        ref_loss, ref_logits, ref_grads = _loss_logits_grads(model, collate(rows, pad, length=256))
        assert use_segment_attention(model, True) == "sdpa"
        assert model.config.text_config._attn_implementation == SEGMENT_ATTENTION
        assert model.config.vision_config._attn_implementation == "sdpa"  # one image: nothing to separate
        bare = collate(rows, pad, length=256, attention="varlen")
        loss, logits, grads = _loss_logits_grads(model, bare)
        # each sample of the packed rows is what it is alone (the cross-sample check, segment path)
        starts = [0, len(samples[0]), len(samples[0]) + len(samples[1]), 0]
        for k, (row, s) in enumerate(zip([0, 0, 0, 1], samples)):
            alone = _logits(model, collate([[s]], pad, attention="varlen"))[0]
            got = logits[row, starts[k]:starts[k] + len(s)]
            assert torch.allclose(got, alone, atol=1e-4), f"sample {k}: max diff {(got - alone).abs().max():.2e}"
        # plain padding (one sample + pad tail per row) takes the one-call path and agrees too
        padded = _logits(model, collate([[s] for s in samples], pad, attention="varlen"))
        for k, s in enumerate(samples):
            assert torch.allclose(padded[k, :len(s)], logits[[0, 0, 0, 1][k], starts[k]:starts[k] + len(s)], atol=1e-4)
    finally:
        use_segment_attention(model, False)
    real = bare["token_mode"] >= 0
    assert torch.allclose(logits[real], ref_logits[real], atol=1e-4)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 20
    top = max(float(g.abs().max()) for g in ref_grads.values())
    for name, g in grads.items():
        # relative per tensor, with a floor for the ones whose exact gradient is zero (an attention
        # key bias shifts every score of a query equally: softmax ignores it, only rounding is left)
        scale = float(ref_grads[name].abs().max())
        diff = float((g - ref_grads[name]).abs().max())
        assert diff <= 1e-4 * scale + 1e-6 * top, f"{name}: {diff:.2e} vs {scale:.2e}"


def test_segment_attention_is_not_saved_with_the_model(tiny, tmp_path):
    from r4b_core.models.loading import load_model, save_model

    model, processor, _ = tiny
    try:
        use_segment_attention(model, True)
        save_model(model, processor, tmp_path / "m")
    finally:
        use_segment_attention(model, False)
    assert SEGMENT_ATTENTION not in (tmp_path / "m" / "config.json").read_text()
    reloaded, _ = load_model(tmp_path / "m")
    assert reloaded.config.text_config._attn_implementation == "sdpa"


def test_anneal_token_losses_with_rows_end_to_end_equal_the_mask_paths(tiny):
    """The training loss of segment attention: rows laid end to end, the LM head only where a
    target follows; the same per-token losses and modes as the 4D-mask path, in the same order."""
    from r4b_core.anneal import token_losses

    model, processor, samples = tiny
    pad = processor.tokenizer.pad_token_id
    batch = collate([samples[:3], samples[3:]], pad, length=256)
    with torch.no_grad():
        ref, mask, ref_mode = token_losses(model, batch, torch.device("cpu"))
        try:
            use_segment_attention(model, True)
            got, got_mask, got_mode = token_losses(model, collate([samples[:3], samples[3:]], pad, attention="varlen"),
                                                   torch.device("cpu"))
        finally:
            use_segment_attention(model, False)
    assert got.shape == (sum(s.n_target for s in samples),) and bool(got_mask.all())
    assert torch.allclose(got, ref[mask], atol=1e-5)
    assert torch.equal(got_mode, ref_mode[mask]) and set(got_mode.tolist()) == {MODE_THINK, MODE_DIRECT}


def test_varlen_choice_takes_the_first_path_that_matches_each_sample_alone_and_says_why(tiny, monkeypatch):
    """CPU offers per-sample SDPA only; CUDA adds the flash-attention varlen kernel where the
    package is installed. A candidate that cannot run here (flash-attention on CPU) is refused with
    its reason and the next one is checked against each sample's losses alone."""
    from r4b_core import anneal
    from r4b_core.training import packing

    model, processor, samples = tiny
    assert packing.varlen_attentions("cpu") == [SEGMENT_ATTENTION]
    monkeypatch.setattr(packing, "varlen_attentions", lambda device: [packing.FLASH_VARLEN, SEGMENT_ATTENTION])
    try:
        attention, impl, line = anneal.choose_attention(model, samples, processor.tokenizer.pad_token_id, 256, "cpu")
        assert (attention, impl) == ("varlen", SEGMENT_ATTENTION)
        assert impl == model.config.text_config._attn_implementation
    finally:
        use_segment_attention(model, False)
    assert line.startswith("attention: per-sample SDPA (token losses within ")
    assert " of each sample alone on " in line
    assert "flash_attention_2 failed: " in line
