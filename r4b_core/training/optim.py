"""Optimizer pieces shared by the training stages: parameter groups and the cosine LR schedule.

    freeze_components(model, cfg.anneal.optim.freeze)    # e.g. [vision]: those keep their weights
    groups = param_groups(model, cfg.anneal.optim)        # vision tower / projector / LLM, each
    opt = torch.optim.AdamW(groups, betas=..., ...)       # with and without weight decay
    sched = cosine_scheduler(opt, total_steps, warmup)    # per-group peak -> per-group floor

Every group warms up linearly to its own peak LR, then follows a half cosine down to its floor
`min(optim.min_lr, peak)` at the last step. With the paper's numbers (LLM 4e-5 -> 4e-6, vision and
projector 4e-6) the vision and projector groups therefore stay at 4e-6 after warm-up.
"""

from __future__ import annotations

import math

import torch

# Which parameters belong to the vision encoder and to the projector, by name fragment, for every
# family we train (transformers' names): the one piece of family knowledge the model cannot tell us.
# Projector first: Qwen's `visual.merger` sits inside the vision module but maps into the LM.
#   LLaVA / LLaVA-OneVision / Gemma3: vision_tower, multi_modal_projector (+ OneVision's image_newline)
#   Qwen2.5-VL / Qwen3-VL:            visual.blocks, visual.merger (+ Qwen3's deepstack mergers)
#   Idefics3 / SmolVLM:               vision_model, connector
PROJECTOR_MARKERS = ("multi_modal_projector", "mm_projector", "connector.", "visual.merger.",
                     "visual.deepstack_merger_list.", "image_newline")
VISION_MARKERS = ("vision_tower", "vision_model", "visual.")


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """LR used by optimizer step `step` (0-based): linear warm-up, then half cosine to `floor`."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def component_of(name: str) -> str:
    """'vision', 'projector' or 'llm' for a parameter name."""
    if any(m in name for m in PROJECTOR_MARKERS):
        return "projector"
    if any(m in name for m in VISION_MARKERS):
        return "vision"
    return "llm"


def freeze_components(model: torch.nn.Module, components: list[str]) -> int:
    """Turn off gradients of every parameter of the given components ('vision', 'projector',
    'llm'; `optim.freeze`); returns how many parameter tensors that froze. Frozen parameters get
    no optimizer group (param_groups skips them) and keep their values."""
    frozen = 0
    for name, p in model.named_parameters():
        if component_of(name) in components and p.requires_grad:
            p.requires_grad_(False)
            frozen += 1
    return frozen


def param_groups(model: torch.nn.Module, optim_cfg) -> list[dict]:
    """AdamW groups named `<component>` / `<component>_no_decay` with their peak LR and floor.

    Biases and norm weights (1-D tensors) get no weight decay. `vision_lr` / `projector_lr` of None
    mean "same as the LLM". Empty groups are left out. Extra keys (`name`, `floor`) ride along in
    the optimizer's param_groups, which torch keeps.
    """
    peaks = {
        "llm": optim_cfg.lr,
        "vision": optim_cfg.vision_lr if optim_cfg.vision_lr is not None else optim_cfg.lr,
        "projector": optim_cfg.projector_lr if optim_cfg.projector_lr is not None else optim_cfg.lr,
    }
    buckets: dict[str, list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        comp = component_of(name)
        key = comp if p.ndim >= 2 else f"{comp}_no_decay"
        buckets.setdefault(key, []).append(p)
    groups = []
    for key in ("vision", "vision_no_decay", "projector", "projector_no_decay", "llm", "llm_no_decay"):
        if key not in buckets:
            continue
        comp = key.removesuffix("_no_decay")
        peak = peaks[comp]
        groups.append({
            "params": buckets[key],
            "name": key,
            "lr": peak,
            "peak_lr": peak,
            "floor_lr": min(optim_cfg.min_lr, peak),
            "weight_decay": 0.0 if key.endswith("_no_decay") else optim_cfg.weight_decay,
        })
    return groups


def cosine_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """A LambdaLR that gives each group `cosine_lr(step, ..., group peak, group floor)`."""
    lambdas = []
    for g in optimizer.param_groups:
        peak, floor = g["peak_lr"], g["floor_lr"]
        lambdas.append(lambda s, peak=peak, floor=floor:
                       cosine_lr(s, total_steps, warmup_steps, peak, floor) / peak)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def lr_by_group(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current LR per component (the decay and no-decay halves share one)."""
    out: dict[str, float] = {}
    for g in optimizer.param_groups:
        out.setdefault(g.get("name", "group").removesuffix("_no_decay"), g["lr"])
    return out
