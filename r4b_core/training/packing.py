"""Sequence packing for SFT: several samples share one row, none can see another.

A `Sample` is one tokenized (prompt + target) sequence with its loss labels and the processor's
other tensors (models/inputs.py: media such as pixel_values / image_grid_thw / image_sizes, and
per-token ones such as token_type_ids), plus its positions where the model computes them itself
(M-RoPE: Qwen2.5-VL, Qwen3-VL; the model's rope index over the sample alone). Packing puts samples
into rows of at most `pack_length` tokens (first-fit, in the given order so the data stays
shuffled), and `collate` turns a list of rows into model inputs:

    input_ids      (B, L)        samples back to back, then pad
    labels         (B, L)        token id where the loss applies (target + closing end of turn), else -100
    position_ids   (B, L)        restart at 0 for every sample; (3, B, L) where samples carry M-RoPE positions
    segment_ids    (B, L)        which sample a token belongs to: unique over the batch, a row's pad tail
                                 its own segment. The samples' boundaries come from here, never from
                                 positions (M-RoPE positions do not restart at a sample's start)
    token_mode     (B, L)        0 = thinking sample, 1 = direct sample, -1 = pad (for per-mode loss)
    <per-token>    (B, L)        the samples' per-token processor tensors, 0 on pads
    <media>        (N, ...)      every sample's media tensors, joined in token order (inputs.join_media)
    attention_mask               by `attention`:
      "block"   (B, 1, L, L)  additive float mask: causal *within* a sample, blocked across samples;
                              a pad token sees only itself (a fully blocked row would give NaN)
      "varlen"  none          samples apart by segment_ids (`varlen_kwargs`: cu_seq_lens for the forward)
      "padding" (B, L)        the model's own 2-D padding mask: one sample per row, the model builds its
                              own attention (Gemma3's bidirectional image tokens, sliding windows)

`collate` with one sample per row is plain padding (the packing benchmark's baseline).

Three ways to keep samples apart, the anneal stage taking the first that gives every sample's
token losses as that sample alone through the model's own forward (anneal.choose_attention):
- varlen attention (`attention="varlen"` + `use_segment_attention(model, impl)`): no mask; the
  forward gets the segments as `cu_seq_lens_q/k` (transformers' packed-sequence arguments) and
  each sample attends only within itself. A sample of n tokens costs n^2, not n x L. Two
  implementations (`varlen_attentions`): on CUDA with the `flash_attn` package installed,
  transformers' "flash_attention_2" (`flash_attn_varlen_func` on the cu_seq_lens); everywhere,
  `segment_sdpa` below, causal SDPA per sample;
- the 4D block mask, any attention implementation, O(L^2) per row to build, and SDPA with a mask
  attends over the whole row;
- plain padding, one sample per row with the model's own mask: for models whose attention is more
  than causal (Gemma3's images attend both ways; sliding windows), which neither of the above is.

Measured on the 2-core CPU (torch 2.13, one thread; 35 samples of 37-130 tokens, 4 heads of 32,
forward + backward of one layer's attention): per-sample SDPA 10.9-22 ms; the same samples grouped
by equal length into batched calls 12.8 ms; padded into length buckets 32-52 ms; per-sample math
kernel 38 ms; flex attention has no backward on CPU (eager or compiled) and nested-tensor SDPA no
CPU kernel. So on CPU it is per-sample SDPA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

IGNORE_INDEX = -100
MODE_THINK = 0
MODE_DIRECT = 1


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    mode: int  # MODE_THINK or MODE_DIRECT
    media: dict = field(default_factory=dict)  # the processor's media tensors (models/inputs.py); {} = text only
    per_token: dict = field(default_factory=dict)  # the processor's per-token tensors, 1-D over input_ids
    positions: torch.Tensor | None = None  # (3, n) positions from the model's rope index; None = 0..n-1
    index: int = -1  # position in the source dataset (for reports)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def has_images(self) -> bool:
        return bool(self.media)

    @property
    def n_target(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def pack_first_fit(lengths: Sequence[int], pack_length: int) -> list[list[int]]:
    """Group sample indices into rows of total length <= pack_length (first-fit, order kept).

    Each sample goes into the first open row with room; a row opens when none has room. Rows are
    returned in the order they were opened, their members in insertion order. Raises ValueError
    for a sample longer than the row (the caller skips or truncates those first).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > pack_length:
            raise ValueError(f"sample {i} has {n} tokens > pack_length {pack_length}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(pack_length - n)
    return rows


def block_causal_mask(segment_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, L) segment ids (-1 = pad) -> (B, 1, L, L) additive mask, 0 where attention is allowed."""
    _, L = segment_ids.shape
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = same & causal & (segment_ids[:, :, None] >= 0)
    allowed |= torch.eye(L, dtype=torch.bool, device=segment_ids.device)  # pads attend to themselves
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


ATTENTIONS = ("block", "varlen", "padding")


def collate(rows: list[list[Sample]], pad_id: int, length: int | None = None,
            mask_dtype: torch.dtype = torch.float32, attention: str = "block") -> dict[str, torch.Tensor]:
    """Rows of samples -> model inputs (see module docstring). `length` defaults to the longest row.

    attention="varlen" leaves out `attention_mask` (building an unused (B, L, L) mask cost a packed
    step ~3 % of its time); "padding" gives the 2-D padding mask and needs one sample per row.
    """
    from r4b_core.models.inputs import join_media

    if attention not in ATTENTIONS:
        raise ValueError(f"attention {attention!r}: one of {ATTENTIONS}")
    if attention == "padding" and any(len(row) > 1 for row in rows):
        raise ValueError("attention='padding' keeps one sample per row; the model's own mask cannot separate more")
    L = length or max(sum(len(s) for s in row) for row in rows)
    B = len(rows)
    mrope = any(s.positions is not None for row in rows for s in row)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((3, B, L) if mrope else (B, L), dtype=torch.long)
    segment_ids = torch.zeros((B, L), dtype=torch.long)
    token_mode = torch.full((B, L), -1, dtype=torch.long)
    per_token: dict[str, torch.Tensor] = {}
    media = []
    segment = 0
    for b, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s)
            if at + n > L:
                raise ValueError(f"row {b} holds {sum(len(x) for x in row)} tokens > length {L}")
            input_ids[b, at:at + n] = torch.tensor(s.input_ids)
            labels[b, at:at + n] = torch.tensor(s.labels)
            position_ids[..., b, at:at + n] = s.positions if s.positions is not None else torch.arange(n)
            segment_ids[b, at:at + n] = segment
            token_mode[b, at:at + n] = s.mode
            for key, v in s.per_token.items():
                per_token.setdefault(key, v.new_zeros((B, L)))[b, at:at + n] = v
            if s.media:
                media.append(s.media)
            segment += 1
            at += n
        # the pad tail joins the row's last segment (causal: no real token attends to it; no loss),
        # so plainly padded rows are segments of one length
        position_ids[..., b, at:] = torch.arange(L - at)
        if not row:
            segment += 1
        segment_ids[b, at:] = segment - 1
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment_ids": segment_ids,
             "token_mode": token_mode, **per_token, **join_media(media)}
    if attention == "block":
        real = torch.where(token_mode >= 0, segment_ids, -1)
        batch["attention_mask"] = block_causal_mask(real, mask_dtype)
    elif attention == "padding":
        batch["attention_mask"] = (token_mode >= 0).long()
    return batch


def varlen_kwargs(segment_ids: torch.Tensor) -> dict:
    """The packed-sequence arguments of a forward over `segment_ids` laid end to end (one row):
    transformers' `cu_seq_lens_q/k` (cumulative segment starts, int32) and `max_length_q/k`, which
    its flash-attention varlen path and `segment_sdpa` read."""
    flat = segment_ids.reshape(-1)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (flat[1:] != flat[:-1]).nonzero().flatten() + 1])
    cu = torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def padding_waste(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, total slots) of a collated batch."""
    real = int((batch["token_mode"] >= 0).sum())
    return real, batch["token_mode"].numel()


# ---------------------------------------------------------------------------------------------
# Segment attention: per-sample causal SDPA, boundaries from the segments (cu_seq_lens)
# ---------------------------------------------------------------------------------------------
SEGMENT_ATTENTION = "r4b_segments"


def segment_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: causal attention inside each segment of the sequence.

    query (B, H, L, D), key/value (B, H_kv, L, D) -> (B, L, H, D); the segments are the forward's
    `cu_seq_lens_q` (`varlen_kwargs`) over the B rows laid end to end (B is 1 when the anneal loop
    lays a micro-batch's rows end to end). A row's pad tail is part of its last segment: with
    right padding a real token never reaches a pad key, so only pad positions (no loss, never
    attended to) see more than the mask path would show them. Segments of one length (plain
    padding: every row one sample + pads) go through one batched causal call. Anything this
    function is not for (a mask given, a KV cache, no segments) goes to transformers' SDPA
    unchanged; a sliding-window layer is refused (its window is not applied here).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    L = query.shape[2]
    if attention_mask is not None or cu is None or key.shape[2] != L:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") or getattr(module, "sliding_window", None):
        raise NotImplementedError("segment_sdpa has no sliding window; the layer needs one")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each KV head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    B, H, _, D = query.shape
    sizes = (cu[1:] - cu[:-1]).tolist()
    if sum(sizes) != B * L:
        raise ValueError(f"segments cover {sum(sizes)} tokens, the query {B * L}")
    sdpa = torch.nn.functional.scaled_dot_product_attention
    # Rows laid end to end, (H, B*L, D): segments never cross rows.
    q, k, v = (t.transpose(0, 1).reshape(H, B * L, D) for t in (query, key, value))
    if len(set(sizes)) == 1:  # equal segments (padded rows): one batched call
        S, n = len(sizes), sizes[0]
        q, k, v = (t.view(H, S, n, D).transpose(0, 1) for t in (q, k, v))
        out = sdpa(q, k, v, is_causal=True, scale=scaling, dropout_p=dropout).transpose(0, 1).reshape(H, B * L, D)
    else:
        # `split`, not slicing: its backward is one concatenation, where slices would each add
        # their gradient into a zeroed full-size copy.
        parts = [sdpa(a[None], b[None], c[None], is_causal=True, scale=scaling, dropout_p=dropout)[0]
                 for a, b, c in zip(q.split(sizes, 1), k.split(sizes, 1), v.split(sizes, 1))]
        out = torch.cat(parts, dim=1)
    return out.view(H, B, L, D).permute(1, 2, 0, 3).contiguous(), None


def _text_config(model):
    config = getattr(model, "config", None)
    return getattr(config, "text_config", config)


FLASH_VARLEN = "flash_attention_2"   # transformers' name; cu_seq_lens -> flash_attn_varlen_func
VARLEN = {FLASH_VARLEN: "flash-attention varlen kernel", SEGMENT_ATTENTION: "per-sample SDPA"}   # name: what it is


def varlen_attentions(device) -> list[str]:
    """The varlen attention implementations worth trying on `device`, fastest first: the
    flash-attention varlen kernel where it can run (CUDA, `flash_attn` installed), then per-sample
    SDPA (any device)."""
    import importlib.util

    flash = torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    return [FLASH_VARLEN, SEGMENT_ATTENTION] if flash else [SEGMENT_ATTENTION]


def use_segment_attention(model, on: bool | str = True) -> str:
    """Switch the language model's attention to a varlen implementation (`on`: True for
    `segment_sdpa`, or a name from VARLEN) or back to "sdpa" (False).

    Only the text model changes: the vision tower attends within one image and keeps its own.
    Returns the implementation that was in place. The name is not saved with the model
    (transformers keeps `_attn_implementation` out of config.json), so a saved folder loads with
    the default everywhere (transformers, vLLM).
    """
    from transformers import AttentionInterface

    if SEGMENT_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(SEGMENT_ATTENTION, segment_sdpa)
    config = _text_config(model)
    before = config._attn_implementation
    if on:
        config._attn_implementation = SEGMENT_ATTENTION if on is True else on
    elif before in VARLEN:
        config._attn_implementation = "sdpa"
    return before
