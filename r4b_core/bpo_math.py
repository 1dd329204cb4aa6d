"""The math of Bi-mode Policy Optimization, as pure tensor functions (no models, no I/O).

`r4b_core/bpo.py` calls these in its step function; `tests/unit/test_bpo_math.py` checks each one
against hand-computed numbers. Shapes: P prompts, K rollouts per prompt (2g for BPO: g forced-think
+ g forced-no-think; 2g auto-mode samples for the GRPO control), B sequences, T response positions.

The objective (R-4B, arXiv 2508.21113, eq. for BPO), per prompt q with its 2g rollouts:

    J = 1/(2g) Σ_k  min(ρ_k A_k, clip(ρ_k, 1−ε, 1+ε) A_k)  −  β KL(π_θ ‖ π_ref)

applied per token (ρ is the per-token importance ratio π_θ / π_old; with async rollouts π_old is
the trainer's policy before the update and each token's term is weighted by the truncated
importance weight min(π_old / π_rollout, cap), `truncated_is_weights`), with

    A_k = (r_k − mean(r)) / (std(r) + eps)        over the MIXED group of all 2g rollouts

so a thinking rollout scores above average only where thinking beats not thinking on that prompt.
Choices we make explicit (and log):
  * std is the population std (correction 0) of the group: for rewards {0, 1} in equal numbers the
    advantages are exactly ±1. `scale_by_std=False` gives Dr.GRPO's unscaled r − mean.
  * a group is informative when its rewards are not all equal (for per-mode grouping: when either
    mode's rewards differ); uninformative groups have A = 0 everywhere and can be dropped.
  * KL uses the k3 estimator exp(q) − q − 1 with q = log π_ref − log π_θ (unbiased, always ≥ 0).
  * aggregation normalises by totals over the whole rollout batch, passed in explicitly, so that
    summing the losses of micro-batches gives exactly the full-batch loss (no per-micro-batch
    re-normalisation, a classic source of silently different gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Grouping = Literal["mixed", "per_mode"]
Aggregation = Literal["token_mean", "seq_mean"]


@dataclass
class Advantages:
    values: Tensor        # [P, K] advantage of each rollout
    informative: Tensor   # [P] bool: the group carries a learning signal
    group_mean: Tensor    # [P, K] the baseline each rollout was compared with
    group_std: Tensor     # [P, K] the std it was scaled by (before eps)


def _normalise(rewards: Tensor, members: Tensor, scale_by_std: bool, eps: float):
    """(r − mean) / (std + eps) over the entries where `members` is True, per row."""
    m = members.to(rewards.dtype)
    count = m.sum(-1, keepdim=True).clamp_min(1.0)
    mean = (rewards * m).sum(-1, keepdim=True) / count
    var = (((rewards - mean) ** 2) * m).sum(-1, keepdim=True) / count
    std = var.sqrt()
    centred = rewards - mean
    # a constant group has centred == 0; divide by 1 there so eps=0 cannot give 0/0
    denom = torch.where(std > 0, std + eps, torch.ones_like(std))
    adv = centred / denom if scale_by_std else centred
    spread = torch.where(members, rewards, torch.full_like(rewards, float("inf"))).amin(-1)
    top = torch.where(members, rewards, torch.full_like(rewards, float("-inf"))).amax(-1)
    informative = (top - spread) > 0
    return adv * m, mean.expand_as(rewards), std.expand_as(rewards), informative


def group_advantages(rewards: Tensor, is_think: Tensor | None = None, *, grouping: Grouping = "mixed",
                     scale_by_std: bool = True, eps: float = 1e-6) -> Advantages:
    """GRPO-style advantages per prompt group.

    rewards: [P, K] float. is_think: [P, K] bool, which rollouts were (forced) thinking; needed for
    grouping="per_mode", where each mode is normalised against its own g rollouts (the ablation).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, rollouts], got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    if grouping == "mixed":
        everyone = torch.ones_like(rewards, dtype=torch.bool)
        adv, mean, std, informative = _normalise(rewards, everyone, scale_by_std, eps)
        return Advantages(adv, informative, mean, std)
    if grouping != "per_mode":
        raise ValueError(f"grouping must be 'mixed' or 'per_mode', got {grouping!r}")
    if is_think is None or is_think.shape != rewards.shape:
        raise ValueError("grouping='per_mode' needs is_think with the shape of rewards")
    is_think = is_think.bool()
    a_t, m_t, s_t, i_t = _normalise(rewards, is_think, scale_by_std, eps)
    a_n, m_n, s_n, i_n = _normalise(rewards, ~is_think, scale_by_std, eps)
    adv = torch.where(is_think, a_t, a_n)
    mean = torch.where(is_think, m_t, m_n)
    std = torch.where(is_think, s_t, s_n)
    return Advantages(adv, i_t | i_n, mean, std)


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0,
                   suppress: list[int] | tuple[int, ...] = ()) -> tuple[Tensor, Tensor]:
    """Log-probability of each target token and the entropy of each position's distribution,
    both under the sampling distribution softmax(logits / temperature) with the engines'
    suppressed tokens (never sampled) removed — the distribution the rollout engine sampled
    from, so the importance ratio compares like with like.

    logits: [B, T, V] (position t predicts targets[:, t]); targets: [B, T] long.
    """
    scaled = logits.float() / temperature
    if suppress:
        scaled = scaled.index_fill(-1, torch.tensor(list(suppress), device=scaled.device), float("-inf"))
    logsm = torch.log_softmax(scaled, dim=-1)
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs = logsm.exp()
    entropy = -(probs * logsm.masked_fill(probs == 0, 0.0)).sum(-1)
    return logp, entropy


