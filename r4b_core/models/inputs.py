"""A sample's processor tensors, and how several samples' tensors join into one forward's inputs.

    ids, per_token, media = split_encoding(processor(text=[prompt], images=[images], return_tensors="pt"))
    per_token = extend_per_token(per_token, len(target_ids))     # the target's tokens are text
    batch = join_media([media_a, media_b])                        # images of both, in token order

Beside `input_ids` and `attention_mask` a processor returns two kinds of tensors, told apart by
shape, not by name:
- per-token tensors, shaped like `input_ids` (Gemma3's `token_type_ids`, Qwen's `mm_token_type_ids`):
  they follow the tokens. Kept 1-D per sample; a completion or SFT target extends them with 0
  (text); batches pad and pack them like the ids.
- media tensors, one leading row per image or per prompt (`pixel_values`, `image_grid_thw`,
  `image_sizes`, `pixel_attention_mask`, `batch_num_images`, ...): several samples' join along
  dim 0 in token order, each other dimension zero-padded to the largest. Every family's model
  takes a padded join: LLaVA-OneVision reads each image's patch count from `image_sizes`, Idefics3
  / SmolVLM drop all-zero images and masks, Qwen's flat patches and Gemma3's fixed-size images
  need no padding at all.
"""

from __future__ import annotations

from typing import Any

TEXT_KEYS = ("input_ids", "attention_mask")


def split_encoding(enc: dict) -> tuple[list[int], dict[str, Any], dict[str, Any]]:
    """A one-prompt processor output -> (token ids, per-token tensors (1-D), media tensors)."""
    ids = enc["input_ids"]
    per_token = {k: v[0] for k, v in enc.items() if k not in TEXT_KEYS and hasattr(v, "shape")
                 and tuple(v.shape) == tuple(ids.shape)}
    media = {k: v for k, v in enc.items() if k not in TEXT_KEYS and k not in per_token and hasattr(v, "shape")}
    return ids[0].tolist(), per_token, media


def extend_per_token(per_token: dict[str, Any], n: int) -> dict[str, Any]:
    """Per-token tensors over `n` more tokens of text (value 0)."""
    import torch

    return {k: torch.cat([v, v.new_zeros(n)]) for k, v in per_token.items()}


def join_media(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Media tensors of several samples, joined along dim 0 (see the module docstring)."""
    import torch

    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        tensors = [p[key] for p in parts if key in p]
        if len({t.shape[1:] for t in tensors}) > 1:
            shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].ndim)]
            padded = []
            for t in tensors:
                full = t.new_zeros((t.shape[0], *shape))
                full[(slice(None), *(slice(0, s) for s in t.shape[1:]))] = t
                padded.append(full)
            tensors = padded
        out[key] = torch.cat(tensors)
    return out


def pad_per_token(rows: list[dict[str, Any]], length: int, left: bool = False) -> dict[str, Any]:
    """Per-token tensors of several rows as (B, length), padded with 0 on the right (or left)."""

    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        like = next(r[key] for r in rows if key in r)
        batch = like.new_zeros((len(rows), length))
        for b, r in enumerate(rows):
            v = r.get(key)
            if v is not None:
                if left:
                    batch[b, length - len(v):] = v
                else:
                    batch[b, :len(v)] = v
        out[key] = batch
    return out
