"""Sequence packing for SFT: several samples share one row, none can see another.

A `Sample` is one tokenized (prompt + target) sequence with its loss labels and images. Packing
puts samples into rows of at most `pack_length` tokens (first-fit, in the given order so the data
stays shuffled), and `collate` turns a list of rows into model inputs:

    input_ids      (B, L)        samples back to back, then pad
    labels         (B, L)        token id where the loss applies (target + closing <|im_end|>), else -100
    position_ids   (B, L)        restart at 0 for every sample (pad continues from 0 too)
    attention_mask (B, 1, L, L)  additive float mask: causal *within* a sample, blocked across samples;
                                 a pad token sees only itself (a fully blocked row would give NaN)
    pixel_values   (N, 3, H, W)  images of every sample of every row, in token order
    token_mode     (B, L)        0 = thinking sample, 1 = direct sample, -1 = pad (for per-mode loss)

`collate` with one sample per row is plain padding (the packing benchmark's baseline). The 4D mask
is O(L^2) memory per row: fine for eager/SDPA at our lengths; at 16k tokens prefer a varlen attention
kernel driven by position_ids (flash-attention), which transformers also supports.
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
            mask_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Rows of samples -> model inputs (see module docstring). `length` defaults to the longest row."""
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
        # Pad positions continue 0.. so no position id exceeds what the model saw in training.
        position_ids[b, at:] = torch.arange(L - at)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "attention_mask": block_causal_mask(segment_ids, mask_dtype),
        "token_mode": token_mode,
    }
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def padding_waste(batch: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(real tokens, total slots) of a collated batch."""
    real = int((batch["token_mode"] >= 0).sum())
    return real, batch["token_mode"].numel()