@dataclass
class ClipTerms:
    loss: Tensor       # [B, T] per-token loss: −min(ρA, clip(ρ)A)
    ratio: Tensor      # [B, T] ρ = exp(logp − old_logp)
    clipped: Tensor    # [B, T] bool: the clipped branch was taken (no gradient through ρ there)


def ppo_clip_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_eps: float) -> ClipTerms:
    """Per-token PPO-clip loss. advantages: [B] (one per sequence) or [B, T]."""
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logp - old_logp)
    plain = ratio * advantages
    clamped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = -torch.minimum(plain, clamped)
    clipped = clamped < plain
    return ClipTerms(loss, ratio, clipped)


def truncated_is_weights(proximal_logp: Tensor, behaviour_logp: Tensor, cap: float) -> tuple[Tensor, Tensor]:
    """Off-policy correction for rollouts sampled from an older policy (async BPO): per token
    w = min(π_prox / π_behav, cap), π_prox the trainer's policy before this update, π_behav the
    one that sampled (the engine's recorded logprobs). Truncated importance sampling: the weight
    multiplies the PPO-clip term, whose ratio is then taken against π_prox, so a rollout one or
    more updates old is reweighted towards the current policy without the weight's variance
    exploding. Returns (weights, truncated): both detached, truncated where the cap applied."""
    ratio = torch.exp(proximal_logp.detach() - behaviour_logp.detach())
    return ratio.clamp(max=cap), ratio > cap


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π_θ ‖ π_ref) from samples of π_θ: exp(q) − q − 1, q = ref − θ."""
    q = ref_logp - logp
    return torch.exp(q) - q - 1.0


def aggregate(per_token: Tensor, mask: Tensor, how: Aggregation, *, total_tokens: float | None = None,
              total_seqs: float | None = None) -> Tensor:
    """Reduce a per-token quantity to the scalar loss.

    token_mean: Σ masked values / total_tokens — every token weighs the same, so long (thinking)
                rollouts carry more of the gradient.
    seq_mean:   Σ_seq (Σ_t masked values / tokens in seq) / total_seqs — every rollout weighs the
                same regardless of length.
    total_tokens / total_seqs default to this batch's counts; pass the whole rollout batch's
    counts when accumulating micro-batches so the sum of the parts equals the full-batch loss.
    Sequences without any masked token count for nothing in either mode.
    """
    mask = mask.bool()
    # where, not multiply: a masked-out position may hold inf/nan (e.g. a padding target)
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))
    if how == "token_mean":
        denom = total_tokens if total_tokens is not None else mask.sum().item()
        return masked.sum() / max(float(denom), 1.0)
    if how == "seq_mean":
        per_seq_tokens = mask.sum(-1).to(per_token.dtype)
        has_tokens = per_seq_tokens > 0
        per_seq = masked.sum(-1) / per_seq_tokens.clamp_min(1.0)
        denom = total_seqs if total_seqs is not None else has_tokens.sum().item()
        return (per_seq * has_tokens).sum() / max(float(denom), 1.0)
    raise ValueError(f"aggregation must be 'token_mean' or 'seq_mean', got {how!r}")


def response_masks(prompt_len: Tensor, n_forced: Tensor, n_generated: Tensor, length: int,
                   forced_trainable: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Masks over next-token positions of padded sequences [prompt | forced | generated | pad].

    Position t of the returned [B, length − 1] masks refers to the prediction of token t + 1.
    Returns (loss_mask, forced_mask, generated_mask). The forced prefix tokens (after `<think>`)
    are in the loss only when `forced_trainable`; otherwise they act as prompt.
    """
    pos = torch.arange(1, length).unsqueeze(0)                 # index of the predicted token
    start_forced = prompt_len.unsqueeze(-1)
    start_gen = start_forced + n_forced.unsqueeze(-1)
    end = start_gen + n_generated.unsqueeze(-1)
    forced = (pos >= start_forced) & (pos < start_gen)
    generated = (pos >= start_gen) & (pos < end)
    loss = generated | forced if forced_trainable else generated
    return loss, forced, generated


def masked_stats(x: Tensor, mask: Tensor) -> dict[str, float]:
    """mean / std / min / max of the masked entries (NaN-free: zeros when nothing is masked)."""
    vals = x.detach()[mask.bool()].float()
    if vals.numel() == 0:
        return {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}
    return {"mean": vals.mean().item(), "std": vals.std(correction=0).item(),
            "min": vals.min().item(), "max": vals.max().item()}
