"""Sequence packing for SFT: several samples share one row, none can see another.

A `Sample` is one tokenized (prompt + target) sequence with its loss labels and images. Packing
puts samples into rows of at most `pack_length` tokens (first-fit, in the given order so the data
stays shuffled), and `collate` turns a list of rows into model inputs:

    input_ids      (B, L)        samples back to back, then pad
    labels         (B, L)        token id where the loss applies (target + closing <|im_end|>), else -100
    position_ids   (B, L)        restart at 0 for every sample; a row's pad tail continues its last sample
    attention_mask (B, 1, L, L)  additive float mask: causal *within* a sample, blocked across samples;
                                 a pad token sees only itself (a fully blocked row would give NaN)
    pixel_values   (N, 3, H, W)  images of every sample of every row, in token order
    token_mode     (B, L)        0 = thinking sample, 1 = direct sample, -1 = pad (for per-mode loss)

`collate` with one sample per row is plain padding (the packing benchmark's baseline).

Two ways to keep samples apart in attention, giving the same logits (tests/unit/test_packing.py):
- the 4D mask above (`collate(..., mask=True)`), any attention implementation. It costs O(L^2) per
  row to build, and SDPA with a mask attends over the whole row (every key of a 512-token row is
  scored, then masked);
- varlen attention (`collate(..., mask=False)` + `use_segment_attention(model, impl)`): no mask;
  each sample is found from `position_ids` (a new sample starts where the position is 0) and
  attends only within itself. A sample of n tokens costs n^2, not n x L. Two implementations
  (`varlen_attentions`): on CUDA with the `flash_attn` package installed, transformers'
  "flash_attention_2", which turns the position ids into cu_seqlens for `flash_attn_varlen_func`;
  everywhere, `segment_sdpa` below, causal SDPA per sample. The anneal stage takes the first of
  them that gives the mask path's per-token losses on real packed rows, else the mask
  (anneal.choose_attention).

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
    pixel_values: torch.Tensor | None = None  # (n_images, 3, H, W) or None for text-only samples
    index: int = -1  # position in the source dataset (for reports)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

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


def collate(rows: list[list[Sample]], pad_id: int, length: int | None = None,
            mask_dtype: torch.dtype = torch.float32, mask: bool = True) -> dict[str, torch.Tensor]:
    """Rows of samples -> model inputs (see module docstring). `length` defaults to the longest row.

    mask=False leaves out `attention_mask`: for segment attention, which reads the boundaries
    from `position_ids` (building an unused (B, L, L) mask cost a packed step ~3 % of its time).
    """
    L = length or max(sum(len(s) for s in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    segment_ids = torch.full((B, L), -1, dtype=torch.long)
    token_mode = torch.full((B, L), -1, dtype=torch.long)
    pixels = []
    for b, row in enumerate(rows):
        at = 0
        for j, s in enumerate(row):
            n = len(s)
            if at + n > L:
                raise ValueError(f"row {b} holds {sum(len(x) for x in row)} tokens > length {L}")
            input_ids[b, at:at + n] = torch.tensor(s.input_ids)
            labels[b, at:at + n] = torch.tensor(s.labels)
            position_ids[b, at:at + n] = torch.arange(n)
            segment_ids[b, at:at + n] = j
            token_mode[b, at:at + n] = s.mode
            if s.pixel_values is not None and len(s.pixel_values):
                pixels.append(s.pixel_values)
            at += n
        # The pad tail continues the last sample's positions, so position ids alone delimit the
        # samples: segment attention sees a padded row as one sequence (one causal call; real
        # tokens never reach the pads after them). Pad outputs carry no loss either way.
        last = len(row[-1]) if row else 0
        position_ids[b, at:] = torch.arange(last, last + L - at)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "token_mode": token_mode,
    }
    if mask:
        batch["attention_mask"] = block_causal_mask(segment_ids, mask_dtype)
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def padding_waste(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, total slots) of a collated batch."""
    real = int((batch["token_mode"] >= 0).sum())
    return real, batch["token_mode"].numel()


# ---------------------------------------------------------------------------------------------
# Segment attention: per-sample causal SDPA, boundaries from position_ids
# ---------------------------------------------------------------------------------------------
SEGMENT_ATTENTION = "r4b_segments"


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """(B, L) position ids -> per row, the (start, end) of each segment; a segment starts at 0.

    One host transfer for the whole batch (called once per layer: cheap next to the layer).
    """
    B, L = position_ids.shape
    starts: list[list[int]] = [[0] for _ in range(B)]
    for b, i in (position_ids[:, 1:] == 0).nonzero().tolist():
        starts[b].append(i + 1)
    return [list(zip(row, row[1:] + [L])) for row in starts]


def segment_sdpa(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: causal attention inside each segment of each row.

    query (B, H, L, D), key/value (B, H_kv, L, D) -> (B, L, H, D); B is 1 when the anneal loop
    lays a micro-batch's rows end to end. A row's pad tail is part of its last segment (`collate`
    continues its positions): with right padding a real token never reaches a pad key, so only pad
    positions (no loss, never attended to) differ from the mask path. Segments of one length (plain
    padding: every row one sample + pads) go through one batched causal call. Anything this
    function is not for (a mask given, a KV cache, no position ids) goes to transformers' SDPA
    unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    L = query.shape[2]
    if attention_mask is not None or position_ids is None or key.shape[2] != L or position_ids.shape[-1] != L:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each KV head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    B, H, _, D = query.shape
    sizes = [e - s for row in segment_bounds(position_ids.expand(B, -1)) for s, e in row]
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


FLASH_VARLEN = "flash_attention_2"   # transformers' name; packed position ids -> flash_attn_varlen_func
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
