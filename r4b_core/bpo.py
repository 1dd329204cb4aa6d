"""Bi-mode Policy Optimization (BPO): the RL stage of the R-4B recipe, and plain GRPO as its control.

    r4b bpo --config configs/tiny.yaml                               # rl split, anneal/model -> bpo/model
    r4b bpo --config configs/tiny.yaml --set bpo.algorithm=grpo      # the control -> grpo/model
    from r4b_core.bpo import run_bpo                                  # as a library
    manifest = run_bpo(cfg, prompts_uri, init_model_uri, out_uri, tracker=None)

One step (`bpo_step`, one function so the algorithm reads top to bottom):
  1. rollout    each of `prompts_per_step` prompts gets g samples with the forced thinking prefix
                `<think>\\n` and g with the forced no-think prefix `<think>\\n\\n</think>\\n\\n`
                (GRPO control: 2g samples in auto mode, prefix `<think>`), from the rollout engine
                (in-process HF, or the vLLM sidecar), at `temperature`, with per-mode token budgets
                and seeds derived from (run seed, step, prompt, mode).
  2. reward     rule-based accuracy of the answer after the think block (the eval's scorer,
                rewards.py); a think block that never closed (truncated) scores 0.
  3. advantage  (r − mean) / (std + eps) over the mixed group of 2g rollouts of a prompt
                (bpo_math.group_advantages); groups whose rewards are all equal carry no signal and
                are dropped (counted).
  4. loss       per-token PPO-clip with the importance ratio against the rollout engine's logprobs
                (the trainer recomputes them at the sampling temperature; the mismatch is logged),
                + β · k3 KL to the frozen initial model; token-mean or sequence-mean.
                `mode_token_trainable`: the forced tokens after `<think>` are response tokens that
                carry the rollout's advantage (old logprob = the policy's own, taken before the
                update). This trains the auto-mode decision (the first token after `<think>`)
                directly; with False they are prompt and no gradient reaches that decision.
  5. update     `ppo_epochs` optimizer steps over the rollout batch, each accumulated over
                micro-batches (losses normalised by whole-batch totals), gradient clipping.
  6. sync       push the new weights to the engine; the vLLM engine verifies them (probe logprobs
                must match the trainer's), so a stale sidecar fails the step instead of training on
                the wrong policy.

Async rollouts (`bpo.async_staleness: k >= 1`, vLLM sidecar only; `Rollouts`): step 1 takes the
batch the sidecar generated during the previous update and starts the next one, so generation and
training overlap; step 6 pushes once that batch is done (every version for k = 1, every k-th for
k > 1), verified as above before any rollout of it reaches a loss. A batch more than k versions
behind the trainer is generated again. Step 4 then takes the PPO ratio against the trainer's own
pre-update logprobs and weights each sampled token by min(π_trainer / π_rollout, `is_cap`)
(truncated importance sampling); staleness, the ratios and the truncated fraction are logged per
step. A resume generates the batch that was in flight at the checkpoint again (the manifest's
`resumes` says which); nothing is trained twice or skipped.

`mode_token_trainable` defaults to True: RECIPE.md's open question, measured. In auto mode the first
token after `<think>` decides ("\\n" thinks, "\\n\\n" goes on to `</think>`). From a model annealed with
traces for a third of its items (p(think) 0.30 on math, 0.28 on perception), 30 steps with a
reward under which thinking pays on math and not on perception moved p(think) to 0.95 (math) and
0.007 (perception) with trainable forced tokens; as prompt-only tokens the decision received no
gradient and drifted with shared weights to 0.43 / 0.44 — no content dependence at all
(`test_trainable_mode_token_teaches_auto_mode_to_think_by_content`, slow).

Where this simplifies the paper's description: the reference for the KL term is the initial
(annealed) model; several processes (torchrun) train by summing gradients (plain data
parallelism), or under DeepSpeed ZeRO-2 (`bpo.distributed.deepspeed: zero2`: optimizer state and
gradients partitioned, the same update), each with its own engine; rewards are accuracy only, as
the paper states. Checkpoints (model, optimizer, scheduler, RNG, prompt position, policy version)
are written every `checkpoint_every` steps and resumed automatically; after a resume — and at every
start — the engine gets a full, verified weight push before the first rollout.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from r4b_core import bpo_math, layout, modes
from r4b_core.config import BPOConfig, RunConfig
from r4b_core.data.schema import Record
from r4b_core.errors import R4BError
from r4b_core.modes import Mode
from r4b_core.rollout.base import Completion, GenerationRequest, RolloutEngine


class BPOError(R4BError):
    """BPO cannot start or continue; the message says what, with the numbers, and the fix."""


# ---------------------------------------------------------------------------------------------
# Config arithmetic, checked before anything expensive happens
# ---------------------------------------------------------------------------------------------
def check_bpo_config(cfg: RunConfig, num_prompts: int | None = None, max_prompt_tokens: int | None = None,
                     world_size: int | None = None, max_positions: int | None = None) -> None:
    """Raise BPOError listing every inconsistent combination of `bpo.*` values at once: the
    config's own rules (config.bpo_config_problems, also enforced when the YAML loads) with the
    process count (given, else the configured nnodes x nproc_per_node), plus what depends on the
    data (prompt count, prompt length against `max_positions`: the loaded model's, else the tiny
    base's configured ones)."""
    from r4b_core.config import bpo_config_problems

    b = cfg.bpo
    if world_size is None:
        world_size = b.distributed.nnodes * b.distributed.nproc_per_node
    problems = bpo_config_problems(b, world_size)
    if num_prompts is not None and num_prompts < b.prompts_per_step:
        problems.append(f"the prompt set has {num_prompts} usable prompts but bpo.prompts_per_step="
                        f"{b.prompts_per_step}; lower prompts_per_step or add prompts")
    max_pos = max_positions or (cfg.model.tiny.max_position_embeddings if cfg.model.base == "tiny" else None)
    if max_pos and max_prompt_tokens is not None:
        longest = max_prompt_tokens + max(b.max_new_tokens_think, b.max_new_tokens_no_think)
        if longest > max_pos:
            problems.append(f"longest rollout = prompt {max_prompt_tokens} + max_new_tokens "
                            f"{max(b.max_new_tokens_think, b.max_new_tokens_no_think)} = {longest} tokens "
                            f"> the model's {max_pos} positions; lower the token budgets or shorten the "
                            "prompts (data.max_question_chars)")
    if problems:
        raise BPOError("invalid BPO config:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------
# Prompts: records with their images, in a seeded order that a resume reproduces
# ---------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    record: Record
    images: list[Any]               # PIL images


class PromptStream:
    """Prompt i of the run is permutation(epoch = i // N)[i % N]: a resume at position p sees the
    exact prompts an uninterrupted run would have seen, without storing any iterator state."""

    def __init__(self, prompts: list[Prompt], seed: int):
        self.prompts = prompts
        self.seed = seed

    def take(self, position: int, count: int) -> list[Prompt]:
        n = len(self.prompts)
        out = []
        for i in range(position, position + count):
            epoch, offset = divmod(i, n)
            perm = random.Random(f"{self.seed}:{epoch}").sample(range(n), n)
            out.append(self.prompts[perm[offset]])
        return out


def load_prompts(prompts_uri: str, store, max_question_chars: int = 0) -> tuple[list[Prompt], str]:
    """Read the RL prompt records (objective items with a reference answer) and their images.

    Images are read through the store relative to the JSONL's URI (local or s3://). A record whose
    image cannot be read is skipped and counted (one line each, then a summary), not fatal.
    """
    from r4b_core.data.images import load_image
    from r4b_core.data.schema import DataError, read_jsonl

    local = store.local_path(prompts_uri, Path(tempfile.gettempdir()) / "r4b-cache")
    records = read_jsonl(local, max_question_chars=max_question_chars).records
    prompts, bad = [], []
    for rec in records:
        if not rec.objective:
            continue   # the reward is rule-based: subjective items have nothing to check against
        try:
            images = [load_image(ref, prompts_uri, store) for ref in rec.images]
        except DataError as exc:
            bad.append(str(exc))
            continue
        prompts.append(Prompt(rec, images))
    for line in bad[:5]:
        print(f"bpo: skipped: {line}")
    if bad:
        print(f"bpo: {len(bad)} of {len(records)} prompt records skipped for unreadable images")
    if not prompts:
        raise BPOError(f"{prompts_uri}: no usable objective records ({len(records)} read, {len(bad)} with "
                       f"unreadable images); BPO needs verifiable prompts with their images")
    return prompts, str(local)


def probe_sets(prompts: list[Prompt], size: int) -> dict[str, list[Prompt]]:
    """Fixed probe sets for the auto-mode think-rate: the hardest math items and perception items
    (sorted by id, so every step and every resume probes the same items)."""
    math_items = [p for p in prompts if p.record.category == "math"]
    hardest = max((p.record.difficulty for p in math_items), default=None)
    hard = sorted((p for p in math_items if p.record.difficulty == hardest), key=lambda p: p.record.id)
    perception = sorted((p for p in prompts if p.record.category == "perception"), key=lambda p: p.record.id)
    sets = {"hard_math": hard[:size], "perception": perception[:size]}
    return {k: v for k, v in sets.items() if v}


# ---------------------------------------------------------------------------------------------
# Rollout planning, rewards
# ---------------------------------------------------------------------------------------------
def rollout_modes(b: BPOConfig) -> list[Mode]:
    return [Mode.THINK, Mode.NO_THINK] if b.algorithm == "bpo" else [Mode.AUTO]


def request_seed(run_seed: int, step: int, prompt_index: int, mode: Mode) -> int:
    """A seed per (run, step, prompt, mode): reruns and resumes sample the same rollouts."""
    h = hashlib.sha256(f"{run_seed}:{step}:{prompt_index}:{mode.value}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def plan_rollouts(prompts: list[Prompt], b: BPOConfig, run_seed: int, step: int, chat) -> list[GenerationRequest]:
    """BPO: per prompt, g forced-think then g forced-no-think requests; GRPO: 2g auto-mode. Prompts
    in the policy's chat format (`chat`: models/chat.ChatFormat, the trainer's PromptEncoder's)."""
    requests = []
    for i, p in enumerate(prompts):
        for mode in rollout_modes(b):
            n = b.group_size if b.algorithm == "bpo" else 2 * b.group_size
            budget = b.max_new_tokens_no_think if mode == Mode.NO_THINK else b.max_new_tokens_think
            requests.append(GenerationRequest(
                prompt=chat.prompt(p.record.question, len(p.images), mode=mode),
                images=p.images, mode=mode, max_new_tokens=budget, temperature=b.temperature,
                n=n, seed=request_seed(run_seed, step, i, mode), key=p.record.id))
    return requests


@dataclass
class Scored:
    """One rollout with what the reward and the parser made of it."""
    prompt_index: int
    completion: Completion
    reward: float
    chose_think: bool           # the transcript has a non-empty think block
    closed: bool                # the think block was closed (False: truncated while thinking)


def score_rollouts(scorer, prompts: list[Prompt], completions: list[Completion], per_prompt: int) -> list[Scored]:
    """Each rollout's reward (`scorer.score`, as curation and evaluation score) and how it chose:
    the answer after the think block counts; a think block that never closed scores 0."""
    records = [prompts[j // per_prompt].record for j in range(len(completions))]
    rewards = scorer.score(completions, records, prefix_modes=[c.mode for c in completions])
    out = []
    for j, (c, r) in enumerate(zip(completions, rewards)):
        parsed = modes.parse_response(c.text, prefix_mode=c.mode)
        out.append(Scored(j // per_prompt, c, float(r or 0.0), parsed.mode == Mode.THINK, parsed.closed))
    return out


# ---------------------------------------------------------------------------------------------
# Trainer-side tensors
# ---------------------------------------------------------------------------------------------
@dataclass
class EncodedPrompt:
    key: str                        # the record: every mode of one record shares the prefix
    ids: list[int]                  # prompt incl. the forced prefix, image tokens expanded
    media: dict                     # the processor's media tensors (models/inputs.py); {} = text only
    per_token: dict                 # the processor's per-token tensors over `ids` (1-D)
    prompt_len: int                 # tokens up to and including `<think>` (the shared prefix)
    n_forced: int                   # forced prefix tokens after `<think>` (0 in auto mode)

    @property
    def forced_ids(self) -> list[int]:
        return self.ids[self.prompt_len:]


class PromptEncoder:
    """Renders (prompt, mode) pairs in the model's chat format and tokenizes them once with the
    processor, exactly as the engines do (`chat` also renders the rollout requests)."""

    def __init__(self, processor):
        from r4b_core.models.chat import ChatFormat
        from r4b_core.rollout.hf import suppressed_token_ids

        self.processor = processor
        self.chat = ChatFormat.of(processor)
        tok = processor.tokenizer if hasattr(processor, "tokenizer") else processor
        self.think_id = tok.convert_tokens_to_ids(modes.THINK_OPEN)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        # tokens the engines never sample (image placeholders); the trainer's distribution excludes them too
        self.suppress = tuple(suppressed_token_ids(processor))
        self._cache: dict[tuple[str, str], EncodedPrompt] = {}

    def encode(self, prompt: Prompt, mode: Mode) -> EncodedPrompt:
        from r4b_core.models.inputs import split_encoding
        from r4b_core.rollout.hf import encode_prompts

        key = (prompt.record.id, mode.value)
        if key not in self._cache:
            text = self.chat.prompt(prompt.record.question, len(prompt.images), mode=mode)
            ids, per_token, media = split_encoding(encode_prompts(self.processor, [text], [prompt.images]))
            where = [k for k, t in enumerate(ids) if t == self.think_id]
            if not where:
                raise BPOError(f"prompt of {prompt.record.id!r} in mode {mode.value} has no {modes.THINK_OPEN} "
                               f"token after tokenization; the tokenizer must know the think tags")
            prompt_len = where[-1] + 1
            self._cache[key] = EncodedPrompt(prompt.record.id, ids, media, per_token, prompt_len, len(ids) - prompt_len)
        return self._cache[key]


@dataclass
class TrainItem:
    """One rollout as the trainer sees it: shared prefix | response (forced tokens + generated)."""
    prompt: EncodedPrompt
    gen_ids: list[int]
    rollout_logprobs: list[float]
    advantage: float
    think: bool                      # forced (or, for GRPO, chosen) mode was thinking

    @property
    def response(self) -> list[int]:
        return self.prompt.forced_ids + self.gen_ids


@dataclass
class MicroBatch:
    """U distinct prefixes (prompt through `<think>`, left-padded, with the processor's tensors) and
    B responses.

    All 2g rollouts of a prompt share its prefix — both modes, since the forced tokens come after
    `<think>` — so the trainer runs the prefix (and the vision tower) once per prompt and the
    responses against its KV cache: the same logits as full sequences for far fewer tokens.
    Response-side tensors are [B, R]; position t holds response token t and its prediction.
    """
    prefix_ids: torch.Tensor         # [U, P] left-padded
    prefix_mask: torch.Tensor        # [U, P]
    prefix_inputs: dict              # media tensors of the U prefixes, per-token ones [U, P]
    owner: torch.Tensor              # [B] prefix row of each response
    response_ids: torch.Tensor       # [B, R] right-padded
    response_mask: torch.Tensor      # [B, R]
    loss_mask: torch.Tensor          # [B, R]
    forced_mask: torch.Tensor
    generated_mask: torch.Tensor
    rollout_logp: torch.Tensor       # [B, R], engine logprobs at generated positions, else 0
    advantages: torch.Tensor         # [B]
    think: torch.Tensor              # [B] bool
    index: list[int]                 # positions in the train list

    def to(self, device: torch.device) -> MicroBatch:
        """The tensors on the trainer's device (DeepSpeed moves the model to its accelerator);
        the same object where they are already there (CPU)."""
        if self.prefix_ids.device == device:
            return self
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self)
                 if isinstance(getattr(self, f.name), torch.Tensor)}
        moved["prefix_inputs"] = {k: v.to(device) for k, v in self.prefix_inputs.items()}
        return replace(self, **moved)


def collate(items: list[TrainItem], index: list[int], pad_id: int, forced_trainable: bool) -> MicroBatch:
    from r4b_core.models.inputs import join_media, pad_per_token

    keys: dict[str, int] = {}
    prefixes: list[EncodedPrompt] = []
    owner = []
    for it in items:
        if it.prompt.key not in keys:
            keys[it.prompt.key] = len(prefixes)
            prefixes.append(it.prompt)
        owner.append(keys[it.prompt.key])
    P = max(e.prompt_len for e in prefixes)
    prefix_ids = torch.full((len(prefixes), P), pad_id, dtype=torch.long)
    prefix_mask = torch.zeros((len(prefixes), P), dtype=torch.long)
    for u, e in enumerate(prefixes):
        prefix_ids[u, P - e.prompt_len:] = torch.tensor(e.ids[:e.prompt_len])
        prefix_mask[u, P - e.prompt_len:] = 1
    prefix_inputs = {**join_media([e.media for e in prefixes if e.media]),
                     **pad_per_token([{k: v[:e.prompt_len] for k, v in e.per_token.items()} for e in prefixes],
                                     P, left=True)}
    R = max(len(it.response) for it in items)
    B = len(items)
    response_ids = torch.full((B, R), pad_id, dtype=torch.long)
    response_mask = torch.zeros((B, R), dtype=torch.long)
    rollout_lp = torch.zeros((B, R))
    for b, it in enumerate(items):
        resp = it.response
        response_ids[b, :len(resp)] = torch.tensor(resp)
        response_mask[b, :len(resp)] = 1
        if it.gen_ids:
            f = it.prompt.n_forced
            rollout_lp[b, f:f + len(it.gen_ids)] = torch.tensor(it.rollout_logprobs)
    # response coordinates: a virtual sequence [one prefix slot | response], see response_masks
    loss, forced, generated = bpo_math.response_masks(
        torch.ones(B, dtype=torch.long), torch.tensor([it.prompt.n_forced for it in items]),
        torch.tensor([len(it.gen_ids) for it in items]), R + 1, forced_trainable)
    return MicroBatch(prefix_ids, prefix_mask, prefix_inputs, torch.tensor(owner),
                      response_ids, response_mask, loss, forced, generated, rollout_lp,
                      torch.tensor([it.advantage for it in items]), torch.tensor([it.think for it in items]), index)


def sequence_logprobs(model, mb: MicroBatch, temperature: float,
                      suppress: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """log-prob of each response token and the entropy at its position, under
    softmax(logits / temperature), with positions as the engines generate them: the prefix's from
    the model's rope index where it has one (M-RoPE), else from the attention mask (left padding);
    response token t at the prefix's largest position + 1 + t."""
    from r4b_core.rollout.hf import rope_positions

    bare = getattr(model, "module", model)           # a DeepSpeed engine's module
    prefix_pos = rope_positions(bare, {"input_ids": mb.prefix_ids, "attention_mask": mb.prefix_mask,
                                       **mb.prefix_inputs})
    if prefix_pos is None:
        prefix_pos = (mb.prefix_mask.cumsum(-1) - 1).clamp(min=0)
    head = model(input_ids=mb.prefix_ids, attention_mask=mb.prefix_mask, position_ids=prefix_pos,
                 use_cache=True, logits_to_keep=1, **mb.prefix_inputs)
    cache = getattr(head, "cache", None) or head.past_key_values
    cache.batch_select_indices(mb.owner)                 # each response gets its prompt's K/V
    last = prefix_pos[:, -1] if prefix_pos.ndim == 2 else prefix_pos.amax(dim=(0, 2))
    start = (last[mb.owner] + 1).unsqueeze(-1)
    resp_pos = start + torch.arange(mb.response_ids.shape[1], device=start.device).unsqueeze(0)
    attn = torch.cat([mb.prefix_mask[mb.owner], mb.response_mask], dim=1)
    body = model(input_ids=mb.response_ids, attention_mask=attn, position_ids=resp_pos, cache=cache,
                 use_cache=True)
    # token 0 of a response is predicted by the prefix's last position, token t by response t-1
    logits = torch.cat([head.logits[:, -1:][mb.owner], body.logits[:, :-1]], dim=1)
    return bpo_math.token_logprobs(logits, mb.response_ids, temperature, suppress)


def micro_batches(items: list[TrainItem], size: int) -> list[list[int]]:
    """Indices of `items` in chunks of at most `size`, keeping a prompt's rollouts together
    (they share one prefix pass) and filling chunks with whole prompt groups where they fit."""
    groups: dict[str, list[int]] = {}
    for k, it in enumerate(items):
        groups.setdefault(it.prompt.key, []).append(k)
    chunks: list[list[int]] = []
    current: list[int] = []
    for members in groups.values():
        if current and len(current) + len(members) > size:
            chunks.append(current)
            current = []
        for k in members:
            if len(current) == size:
                chunks.append(current)
                current = []
            current.append(k)
    if current:
        chunks.append(current)
    return chunks


# ---------------------------------------------------------------------------------------------
# Loss + update over one rollout batch
# ---------------------------------------------------------------------------------------------
def _fill_missing_grads(model) -> list:
    """Zero gradients for the trainable parameters no backward reached, so every rank reduces the
    same tensors (a rank without rollouts, or whose micro-batches skipped a module). Returns the
    trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return params


def _all_reduce_grads(model) -> None:
    """Sum gradients over the training processes in one flat buffer. Each rank's loss is already
    normalised by whole-batch totals, so the sum is the full-batch gradient; a rank without
    rollouts this step contributes zeros (it must still join, or the others would wait forever)."""
    import torch.distributed as dist

    params = _fill_missing_grads(model)
    flat = torch._utils._flatten_dense_tensors([p.grad for p in params])
    dist.all_reduce(flat)
    for p, g in zip(params, torch._utils._unflatten_dense_tensors(flat, [p.grad for p in params])):
        p.grad.copy_(g)


def check_ranks_agree(model, env) -> str:
    """Every training process must hold the same weights (same start, same summed gradients, same
    optimizer); a silent divergence would make each rank's sidecar serve a different policy.
    Compares a fingerprint of the parameters across ranks; returns it, raises BPOError if they differ."""
    from r4b_core.training.distributed import broadcast_object, gather_objects

    with torch.no_grad():
        total = sum(p.double().sum().item() for p in model.parameters())
        square = sum((p.double() ** 2).sum().item() for p in model.parameters())
    mine = f"{total:.17g}/{square:.17g}"
    if env is None or not env.initialized:
        return mine
    prints = gather_objects(mine, env)
    verdict = broadcast_object(None if prints is None or len(set(prints)) == 1 else prints, env)
    if verdict is not None:
        raise BPOError(f"the {env.world_size} training processes hold different weights (fingerprints "
                       f"{verdict}); gradients were not summed identically — do not use this run")
    return mine


def policy_update(model, ref_model, optimizer, scheduler, items: list[TrainItem], b: BPOConfig,
                  pad_id: int, suppress: tuple[int, ...] = (), env=None, ds_engine=None,
                  behind: int = 0) -> dict[str, float]:
    """`ppo_epochs` optimizer steps over the rollout batch; returns the loss-side metrics.

    Under several processes (`env`, training/distributed.py) every rank calls this with its own
    share of the rollouts (possibly none); totals and gradients are summed across ranks.
    `ds_engine` (DeepSpeed ZeRO-2 around `model`; `optimizer` is then its ZeRO optimizer) does the
    reduction, clipping and step instead, with the same update.

    `behind`: how many updates older than the trainer's the policy that sampled the rollouts is
    (async rollouts). 0: on-policy, the PPO ratio is against the engine's logprobs, which must
    match the trainer's (else nothing is updated). >= 1: the ratio is against the trainer's own
    logprobs before the update, and each sampled token's term is weighted by
    min(π_trainer / π_rollout, bpo.is_cap) (bpo_math.truncated_is_weights)."""
    from r4b_core.training.distributed import all_reduce_sum

    dist_on = env is not None and env.initialized
    # DeepSpeed averages gradients over ranks where the plain path sums them: scaling each rank's
    # loss by the world size makes the two updates identical
    ds_scale = float(env.world_size) if (ds_engine is not None and dist_on) else 1.0
    forward = ds_engine if ds_engine is not None else model
    stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("ratio_gen", "entropy", "kl", "clipped", "think_p",
                                                            "no_think_p", "truncated")}
    losses: list[float] = []
    grad_norms: list[float] = []
    chunks = micro_batches(items, b.micro_batch_size)
    device = next(model.parameters()).device
    batches = [collate([items[k] for k in c], c, pad_id, b.mode_token_trainable).to(device) for c in chunks]
    total_tokens = float(sum(mb.loss_mask.sum().item() for mb in batches))
    total_seqs = float(sum((mb.loss_mask.sum(-1) > 0).sum().item() for mb in batches))
    if dist_on:
        total_tokens, total_seqs = all_reduce_sum([total_tokens, total_seqs], env)
    forced_old: dict[int, torch.Tensor] = {}       # policy's own logprobs, pre-update (forced tokens; all if behind)
    is_weight: dict[int, torch.Tensor] = {}        # truncated importance weights (behind >= 1)
    worst_gap = 0.0                                 # max |trainer - engine| logprob on sampled tokens
    ref_cache: dict[int, torch.Tensor] = {}
    model.train()
    for epoch in range(b.ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        epoch_loss = 0.0
        # ZeRO-2 would reduce gradients inside every backward, a collective that needs the same
        # number of backward calls on every rank; coalescing keeps them local until the block ends
        # (one reduction per optimizer step), so ranks with more, fewer or no micro-batches agree
        accumulate = ds_engine.coalesce_grad_reduction() if ds_engine is not None else contextlib.nullcontext()
        with accumulate:
            for n, mb in enumerate(batches):
                logp, entropy = sequence_logprobs(forward, mb, b.temperature, suppress)
                if epoch == 0:
                    forced_old[n] = logp.detach()
                    gap = (logp.detach() - mb.rollout_logp).abs()[mb.generated_mask]
                    worst_gap = max(worst_gap, gap.max().item() if gap.numel() else 0.0)
                    # engine-vs-trainer mismatch: the ratio before any update, on sampled tokens only
                    stats["ratio_gen"].append(torch.exp(logp.detach() - mb.rollout_logp)[mb.generated_mask])
                    stats["entropy"].append(entropy.detach()[mb.loss_mask])
                    first_forced = mb.forced_mask & ~torch.cat(
                        [torch.zeros_like(mb.forced_mask[:, :1]), mb.forced_mask[:, :-1]], dim=1)
                    p_first = logp.detach().exp()[first_forced]
                    rows = first_forced.any(-1)
                    stats["think_p"].append(p_first[mb.think[rows]])
                    stats["no_think_p"].append(p_first[~mb.think[rows]])
                    if behind:
                        weights, truncated = bpo_math.truncated_is_weights(logp, mb.rollout_logp, b.is_cap)
                        is_weight[n] = torch.where(mb.generated_mask, weights, torch.ones_like(weights))
                        stats["truncated"].append(truncated[mb.generated_mask].float())
                if behind:
                    terms = bpo_math.ppo_clip_loss(logp, forced_old[n], mb.advantages, b.clip_eps)
                    per_token = terms.loss * is_weight[n]
                else:
                    old = torch.where(mb.forced_mask, forced_old[n], mb.rollout_logp)
                    terms = bpo_math.ppo_clip_loss(logp, old, mb.advantages, b.clip_eps)
                    per_token = terms.loss
                if b.kl_beta > 0 and ref_model is not None:
                    if n not in ref_cache:
                        with torch.no_grad():
                            ref_cache[n], _ = sequence_logprobs(ref_model, mb, b.temperature, suppress)
                    kl = bpo_math.k3_kl(logp, ref_cache[n])
                    per_token = per_token + b.kl_beta * kl
                    stats["kl"].append(kl.detach()[mb.loss_mask])
                stats["clipped"].append(terms.clipped[mb.loss_mask].float())
                loss = bpo_math.aggregate(per_token, mb.loss_mask, b.loss_agg,
                                          total_tokens=total_tokens, total_seqs=total_seqs)
                if ds_engine is not None:
                    ds_engine.backward(loss * ds_scale)     # gradient_accumulation_steps is 1: no division
                else:
                    loss.backward()
                epoch_loss += loss.item()
            stale = worst_gap > b.sync_tolerance and not behind    # an older policy's rollouts differ by design
            if epoch == 0 and dist_on:
                stale = all_reduce_sum([float(stale)], env)[0] > 0      # every rank stops, or none
            if ds_engine is not None:
                _fill_missing_grads(model)          # DeepSpeed reduces when the block ends
        if epoch == 0 and stale:
            # before any update: the rollouts were not sampled from the trainer's weights (a stale
            # or wrong sidecar, a different temperature or tokenizer); training on them is wrong
            optimizer.zero_grad(set_to_none=True)
            model.eval()
            raise BPOError(f"rollout check: engine logprobs differ from the trainer's by max {worst_gap:.3e} "
                           f"> bpo.sync_tolerance {b.sync_tolerance:g} on the sampled tokens; the rollout "
                           f"engine is not serving the trainer's policy (stale weights?). Nothing was updated")
        if dist_on:
            epoch_loss = all_reduce_sum([epoch_loss], env)[0]
        if ds_engine is not None:
            ds_engine.step()            # clips at bpo.optim.grad_clip (the engine's config), steps, zeroes
            grad_norm = float(ds_engine.get_global_grad_norm() or 0.0)
        else:
            if dist_on:
                _all_reduce_grads(model)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), b.optim.grad_clip))
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(epoch_loss)
        grad_norms.append(grad_norm)
    model.eval()

    def cat(name):
        return torch.cat(stats[name]) if stats[name] else torch.zeros(0)

    ratio = cat("ratio_gen")
    out = {"loss": losses[-1], "loss_first_epoch": losses[0], "grad_norm": grad_norms[-1],
           "is_ratio/max_abs_log": worst_gap,
           "train_tokens": total_tokens, "train_seqs": total_seqs,
           "clip_fraction": cat("clipped").mean().item() if cat("clipped").numel() else 0.0,
           "entropy": cat("entropy").mean().item() if cat("entropy").numel() else 0.0}
    for k, v in bpo_math.masked_stats(ratio, torch.ones_like(ratio, dtype=torch.bool)).items():
        out[f"is_ratio/{k}"] = v
    if ratio.numel():
        out["is_ratio/abs_log_mean"] = ratio.log().abs().mean().item()
    if b.async_staleness:
        out["is_ratio/truncated_fraction"] = cat("truncated").mean().item() if cat("truncated").numel() else 0.0
    if b.kl_beta > 0:
        out["kl"] = cat("kl").mean().item() if cat("kl").numel() else 0.0
    if cat("think_p").numel():
        out["decision/p_think_token"] = cat("think_p").mean().item()
    if cat("no_think_p").numel():
        out["decision/p_no_think_token"] = cat("no_think_p").mean().item()
    if optimizer.param_groups:
        out["lr"] = optimizer.param_groups[0]["lr"]
    return out


# ---------------------------------------------------------------------------------------------
# Where a step's rollouts come from: now, or generated during the previous update (async)
# ---------------------------------------------------------------------------------------------
@dataclass
class RolloutBatch:
    """One step's rollouts and the policy version that generated every one of them."""
    step: int
    completions: list[Completion]
    policy_version: int
    generate_s: float                # the engine's time for the batch (on the background thread if async)
    verify: dict | None = None       # the weight-sync check that finished inside the generation (overlap_verify)
    regenerated: bool = False        # a prefetched batch was too far behind and was generated again


class Rollouts:
    """Rollouts and weight pushes of the run, synchronous or async (`bpo.async_staleness` = k).

    k = 0: `take` generates the step's batch when asked, from the policy the trainer holds, and
    `sync` pushes every new version (today's exact behaviour).
    k >= 1: `start` has the next step's batch generated on a background thread from the policy the
    engine serves, while the trainer updates (the vLLM sidecar is a process of its own, so both
    work at once); `take` waits for it and regenerates it if it is more than k versions behind the
    trainer. `sync` pushes only when the batch generated next would otherwise be more than k
    behind when trained (k = 1: every version), and first waits for the batch in flight: the
    sidecar cannot reload under running requests, so every batch comes from one version — a
    prompt's 2g forced-mode rollouts included. The push is verified as in the synchronous run
    (with overlap_verify the check finishes inside the next generation, before it returns).
    The model is read on the caller's thread only; the background thread only talks to the engine.
    """

    def __init__(self, engine, model, b: BPOConfig, run_seed: int, chat):
        import concurrent.futures as cf

        self.engine, self.model, self.b, self.run_seed, self.chat = engine, model, b, run_seed, chat
        self.staleness = b.async_staleness
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="r4b-rollouts") if self.staleness else None
        self._ahead: tuple[int, int, Any] | None = None      # (step, engine version at start, future)

    def _generate(self, step: int, prompts: list[Prompt]) -> RolloutBatch:
        t0 = time.perf_counter()
        completions = self.engine.generate(plan_rollouts(prompts, self.b, self.run_seed, step, self.chat))
        versions = sorted({c.policy_version for c in completions})
        if len(versions) > 1:
            raise BPOError(f"step {step}: the batch's rollouts came from policy versions {versions}; a batch "
                           f"(and each prompt's forced-mode group) must come from one version")
        version = versions[0] if versions else self.engine.policy_version
        return RolloutBatch(step, completions, version, time.perf_counter() - t0, self.engine.last_rollout_verify)

    def start(self, step: int, prompts: list[Prompt]) -> None:
        """Async: generate `step`'s batch in the background from the version the engine serves."""
        if self._pool is not None:
            self._ahead = (step, self.engine.policy_version, self._pool.submit(self._generate, step, prompts))

    def in_flight(self) -> dict | None:
        """The prefetched batch not yet trained (for checkpoints): its step (counted from 1, as the
        history) and policy version."""
        return {"step": self._ahead[0] + 1, "policy_version": self._ahead[1]} if self._ahead else None

    def drain(self) -> float:
        """Wait until the batch in flight (if any) is generated; returns the seconds waited. Its
        errors (a dead sidecar, a failed sync check) are raised here."""
        if self._ahead is None:
            return 0.0
        t0 = time.perf_counter()
        self._ahead[2].exception()         # waits; the error, if any, is raised by `take`
        return time.perf_counter() - t0

    def take(self, step: int, prompts: list[Prompt], trainer_version: int) -> RolloutBatch:
        """The batch for `step`: the prefetched one if it is at most k versions behind the trainer,
        else (or with none prefetched) one generated now from the trainer's version."""
        if self._ahead is not None:
            ahead_step, _, future = self._ahead
            self._ahead = None
            batch = future.result()
            if ahead_step != step:
                raise BPOError(f"the prefetched rollouts are for step {ahead_step}, not {step}")
            if trainer_version - batch.policy_version <= self.staleness:
                return batch
            if self.engine.policy_version != trainer_version:
                self.engine.update_weights(self.model, trainer_version)
            return replace(self._generate(step, prompts), regenerated=True)
        return self._generate(step, prompts)

    def sync(self, version: int) -> dict[str, float]:
        """Serve the trainer's new `version` where the staleness bound needs it; returns the push's
        metrics (sync/*, and async/wait_s: the time spent waiting for the batch in flight)."""
        m: dict[str, float] = {}
        if self.engine.policy_version >= version + 1 - self.staleness:
            return {"sync/skipped": 1.0}       # the next batch is within the bound without it
        if self.staleness:
            m["async/wait_s"] = self.drain()
        if self.b.sync_verify == "rollout":
            # verified by the next step's rollouts (policy_update checks every sampled token)
            m.update({f"sync/{k}": float(v) for k, v in self.engine.push_weights(self.model).items()})
            self.engine.policy_version = version
            m["sync/verify_s"] = 0.0
            return m
        self.engine.update_weights(self.model, version)
        for k, v in self.engine.last_sync.items():
            if k not in ("verify_s", "max_abs_diff"):      # logged with the check (sync_check_metrics)
                m[f"sync/{k}"] = float(v)   # vLLM: write / reload seconds
        return m

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# The step
# ---------------------------------------------------------------------------------------------
def make_optimizer(model, b: BPOConfig):
    """AdamW over the vision / projector / LLM groups, less the parts `bpo.optim.freeze` leaves as
    they are. The fused kernel (one op per step instead of ~10 per parameter tensor; same update
    rule, TRL's default too) wherever the parameters live on a device that has it."""
    from r4b_core.training.optim import freeze_components, param_groups

    freeze_components(model, b.optim.freeze)

    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, b.optim), betas=tuple(b.optim.betas), fused=fused or None)


@dataclass
class Trainer:
    """What the step works with. Plain fields; the control flow lives in `bpo_step`."""
    model: Any
    ref_model: Any
    optimizer: Any
    scheduler: Any
    engine: RolloutEngine
    scorer: Any
    encoder: PromptEncoder
    cfg: RunConfig
    policy_version: int = 0
    env: Any = None                  # training/distributed.DistEnv; None = one process
    ds_engine: Any = None            # DeepSpeed ZeRO-2 engine around `model` (optimizer: its ZeRO one)
    rollouts: Rollouts | None = None     # built from the engine unless given

    def __post_init__(self):
        if self.rollouts is None:
            self.rollouts = Rollouts(self.engine, self.model, self.cfg.bpo, self.cfg.seed, self.encoder.chat)


@dataclass
class StepResult:
    metrics: dict[str, float]
    samples: list[dict] = field(default_factory=list)


def bpo_step(tr: Trainer, prompts: list[Prompt], step: int, upcoming: list[Prompt] | None = None) -> StepResult:
    """rollout -> reward -> advantage -> loss -> update -> sync, timed per phase. `upcoming`: the
    next step's prompts, whose rollouts (async, bpo.async_staleness >= 1) are generated while
    this step trains."""
    b = tr.cfg.bpo
    per_prompt = 2 * b.group_size
    m: dict[str, float] = {}
    t_start = time.perf_counter()

    # 1. rollout ------------------------------------------------------------------------------
    batch = tr.rollouts.take(step, prompts, tr.policy_version)   # async: generated during the last update
    if upcoming is not None:
        tr.rollouts.start(step + 1, upcoming)                      # async: generated during this update
    completions = batch.completions
    if len(completions) != len(prompts) * per_prompt:
        raise BPOError(f"engine returned {len(completions)} completions for {len(prompts)} prompts x "
                       f"{per_prompt}; expected {len(prompts) * per_prompt}")
    behind = tr.policy_version - batch.policy_version
    if not 0 <= behind <= b.async_staleness:
        raise BPOError(f"step {step}: the rollouts came from policy version {batch.policy_version}, the "
                       f"trainer is at {tr.policy_version} (bpo.async_staleness {b.async_staleness}); the "
                       f"engine is serving stale weights")
    t_rollout = time.perf_counter()
    # With overlapped verification (vLLM, bpo.sync_overlap_verify) the previous push's probe check
    # finished inside generate: log it here, and count the wait it added after the rollouts were
    # done as sync time, not rollout time (async: it was on the background thread, in neither).
    checked = batch.verify
    verify_wait = checked["wait_s"] if checked and not tr.rollouts.staleness else 0.0
    if checked:
        m["sync/verify_wait_s"] = checked["wait_s"]
    if b.async_staleness:
        m.update({"async/behind": float(behind), "async/regenerated": float(batch.regenerated),
                  "async/generate_s": batch.generate_s, "rollout/policy_version": float(batch.policy_version)})

    # 2. reward -------------------------------------------------------------------------------
    scored = score_rollouts(tr.scorer, prompts, completions, per_prompt)
    t_reward = time.perf_counter()

    # 3. advantage ----------------------------------------------------------------------------
    rewards = torch.tensor([s.reward for s in scored]).view(len(prompts), per_prompt)
    forced_think = torch.tensor([s.completion.mode == Mode.THINK for s in scored]).view(len(prompts), per_prompt)
    adv = bpo_math.group_advantages(rewards, forced_think, grouping=b.advantage, scale_by_std=b.scale_by_std)
    keep = adv.informative if b.drop_zero_variance else torch.ones(len(prompts), dtype=torch.bool)
    m["groups/informative"] = adv.informative.float().sum().item()
    m["groups/dropped"] = float(len(prompts) - int(keep.sum()))
    kept_adv = adv.values[keep]
    if kept_adv.numel():
        m.update({"advantage/mean": kept_adv.mean().item(), "advantage/std": kept_adv.std(correction=0).item(),
                  "advantage/abs_mean": kept_adv.abs().mean().item(), "advantage/max": kept_adv.max().item(),
                  "advantage/min": kept_adv.min().item()})

    # 4 + 5. loss and update ------------------------------------------------------------------
    items = []
    image_token_rollouts = 0
    for j, s in enumerate(scored):
        i = s.prompt_index
        if not keep[i]:
            continue
        if any(t in tr.encoder.suppress for t in s.completion.token_ids):
            # a sampled image placeholder would be taken for an image by the trainer's forward
            # (features/tokens mismatch); such a rollout is left out of the loss, counted
            image_token_rollouts += 1
            continue
        enc = tr.encoder.encode(prompts[i], s.completion.mode)
        if s.completion.prompt_token_ids and s.completion.prompt_token_ids != enc.ids:
            raise BPOError(f"step {step}: the engine tokenized the prompt of {prompts[i].record.id!r} "
                           f"({len(s.completion.prompt_token_ids)} tokens) differently from the trainer "
                           f"({len(enc.ids)} tokens); the logprobs would not be comparable. Use the same "
                           f"tokenizer/processor and chat template on both sides")
        think = s.completion.mode == Mode.THINK if b.algorithm == "bpo" else s.chose_think
        items.append(TrainItem(enc, list(s.completion.token_ids), list(s.completion.logprobs),
                               float(adv.values[i, j % per_prompt]), think))
    m["rollouts/dropped_image_token"] = float(image_token_rollouts)
    n_train = len(items)
    if tr.env is not None and tr.env.initialized:
        from r4b_core.training.distributed import all_reduce_sum

        n_train = int(all_reduce_sum([float(n_train)], tr.env)[0])    # every rank updates, or none
    if n_train:
        m.update(policy_update(tr.model, tr.ref_model, tr.optimizer, tr.scheduler, items, b, tr.encoder.pad_id,
                               tr.encoder.suppress, tr.env, tr.ds_engine, behind))
        tr.policy_version += 1
    else:
        m["skipped_update"] = 1.0
    t_train = time.perf_counter()

    # 6. sync ---------------------------------------------------------------------------------
    if n_train:
        m.update(tr.rollouts.sync(tr.policy_version))    # async: once the batch in flight is done
    waited = m.get("async/wait_s", 0.0)                  # for rollouts: rollout time, not sync time
    t_sync = time.perf_counter()

    # metrics per mode ------------------------------------------------------------------------
    for name, group in _mode_groups(scored, b).items():
        if not group:
            continue
        m[f"reward/{name}"] = sum(s.reward for s in group) / len(group)
        m[f"accuracy/{name}"] = sum(s.reward >= 1.0 for s in group) / len(group)
        m[f"length/{name}"] = sum(len(s.completion.token_ids) for s in group) / len(group)
        m[f"truncated/{name}"] = sum(s.completion.finish_reason == "length" for s in group) / len(group)
        m[f"rollouts/{name}"] = float(len(group))
    m["reward/mean"] = rewards.mean().item()
    if b.algorithm == "grpo":
        m["rollouts/no_think_share"] = sum(not s.chose_think for s in scored) / len(scored)
    m["policy_version"] = float(tr.policy_version)
    m.update({"time/rollout": t_rollout - t_start - verify_wait + waited, "time/reward": t_reward - t_rollout,
              "time/train": t_train - t_reward, "time/sync": t_sync - t_train + verify_wait - waited,
              "time/step": t_sync - t_start})
    return StepResult(m, _samples(scored, prompts, step, b))


def sync_check_metrics(engine: RolloutEngine, verified: list[int]) -> dict[str, float]:
    """The weight-sync checks the engine finished since the last call (vLLM): with overlapped
    verification a push is checked during the next rollouts, so a step logs the checks that
    ended in it, and which policy version they were for. Appends the versions to `verified`."""
    checks = engine.sync_checks
    done = []
    while checks:                # pop, not copy-and-clear: an async generation may append meanwhile
        done.append(checks.pop(0))
    if not done:
        return {}
    verified.extend(c["version"] for c in done)
    return {"sync/verify_s": sum(c["verify_s"] for c in done) / len(done),
            "sync/max_abs_diff": max(c["max_abs_diff"] for c in done),
            "sync/verified_version": float(max(c["version"] for c in done))}


def _mode_groups(scored: list[Scored], b: BPOConfig) -> dict[str, list[Scored]]:
    if b.algorithm == "bpo":
        return {"think": [s for s in scored if s.completion.mode == Mode.THINK],
                "no_think": [s for s in scored if s.completion.mode == Mode.NO_THINK]}
    # GRPO: by the mode the policy chose in auto mode
    return {"think": [s for s in scored if s.chose_think], "no_think": [s for s in scored if not s.chose_think],
            "auto": scored}


def _samples(scored: list[Scored], prompts: list[Prompt], step: int, b: BPOConfig) -> list[dict]:
    """The first rollout of each mode group of the step's first prompt (for the JSONL artifact)."""
    out, seen = [], set()
    for s in scored:
        if s.prompt_index != 0:
            break
        key = s.completion.mode.value if b.algorithm == "bpo" else ("think" if s.chose_think else "no_think")
        if key in seen:
            continue
        seen.add(key)
        rec = prompts[0].record
        out.append({"step": step, "mode": key, "id": rec.id, "question": rec.question, "answer": rec.answer,
                    "completion": s.completion.text, "reward": s.reward, "tokens": len(s.completion.token_ids),
                    "finish_reason": s.completion.finish_reason})
    return out


# ---------------------------------------------------------------------------------------------
# Auto-mode probes: does the policy think where it should?
# ---------------------------------------------------------------------------------------------
def decision_probability(model, encoder: PromptEncoder, prompts: list[Prompt]) -> float:
    """Mean p(think) of the auto-mode decision: the probability of the thinking prefix's first
    token right after `<think>` (the token a forced-think rollout starts with). A continuous view of
    what the greedy think-rate only shows once it crosses 1/2."""
    if not prompts:
        return 0.0
    items = []
    for p in prompts:
        think = encoder.encode(p, Mode.THINK)
        items.append(TrainItem(think, [], [], 0.0, True))
    mb = collate(items, list(range(len(items))), encoder.pad_id, True).to(next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logp, _ = sequence_logprobs(model, mb, 1.0, encoder.suppress)
    finally:
        model.train(was_training)
    return logp[:, 0].exp().mean().item()


def run_probes(engine, scorer, sets: dict[str, list[Prompt]], b: BPOConfig, encoder: PromptEncoder,
               model=None) -> dict[str, float]:
    """Greedy auto-mode generations on the fixed probe sets: think-rate, accuracy, mean length,
    and (given the trainer's model) the mean probability of choosing to think."""
    out: dict[str, float] = {}
    for name, items in sets.items():
        if model is not None:
            out[f"probe/{name}/p_think"] = decision_probability(model, encoder, items)
        reqs = [GenerationRequest(prompt=encoder.chat.prompt(p.record.question, len(p.images), mode=Mode.AUTO),
                                  images=p.images, mode=Mode.AUTO, max_new_tokens=b.max_new_tokens_think,
                                  temperature=0.0, n=1, key=p.record.id) for p in items]
        comps = engine.generate(reqs)
        scored = score_rollouts(scorer, items, comps, 1)
        out[f"probe/{name}/think_rate"] = sum(s.chose_think for s in scored) / len(scored)
        out[f"probe/{name}/accuracy"] = sum(s.reward >= 1.0 for s in scored) / len(scored)
        out[f"probe/{name}/length"] = sum(len(s.completion.token_ids) for s in scored) / len(scored)
    return out


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def stage_name(cfg: RunConfig) -> str:
    return "bpo" if cfg.bpo.algorithm == "bpo" else "grpo"


def bpo_identity(cfg: RunConfig, store, prompts_uri: str, init_model_uri: str) -> dict:
    """What a BPO run learns from: the bpo section (less its operational knobs), seed, model, the
    prompts and the init model, each with its lineage (a re-annealed model must not be skipped as
    done). Not `vllm`: how the rollouts are served does not change what is learned."""
    from r4b_core.identity import data_lineage, model_lineage, stage_identity

    return stage_identity(cfg, "bpo", {
        "prompts": prompts_uri, "prompts_data": data_lineage(store, prompts_uri) if store.exists(prompts_uri) else None,
        "init_model": init_model_uri, "init_weights": model_lineage(store, init_model_uri) or "no manifest"})


def run_bpo(cfg: RunConfig, prompts_uri: str, init_model_uri: str, out_uri: str, tracker=None) -> dict:
    """Train the policy at `init_model_uri` on the prompts at `prompts_uri`; write the final model
    to `out_uri` (+ manifest.json). Skips when `out_uri` already has a manifest with this config's
    hash; resumes from the newest complete checkpoint under `<out_uri>/../checkpoints`."""
    from r4b_core.identity import identity_hash
    from r4b_core.models.loading import load_model, save_model
    from r4b_core.rewards import RewardScorer
    from r4b_core.rollout import open_engine
    from r4b_core.storage import Store
    from r4b_core.training import checkpoint as ckpt
    from r4b_core.training.distributed import init_distributed, teardown
    from r4b_core.training.optim import cosine_scheduler

    b = cfg.bpo
    name = stage_name(cfg)
    store = Store.from_config(cfg.storage)
    ident = bpo_identity(cfg, store, prompts_uri, init_model_uri)
    config_hash = identity_hash(ident)
    if config_hash is not None and store.is_complete(out_uri, config_hash):
        manifest = store.read_manifest(out_uri)
        manifest["skipped"] = True
        print(f"{name}: {out_uri} is complete for config {config_hash}; skipping")
        return manifest

    t0 = time.perf_counter()
    if b.cpu_threads:
        torch.set_num_threads(b.cpu_threads)
    use_ds = b.distributed.deepspeed == "zero2"      # zero3 is refused when the config loads
    env = init_distributed(b.distributed.backend, force=use_ds)   # DeepSpeed always wants a group
    check_bpo_config(cfg, world_size=env.world_size)       # before anything is loaded
    cache = Path(tempfile.gettempdir()) / "r4b-cache" / name
    work = Path(tempfile.mkdtemp(prefix=f"r4b-{name}-"))
    try:
        # -- setup ------------------------------------------------------------------------------
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        prompts, _ = load_prompts(prompts_uri, store, cfg.data.max_question_chars)
        model, processor = load_model(init_model_uri, cfg.model, store=store)
        model.eval()
        encoder = PromptEncoder(processor)
        longest = max(len(encoder.encode(p, m).ids) for p in prompts for m in rollout_modes(b))
        from r4b_core.rollout.hf import context_limit

        check_bpo_config(cfg, len(prompts), longest, env.world_size, context_limit(model))
        ref_model = None
        if b.kl_beta > 0:
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        optimizer = make_optimizer(model, b)
        scheduler = cosine_scheduler(optimizer, b.steps * b.ppo_epochs, b.optim.warmup_steps)
        ds_engine = None
        if use_ds:
            # ZeRO-2: optimizer state and gradients partitioned, full weights on every rank (the
            # engine push, the rank fingerprint, the probe and save_model read the bare module).
            # One engine step per PPO epoch; policy_update accumulates the micro-batches itself.
            from r4b_core.training.zero import deepspeed_engine

            use_bf16 = env.device.type == "cuda" and torch.cuda.is_bf16_supported()
            ds_engine, optimizer = deepspeed_engine(model, optimizer, stage=2, grad_accum=1,
                                                    grad_clip=b.optim.grad_clip, use_bf16=use_bf16)
            model = ds_engine.module
            if ref_model is not None:
                ref_model.to(env.device)        # where the engine put the policy (its accelerator)
        trainee = ckpt.Trainee(model, optimizer, scheduler, engine=ds_engine)

        # -- resume -----------------------------------------------------------------------------
        root = layout.checkpoints_dir(out_uri)
        start_step, version, base_position = 0, 0, 0
        resumes: list[dict] = []             # each resume: its step, version, the rollouts it regenerated
        history: list[dict] = []             # per-step metrics, kept in checkpoints and the manifest
        samples: list[dict] = []             # a few completions per mode and step (JSONL artifact)

        def same_config(uri: str, saved: dict) -> None:
            if saved.get("config_hash") != config_hash:
                diff = ckpt.config_diff(saved.get("identity", {}), ident)
                if b.resume != "force":
                    raise BPOError(f"{uri} was written under a different config "
                                   f"({'; '.join(diff[:6]) or 'inputs changed'}); resume with "
                                   f"--set bpo.resume=force (the current config wins) or delete {root}")
                if env.is_main:
                    print(f"{name}: resuming under a changed config, current values win: {'; '.join(diff[:6])}")

        found = ckpt.resume(store, root, trainee, env, cache, accept=same_config,
                            say=lambda line: print(f"{name}: {line}", flush=True))
        if found is not None:
            state = found[1]
            start_step, version = int(state["step"]), int(state["policy_version"])
            history = list(state.get("history", []))
            samples = list(state.get("samples", []))
            # the stored prompt position wins (prompts_per_step may differ under resume=force)
            base_position = int(state.get("prompt_position", start_step * b.prompts_per_step))
            print(f"{name}: resumed from {found[0]} (step {start_step}, policy version {version})")
            # async: the batch generated for the next step when the checkpoint was written died with
            # the process; that step trains on rollouts generated again, from the checkpoint's weights
            lost = state.get("rollouts_in_flight")
            if lost:
                print(f"{name}: the rollouts of step {lost['step']} (policy version {lost['policy_version']}) "
                      f"were in flight at the checkpoint; they are generated again from version {version}")
            resumes = list(state.get("resumes", [])) + [{"from_step": start_step, "policy_version": version,
                                                          "rollouts_in_flight": lost}]

        stream = PromptStream(prompts, cfg.seed)
        probes = probe_sets(prompts, b.probe_size)
        per_rank = b.prompts_per_step // env.world_size
        samples_path = work / "samples.jsonl"
        stage_ctx = tracker.stage(name) if tracker is not None else contextlib.nullcontext()
        last: dict[str, float] = {}

        # -- train ------------------------------------------------------------------------------
        with (stage_ctx, open_engine(cfg, b.engine, init_model_uri, model, processor, label=name) as engine,
              RewardScorer() as scorer, contextlib.ExitStack() as stack):
            if tracker is not None and env.is_main:
                tracker.log_params({"bpo": b.model_dump(mode="json"), "stage": name, "prompts": len(prompts),
                                    "init_model": init_model_uri, "config_hash": config_hash})
            # a full, verified push before the first rollout: after a resume the sidecar still
            # serves the initial weights; on a fresh start this proves it serves the init model
            t_push = time.perf_counter()
            engine.update_weights(model, version)
            engine.wait_verified()
            verified_versions: list[int] = []
            sync_check_metrics(engine, verified_versions)
            if env.is_main:
                check = engine.last_sync.get("max_abs_diff")
                how = f", reload {engine.reload_path}" if engine.reload_path else ""
                print(f"{name}: engine {b.engine} serves policy version {version} (full push "
                      f"{time.perf_counter() - t_push:.2f}s" + (f", verified: max |logprob diff| {check:.1e}"
                                                                 if check is not None else "") + how + ")", flush=True)
            tr = Trainer(model, ref_model, optimizer, scheduler, engine, scorer, encoder, cfg, version, env, ds_engine)
            stack.callback(tr.rollouts.close)

            def position(step: int) -> int:        # this rank's first prompt of `step`
                return base_position + (step - start_step) * b.prompts_per_step + env.rank * per_rank

            for step in range(start_step, b.steps):
                upcoming = stream.take(position(step + 1), per_rank) if b.async_staleness and step + 1 < b.steps else None
                result = bpo_step(tr, stream.take(position(step), per_rank), step, upcoming)
                metrics = dict(result.metrics)
                if env.is_main and (step == start_step or (step + 1) % b.probe_every == 0 or step + 1 == b.steps):
                    tr.rollouts.drain()            # the probes' requests never run beside a batch's
                    metrics.update(run_probes(engine, scorer, probes, b, encoder, model))
                metrics.update(sync_check_metrics(engine, verified_versions))
                last = metrics
                history.append({"step": step + 1, "prompt_position": position(step) - env.rank * per_rank,
                                **{k: round(v, 6) for k, v in metrics.items()}})
                samples.extend(result.samples)
                if env.is_main:
                    _print_step(name, step, b.steps, metrics)
                    if tracker is not None:
                        tracker.log_metrics(metrics, step=step)
                done = step + 1
                if done % b.checkpoint_every == 0 or done == b.steps:
                    fingerprint = check_ranks_agree(model, env)
                    if env.is_main and env.initialized:
                        print(f"{name}: weights agree across {env.world_size} processes ({fingerprint})", flush=True)
                    ckpt.save(store, root, done, trainee, env,
                              {"config_hash": config_hash, "identity": ident, "policy_version": tr.policy_version,
                               "prompt_position": base_position + (done - start_step) * b.prompts_per_step,
                               "stage": name, "history": history, "samples": samples, "resumes": resumes,
                               "rollouts_in_flight": tr.rollouts.in_flight()})
                    if env.is_main:
                        ckpt.prune(store, root, b.keep_checkpoints)
            engine.wait_verified()      # the last push is checked too (overlap_verify)
            sync_check_metrics(engine, verified_versions)
            samples_path.write_text("".join(json.dumps(s) + "\n" for s in samples))
            if tracker is not None and env.is_main:
                tracker.log_artifact(str(samples_path))
            counters = dict(getattr(scorer, "counters", {}) or {})

        # -- save -------------------------------------------------------------------------------
        manifest = {
            "stage": name, "config_hash": config_hash,
            "inputs": {"prompts": prompts_uri, "init_model": init_model_uri},
            "outputs": {"model": out_uri},
            "counts": {"steps": b.steps, "prompts": len(prompts), "rollouts_per_step": b.prompts_per_step * 2 * b.group_size,
                       "policy_version": tr.policy_version},
            "resumed_from_step": start_step if found is not None else None,
            # every resume of this run: from which step and version, and the async batch that was
            # in flight at its checkpoint (generated again after the resume, never trained twice)
            "resumes": resumes,
            "async_staleness": b.async_staleness,
            "world_size": env.world_size,
            "deepspeed": b.distributed.deepspeed,
            "metrics": {k: v for k, v in last.items() if isinstance(v, (int, float)) and math.isfinite(v)},
            "reward_counters": counters,
            # policy versions whose push to the sidecar was verified (vLLM; empty for hf)
            "verified_versions": verified_versions,
            "history": history,
            "wall_time_s": round(time.perf_counter() - t0, 2),
        }
        if env.is_main:
            with store.atomic_dir(out_uri) as tmp:
                save_model(model, processor, tmp)
                (Path(tmp) / "samples.jsonl").write_bytes(samples_path.read_bytes())
            store.commit(out_uri, manifest)
        return manifest
    finally:
        teardown(env)
        shutil.rmtree(work, ignore_errors=True)


def _print_step(name: str, step: int, total: int, m: dict[str, float]) -> None:
    parts = [f"{name} step {step + 1}/{total}"]
    for key in ("reward/think", "reward/no_think", "length/think", "length/no_think",
                "rollouts/no_think_share", "probe/hard_math/think_rate", "probe/perception/think_rate",
                "probe/hard_math/p_think", "probe/perception/p_think",
                "clip_fraction", "is_ratio/max", "async/behind", "is_ratio/truncated_fraction", "time/step"):
        if key in m:
            parts.append(f"{key}={m[key]:.3g}")
    print("  ".join(parts), flush=True)
