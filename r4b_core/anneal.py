"""Bi-mode annealing: the SFT stage of R-4B, on mixed thinking and direct targets.

    r4b anneal --config configs/tiny.yaml                                   one process
    torchrun --nproc-per-node 2 -m r4b_core.cli anneal --config FILE         DDP (gloo on CPU, nccl on GPU)
    ... --set anneal.distributed.deepspeed=zero2                            DeepSpeed ZeRO-2 (or zero3)

    from r4b_core.anneal import run_anneal
    manifest = run_anneal(cfg, train_uri, base_model_uri, out_uri)

What it does (RECIPE.md "Bi-mode annealing"): every curated record becomes one sequence, the
prompt in the model's own chat format up to the assistant header (models/chat.ChatFormat: the
family's template with the record's images and question) followed by the record's bi-mode target
(`<think>\\n{reasoning}\\n</think>\\n\\n{answer}` or `<think>\\n\\n</think>\\n\\n{answer}`) and the
model's end-of-turn token. Prompt and target are tokenized separately and the ids concatenated, so
the forced prefixes of BPO and evaluation are exactly the ids seen here; every tensor the
processor returns travels with the sample (models/inputs.py), and positions come from the
model's rope index where it has one (M-RoPE). The loss covers the target and the closing end of
turn only. Sequences are packed into `pack_length` rows (training/packing.py); samples in a row
never see each other: attention runs per sample (boundaries from the samples' segments), after a
start-up check that this gives each sample's token losses as that sample alone, else through a
block mask, else one sample per row with the model's own mask (`anneal.attention`); the
manifest's `metrics.time_split_s` says where the step time went. The optimizer is AdamW with
separate LRs for vision tower / projector / LLM and a cosine schedule (training/optim.py;
`anneal.optim.freeze` leaves parts as they are). Under torchrun it is DDP, or DeepSpeed ZeRO-2/3
when `anneal.distributed.deepspeed` says so (a torch AdamW is passed in, so no DeepSpeed op is
compiled).

The story in `run_anneal`: skip if done → set up (data, model, optimizer, resume) → train (with
checkpoints) → save the model → mode-compliance check → manifest. Only rank 0 writes and logs.

Bad input never crashes the loop: unreadable lines, empty answers, missing images and records
longer than `pack_length` are counted (skipped or truncated per `anneal.overlong`) before training
starts, and reported in the manifest and the log.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from r4b_core import modes
from r4b_core.config import RunConfig
from r4b_core.errors import R4BError

STAGE = "anneal"
# Where a training step's time goes (metrics.time_split_s / time_split_cpu_s of the manifest).
PHASES = ("data", "forward", "backward", "optimizer", "other")


class AnnealError(R4BError):
    """The stage cannot run as configured; the message says why and what to change."""


# ---------------------------------------------------------------------------------------------
# Data: records -> tokenized samples, with an account of everything left out
# ---------------------------------------------------------------------------------------------
@dataclass
class DataReport:
    records: int = 0  # lines read
    bad_lines: int = 0  # not valid JSON / schema (other than an empty answer)
    empty_answers: int = 0
    missing_images: int = 0
    overlong_skipped: int = 0
    overlong_truncated: int = 0
    held_out: int = 0  # kept back for the compliance check
    used: int = 0
    think: int = 0
    direct: int = 0
    tokens: int = 0
    target_tokens: int = 0
    max_target_tokens: int = 0
    problems: list[str] = field(default_factory=list)  # the first few, one line each

    MAX_PROBLEMS = 20

    def note(self, message: str) -> None:
        if len(self.problems) < self.MAX_PROBLEMS:
            self.problems.append(message)

    @property
    def reasoning_ratio(self) -> float:
        return self.think / self.used if self.used else 0.0

    @property
    def skipped(self) -> int:
        return self.bad_lines + self.empty_answers + self.missing_images + self.overlong_skipped

    def as_dict(self) -> dict:
        d = asdict(self)
        d["reasoning_ratio"] = round(self.reasoning_ratio, 4)
        d["skipped"] = self.skipped
        return d


def read_records(store, train_uri: str, cache_dir: Path, report: DataReport, max_question_chars: int = 0):
    """Records of the curated JSONL; bad lines (questions over `max_question_chars` included) are
    counted and left out."""
    from r4b_core.data.schema import read_jsonl

    if not store.exists(train_uri):
        raise AnnealError(f"{train_uri}: training data not found; run `r4b curate` first or pass --train URI")
    local = Path(store.local_path(train_uri, cache_dir / "data"))
    result = read_jsonl(local, on_error="collect", max_question_chars=max_question_chars)
    for bad in result.bad:
        if bad.field == "answer":
            report.empty_answers += 1
        else:
            report.bad_lines += 1
        report.note(f"{train_uri}:{bad.line}: {bad.field}: {bad.message} (skipped)")
    report.records = len(result.records) + len(result.bad)
    return result.records


def load_images(record, train_uri: str, store) -> list:
    from r4b_core.data.images import load_image

    return [load_image(ref, train_uri, store) for ref in record.images]


def encode(record, images: list, model, processor, pack_length: int, overlong: str, chat=None):
    """One record -> `Sample` (prompt ids + target ids + end of turn), or a reason string to skip it.

    The prompt is the model's chat template for the question and its images up to the assistant
    header (`chat`, models/chat.ChatFormat; default: the processor's, with the model's end of
    turn); the processor expands the image placeholders and returns the media tensors, which the
    sample keeps (models/inputs.py). Positions come from the model's rope index where it has one
    (M-RoPE), over the whole sample.
    """
    import torch

    from r4b_core.models.inputs import extend_per_token, split_encoding
    from r4b_core.rollout.hf import encode_prompts, rope_positions
    from r4b_core.training.packing import IGNORE_INDEX, MODE_DIRECT, MODE_THINK, Sample

    from r4b_core.models.chat import ChatFormat

    chat = chat or ChatFormat.of(processor, model.generation_config)
    tok = processor.tokenizer
    prompt = chat.prompt(record.question, len(images), mode=None)
    prompt_ids, per_token, media = split_encoding(encode_prompts(processor, [prompt], [images]))
    target = record.sft_target()
    target_ids = tok(target, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(chat.end_of_turn)]
    truncated = False
    if len(prompt_ids) + len(target_ids) > pack_length:
        room = pack_length - len(prompt_ids)
        if overlong == "skip" or room < 1:
            return f"{len(prompt_ids) + len(target_ids)} tokens > anneal.pack_length {pack_length}"
        target_ids, truncated = target_ids[:room], True
    ids = prompt_ids + target_ids
    per_token = extend_per_token(per_token, len(target_ids))
    whole = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             **{k: v[None] for k, v in per_token.items()}, **media}
    positions = rope_positions(model, whole)
    mode = MODE_DIRECT if modes.target_mode(target) == modes.Mode.NO_THINK else MODE_THINK
    return Sample(
        input_ids=ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + target_ids,
        mode=mode,
        media=media,
        per_token=per_token,
        positions=positions[:, 0] if positions is not None else None,
        meta={"id": record.id, "truncated": truncated, "prompt_len": len(prompt_ids)},
    )


def prepare_data(cfg: RunConfig, store, train_uri: str, model, processor, cache_dir: Path):
    """(train samples, held-out (record, images) pairs for the compliance check, DataReport), for
    `model` (its chat format, end of turn and positions)."""
    from r4b_core.models.chat import ChatFormat

    a = cfg.anneal
    chat = ChatFormat.of(processor, model.generation_config)
    report = DataReport()
    records = read_records(store, train_uri, cache_dir, report, cfg.data.max_question_chars)
    held: list = []
    if a.compliance_samples and a.compliance_from == "holdout":
        order = list(range(len(records)))
        random.Random(cfg.seed).shuffle(order)
        n = min(a.compliance_samples, len(records) // 10)
        held_idx = set(order[:n])
        held = [records[i] for i in sorted(held_idx)]
        records = [r for i, r in enumerate(records) if i not in held_idx]
    samples = []
    for rec in records:
        try:
            images = load_images(rec, train_uri, store)
        except Exception as exc:  # missing file, unreadable image, storage error: skip the record
            report.missing_images += 1
            report.note(f"{train_uri}: record {rec.id}: image {rec.images}: {str(exc).splitlines()[0][:160]} (skipped)")
            continue
        item = encode(rec, images, model, processor, a.pack_length, a.overlong, chat)
        if isinstance(item, str):
            report.overlong_skipped += 1
            report.note(f"{train_uri}: record {rec.id}: {item} (skipped; anneal.overlong=truncate keeps it)")
            continue
        if item.meta["truncated"]:
            report.overlong_truncated += 1
            report.note(f"{train_uri}: record {rec.id}: target truncated to fit anneal.pack_length {a.pack_length}")
        item.index = len(samples)
        samples.append(item)
    from r4b_core.training.packing import MODE_THINK

    report.used = len(samples)
    report.think = sum(1 for s in samples if s.mode == MODE_THINK)
    report.direct = report.used - report.think
    report.tokens = sum(len(s) for s in samples)
    report.target_tokens = sum(s.n_target for s in samples)
    report.max_target_tokens = max((s.n_target for s in samples), default=0)
    compliance_items = []
    if a.compliance_samples:
        pool = held if a.compliance_from == "holdout" else records
        seen: set = set()
        # One prompt once: a question trained in both modes is still one prompt.
        pool = [r for r in pool if (r.question, tuple(r.images)) not in seen and not seen.add((r.question, tuple(r.images)))]
        for rec in pool[: a.compliance_samples]:
            try:
                compliance_items.append((rec, load_images(rec, train_uri, store)))
            except Exception:
                continue
        report.held_out = len(held)
    if not samples:
        raise AnnealError(f"{train_uri}: no usable training records ({report.skipped} skipped: "
                          f"{'; '.join(report.problems[:3])}); fix the data or anneal.pack_length")
    return samples, compliance_items, report


# ---------------------------------------------------------------------------------------------
# The row stream: a deterministic sequence of packed rows, epoch after epoch
# ---------------------------------------------------------------------------------------------
class RowStream:
    """Rows of sample indices in a fixed order for a given seed, so every rank (and a resumed run)
    computes the same stream and a cursor (epoch, offset) is the whole data position."""

    def __init__(self, lengths: list[int], pack_length: int, packing: bool, seed: int):
        self.lengths, self.pack_length, self.packing, self.seed = lengths, pack_length, packing, seed
        self._epochs: dict[int, list[list[int]]] = {}

    def epoch(self, e: int) -> list[list[int]]:
        if e not in self._epochs:
            from r4b_core.training.packing import pack_first_fit

            order = list(range(len(self.lengths)))
            random.Random(f"{self.seed}-{e}").shuffle(order)
            if self.packing:
                rows = pack_first_fit([self.lengths[i] for i in order], self.pack_length)
                self._epochs[e] = [[order[j] for j in row] for row in rows]
            else:
                self._epochs[e] = [[i] for i in order]
            self._epochs = {k: v for k, v in self._epochs.items() if k >= e - 1}  # keep memory flat
        return self._epochs[e]

    def take(self, cursor: tuple[int, int], n: int) -> tuple[list[list[int]], tuple[int, int]]:
        epoch, offset = cursor
        out: list[list[int]] = []
        while len(out) < n:
            rows = self.epoch(epoch)
            need = n - len(out)
            out.extend(rows[offset:offset + need])
            offset += need
            if offset >= len(rows):
                epoch, offset = epoch + 1, 0
        return out, (epoch, offset)


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------
def token_losses(model, batch: dict, device, dtype=None) -> tuple[Any, Any, Any]:
    """Cross entropy of the next-token targets, their mask, and their mode (THINK / DIRECT).

    With an `attention_mask` in the batch (the 4D block mask, or the 2-D padding mask of one sample
    per row): every position, shaped (B, L-1). Without one (varlen attention, training/packing.py)
    the rows are laid end to end as one sequence, which the segments (`varlen_kwargs`) cut into
    samples, and the LM head runs only where a target follows (`logits_to_keep`): the 1D results
    cover just those positions (mask all true). On the bi-mode mix that skips the head and softmax
    for ~60 % of the tokens (prompts, images, pads). Every other tensor of the batch (media,
    per-token) goes to the model; floating ones (pixels) take `dtype` (the compute dtype), else the
    mask's dtype (SDPA wants the two equal).
    """
    import torch
    import torch.nn.functional as F

    from r4b_core.training.packing import IGNORE_INDEX, varlen_kwargs

    inputs = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "token_mode", "segment_ids")}
    mask = inputs.get("attention_mask")
    float_dtype = dtype or (mask.dtype if mask is not None and mask.is_floating_point() else None)
    if float_dtype is not None:
        inputs = {k: v.to(float_dtype) if v.is_floating_point() and k != "attention_mask" else v
                  for k, v in inputs.items()}
    if mask is not None:
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        labels = batch["labels"][:, 1:].to(device)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                             ignore_index=IGNORE_INDEX, reduction="none").view(labels.shape)
        return ce, labels != IGNORE_INDEX, batch["token_mode"][:, 1:].to(device)
    shape = batch["input_ids"].shape
    for k, v in inputs.items():       # token-aligned tensors: one row; media stay as they are
        if k == "position_ids" and v.ndim == 3:
            inputs[k] = v.reshape(v.shape[0], 1, -1)
        elif tuple(v.shape) == tuple(shape):
            inputs[k] = v.reshape(1, -1)
    inputs.update({k: v.to(device) if torch.is_tensor(v) else v
                   for k, v in varlen_kwargs(batch["segment_ids"]).items()})
    labels = batch["labels"].reshape(-1)
    # Logit p predicts token p + 1; a row's first token is a prompt token, so p + 1 never crosses rows.
    keep = (labels[1:] != IGNORE_INDEX).nonzero().flatten()
    logits = model(**inputs, use_cache=False, logits_to_keep=keep.to(device)).logits[0].float()
    targets = labels[keep + 1].to(device)
    ce = F.cross_entropy(logits, targets, reduction="none")
    return ce, torch.ones_like(targets, dtype=torch.bool), batch["token_mode"].reshape(-1)[keep + 1].to(device)


# ---------------------------------------------------------------------------------------------
# Identity: what must match for a skip (manifest) or a resume (checkpoint)
# ---------------------------------------------------------------------------------------------
def identity(cfg: RunConfig, store, train_uri: str, base_model_uri: str) -> dict:
    """identity.stage_identity of the anneal section and its inputs: the training data's lineage
    (None when the file is missing: never skipped) and the base model's (a folder without
    manifest is known by its URI)."""
    from r4b_core.identity import data_lineage, model_lineage, stage_identity

    return stage_identity(cfg, STAGE, {
        "train": train_uri, "train_data": data_lineage(store, train_uri) if store.exists(train_uri) else None,
        "base_model": base_model_uri, "base_weights": model_lineage(store, base_model_uri) or "no manifest"})


# ---------------------------------------------------------------------------------------------
# Mode compliance: do forced think / no-think prefixes give well-formed outputs?
# ---------------------------------------------------------------------------------------------
def well_formed(text: str, finished: bool, mode: modes.Mode) -> bool:
    """think: a non-empty reasoning block closed by </think>, then an answer, then the end of turn.
    no_think: an answer then the end of turn, with no second think block."""
    if not finished:
        return False
    parsed = modes.parse_response(text, mode)
    if mode == modes.Mode.THINK:
        return parsed.closed and bool(parsed.reasoning) and bool(parsed.answer)
    return bool(parsed.answer) and modes.THINK_OPEN not in text and modes.THINK_CLOSE not in text


def mode_compliance(model, processor, items: list, max_new_tokens: int, batch_size: int = 16) -> dict:
    """Greedy-decode every (record, images) item under forced think and no-think prefixes, with
    the in-process rollout engine (the model's chat format, end of turn and positions)."""
    from r4b_core.rollout.base import GenerationRequest
    from r4b_core.rollout.hf import HFEngine

    engine = HFEngine(model, processor, max_batch_size=batch_size)
    tok = engine.tokenizer
    out: dict[str, Any] = {}
    examples: dict[str, str] = {}
    failures: dict[str, list[str]] = {}
    for mode in (modes.Mode.THINK, modes.Mode.NO_THINK):
        requests = [GenerationRequest(prompt=engine.chat.prompt(r.question, len(imgs), mode), images=imgs, mode=mode,
                                      max_new_tokens=max_new_tokens, temperature=0.0, key=r.id) for r, imgs in items]
        good = 0
        for c in engine.generate(requests):
            finished = c.finish_reason == "stop"
            # the think tags survive (some tokenizers count them as special)
            text = tok.decode(c.token_ids[:-1] if finished else c.token_ids, skip_special_tokens=False)
            ok = well_formed(text, finished, mode)
            good += ok
            if not ok and len(failures.setdefault(mode.value, [])) < 3:
                failures[mode.value].append(text[:200])
            examples.setdefault(mode.value, text[:200])
        out[mode.value] = good / len(items) if items else 0.0
    out["overall"] = (out.get("think", 0.0) + out.get("no_think", 0.0)) / 2
    out["samples"] = len(items)
    out["example"] = examples
    out["failures"] = failures
    return out


# ---------------------------------------------------------------------------------------------
# Attention and timing
# ---------------------------------------------------------------------------------------------
def choose_attention(model, samples: list, pad_id: int, pack_length: int, device,
                     dtype=None, allow_varlen: bool = True) -> tuple[str, str | None, str]:
    """How packed samples are kept apart (training/packing.py): the first of the varlen attentions
    (the flash-attention varlen kernel where installed on CUDA, then per-sample SDPA; unless
    `allow_varlen` is False), the 4D block mask, and plain padding (one sample per row, the
    model's own mask) that gives every sample's token losses as that sample alone through the
    model's own forward, on real packed rows. Models whose attention is more than causal within a
    sample (Gemma3's image tokens attend both ways; sliding windows) end at plain padding.
    Returns (collate's `attention`, the varlen implementation or None, a line saying which and
    why). `dtype`: the compute dtype under autocast (bf16 on GPU; flash-attention runs in nothing
    wider), the reference computed under the same autocast."""
    import torch

    from r4b_core.training.packing import VARLEN, collate, use_segment_attention, varlen_attentions

    # Two rows, the first holding two samples (the case that must not leak), images included when
    # the data has any; the second row checks that rows laid end to end stay apart too.
    pool = [s for s in samples if s.has_images] + [s for s in samples if not s.has_images]
    rows = next(([[x, y], [z]] for x, y, z in zip(pool, pool[1:], pool[2:]) if len(x) + len(y) <= pack_length),
                [[s] for s in pool[:2]])
    where = f"{sum(len(r) for r in rows)} samples in {len(rows)} rows"
    half = dtype is not None and dtype != torch.float32
    amp = (torch.autocast(torch.device(device).type, dtype=dtype) if half else contextlib.nullcontext())
    # fp32 paths agree to rounding (~5e-7 on the tiny families); a path that changes the attention
    # (Gemma3's images attend both ways, not causally) misses by 6e-5 and more even on a random
    # model; bf16 paths agree to its 8-bit mantissa
    tolerance = 3e-2 if half else 1e-5
    candidates = [("varlen", impl) for impl in (varlen_attentions(device) if allow_varlen else [])] + [("block", None)]
    names = {"block": "4D block mask"}
    was_training = model.training
    model.eval()  # no dropout: the paths must see the same computation
    refused = []
    try:
        with torch.no_grad(), amp:
            use_segment_attention(model, False)
            alone = []
            for row in rows:
                for s in row:
                    ce, mask, _ = token_losses(model, collate([[s]], pad_id, attention="padding"), device, dtype)
                    alone.append(ce[mask])
            ref = torch.cat(alone).float()
            for attention, impl in candidates:
                name = VARLEN[impl] if impl else names[attention]
                try:
                    use_segment_attention(model, impl or False)
                    ce, mask, _ = token_losses(model, collate(rows, pad_id, mask_dtype=dtype or torch.float32,
                                                              attention=attention), device, dtype)
                    diff = float((ref - ce[mask].float()).abs().max())
                except Exception as exc:  # no varlen arguments in the family's attention, a sliding window, ...
                    refused.append(f"{impl or attention} failed: {str(exc).splitlines()[0][:120]}")
                    continue
                if diff <= tolerance:
                    return attention, impl, (f"attention: {name} (token losses within {diff:.1e} of each sample "
                                             f"alone on {where})" + (f"; {'; '.join(refused)}" if refused else ""))
                refused.append(f"{name}'s token losses differ from each sample alone by {diff:.1e} on {where}")
    finally:
        model.train(was_training)
    use_segment_attention(model, False)
    return "padding", None, f"attention: one sample per row, the model's own mask ({'; '.join(refused)})"


class _PhaseClock:
    """Seconds spent per training phase (PHASES), wall and CPU. On CUDA each lap synchronizes, so
    the split is of device work, not of kernel launches."""

    def __init__(self, sync=None):
        self.sync = sync
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self.mark()

    def mark(self) -> None:
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, phase: str) -> None:
        if self.sync is not None:
            self.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[phase] += wall - self._wall
        self.cpu[phase] += cpu - self._cpu
        self._wall, self._cpu = wall, cpu

    @staticmethod
    def rounded(split: dict) -> dict:
        return {k: round(v, 3) for k, v in split.items()}


# ---------------------------------------------------------------------------------------------
# One training step
# ---------------------------------------------------------------------------------------------
@dataclass
class StepTotals:
    """What a step's micro-batches add up to, on this rank (summed over ranks before use)."""

    ce_think: float = 0.0  # summed cross entropy of thinking-target tokens
    n_think: float = 0.0  # thinking-target tokens
    ce_direct: float = 0.0
    n_direct: float = 0.0
    real_tokens: float = 0.0  # tokens fed to the model, pads excluded
    slots: float = 0.0  # token positions, pads included

    def add(self, ce, mask, token_mode, batch_token_mode) -> None:
        from r4b_core.training.packing import MODE_DIRECT, MODE_THINK

        think, direct = mask & (token_mode == MODE_THINK), mask & (token_mode == MODE_DIRECT)
        self.ce_think += float((ce * think).sum())
        self.n_think += float(think.sum())
        self.ce_direct += float((ce * direct).sum())
        self.n_direct += float(direct.sum())
        self.real_tokens += float((batch_token_mode >= 0).sum())
        self.slots += batch_token_mode.numel()

    def all_reduced(self, env) -> StepTotals:
        from dataclasses import astuple

        from r4b_core.training.distributed import all_reduce_sum

        return StepTotals(*all_reduce_sum(list(astuple(self)), env))


@dataclass
class AnnealTrainer:
    """What a step works with. Plain fields; the control flow lives in `anneal_step`."""

    model: Any  # the bare module
    forward_model: Any  # what the forward runs through: the DDP or DeepSpeed wrapper, else `model`
    optimizer: Any  # torch AdamW (DeepSpeed steps it through `ds_engine`)
    scheduler: Any
    samples: list  # every training Sample; rows hold their indices
    cfg: Any  # AnnealConfig
    env: Any  # training/distributed.DistEnv
    pad_id: int
    device: Any
    compute_dtype: Any  # of the additive mask and the pixels (SDPA wants them equal)
    amp: Any  # bf16 autocast on CUDA without DeepSpeed, else a null context
    attention: str  # how packed samples are kept apart: collate's "varlen", "block" or "padding"
    varlen: str | None  # the varlen attention in use (training/packing.py VARLEN); None unless "varlen"
    clock: _PhaseClock
    ddp: Any = None  # DistributedDataParallel around `model` (plain data parallelism)
    ds_engine: Any = None  # DeepSpeed engine around `model`

    @property
    def segments(self) -> bool:
        """Samples kept apart by their segments (a varlen attention), not by a mask."""
        return self.attention == "varlen"


def freeze_unused_parameters(model, sample, pad_id: int, device) -> list[str]:
    """A dry step on one real sample: fails early on a data/model mismatch (image tokens vs
    features), and finds parameters the forward never uses (e.g. the vision tower's post-layernorm,
    skipped by LLaVA's feature layer); freezing them keeps DDP and ZeRO from waiting for gradients
    that never come. Returns their names."""
    from r4b_core.training.packing import collate

    ce, mask, _ = token_losses(model, collate([[sample]], pad_id, attention="padding"), device)
    (ce * mask).sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in model.named_parameters():
        p.grad = None
        if n in unused:
            p.requires_grad_(False)
    return unused


def setup_trainer(a, model, samples: list, pad_id: int, env, console) -> tuple[AnnealTrainer, Any]:
    """The model on its device, frozen where it gets no gradient, its attention path chosen, the
    optimizer and schedule, and the DDP or DeepSpeed wrapper. Returns (the step's AnnealTrainer,
    the checkpoint's training/checkpoint.Trainee)."""
    import torch

    from r4b_core.training import checkpoint as ckpt
    from r4b_core.training.optim import cosine_scheduler, freeze_components, param_groups

    device = env.device
    cuda = device.type == "cuda"
    use_bf16 = cuda and torch.cuda.is_bf16_supported()
    use_ds = a.distributed.deepspeed != "none"
    model.to(device)
    if a.optim.freeze:
        frozen = freeze_components(model, a.optim.freeze)
        console.print(f"model: {', '.join(a.optim.freeze)} frozen (anneal.optim.freeze): {frozen} parameter tensors")
    unused = freeze_unused_parameters(model, next((s for s in samples if s.has_images), samples[0]), pad_id, device)
    if unused:
        console.print(f"model: {len(unused)} parameter tensors get no gradient and stay frozen: "
                      f"{', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}")
    # The additive mask and pixels follow the attention dtype (SDPA wants them equal).
    compute_dtype = torch.bfloat16 if use_bf16 else torch.float32
    # Segment attention before any wrapper (DDP, DeepSpeed): it is a setting of the model.
    attention, varlen, line = "block", None, "attention: 4D block mask (anneal.attention=mask)"
    if a.attention == "auto":
        attention, varlen, line = choose_attention(model, samples, pad_id, a.pack_length, device, compute_dtype)
    console.print(line)
    optimizer = torch.optim.AdamW(param_groups(model, a.optim), betas=tuple(a.optim.betas),
                                  weight_decay=a.optim.weight_decay)
    scheduler = cosine_scheduler(optimizer, a.steps, a.optim.warmup_steps)
    engine = ddp = None
    if use_ds:
        from r4b_core.training.zero import deepspeed_engine

        zero_stage = 2 if a.distributed.deepspeed == "zero2" else 3
        engine, ds_optimizer = deepspeed_engine(model, optimizer, stage=zero_stage, grad_accum=a.grad_accum,
                                                grad_clip=a.optim.grad_clip, use_bf16=use_bf16)
        trainee = ckpt.Trainee(model=engine.module, optimizer=ds_optimizer, scheduler=scheduler, engine=engine)
    else:
        if env.initialized:
            from torch.nn.parallel import DistributedDataParallel

            # A micro-batch without any image leaves the vision tower without gradients.
            ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None,
                                          find_unused_parameters=any(not s.has_images for s in samples))
        trainee = ckpt.Trainee(model=model, optimizer=optimizer, scheduler=scheduler)
    trainer = AnnealTrainer(
        model=model, forward_model=engine or ddp or model, optimizer=optimizer, scheduler=scheduler,
        samples=samples, cfg=a, env=env, pad_id=pad_id, device=device, compute_dtype=compute_dtype,
        amp=torch.autocast("cuda", dtype=torch.bfloat16) if (use_bf16 and not use_ds) else contextlib.nullcontext(),
        attention=attention, varlen=varlen, clock=_PhaseClock(torch.cuda.synchronize if cuda else None), ddp=ddp, ds_engine=engine)
    return trainer, trainee


def resume_from_checkpoint(store, ckpt_root: str, trainee, a, ident: dict, config_hash: str, env, console,
           cache_dir: Path) -> tuple[int, tuple[int, int], list, int | None]:
    """Load the newest checkpoint under `ckpt_root` that reads, if any: (step, data cursor, loss
    history, step resumed from). Damaged ones are set aside (checkpoint.resume); one written under
    another identity is refused with the differing values, or taken anyway with `anneal.resume: force`."""
    from r4b_core.training import checkpoint as ckpt

    def same_config(uri: str, saved: dict) -> None:
        if saved.get("config_hash") != config_hash:
            diff = ckpt.config_diff(saved.get("identity", {}), ident)
            msg = f"checkpoint {uri} was written under a different config: " + "; ".join(diff[:8])
            if a.resume != "force":
                raise AnnealError(msg + ". Set the values back, delete the checkpoints folder to start "
                                  "fresh, or resume anyway with --set anneal.resume=force")
            console.print(f"warning: {msg}; resuming anyway (anneal.resume=force), the current config wins")

    found = ckpt.resume(store, ckpt_root, trainee, env, cache_dir, accept=same_config, say=console.print)
    if found is None:
        return 0, (0, 0), [], None
    uri, state = found
    console.print(f"resumed from {uri} (step {state['step']})")
    return state["step"], tuple(state["cursor"]), state.get("history", []), state["step"]


def anneal_step(tr: AnnealTrainer, rows: list[list[int]]) -> tuple[dict[str, float], StepTotals]:
    """One optimizer step on the global batch `rows` (this rank trains its share): forward and
    backward per micro-batch -> clip -> update. The loss is the token mean over the whole global
    step. Returns the step's metrics and its totals over all ranks."""
    import torch

    from r4b_core.training.optim import lr_by_group
    from r4b_core.training.packing import collate

    a, env, clock, engine = tr.cfg, tr.env, tr.clock, tr.ds_engine
    t0 = time.time()
    per_rank = a.grad_accum * a.micro_batch_size
    mine = rows[env.rank * per_rank:(env.rank + 1) * per_rank]
    # Token-mean over the whole global step: every rank knows every row, so no all-reduce.
    n_global = sum(tr.samples[i].n_target for row in rows for i in row)
    scale = env.world_size * (a.grad_accum if engine is not None else 1) / max(1, n_global)
    row_length = a.pack_length if a.pad_to == "pack_length" else None
    # Packed rows under segment attention need no pads at all: the micro-batch's samples run end
    # to end as one sequence (their segments keep them apart), as first-fit grouped them. Under the
    # model's own mask (attention "padding") every sample is a row of its own.
    padding_free = a.packing and tr.segments and row_length is None
    totals = StepTotals()
    for m in range(a.grad_accum):
        micro = [[tr.samples[i] for i in row] for row in mine[m * a.micro_batch_size:(m + 1) * a.micro_batch_size]]
        if padding_free:
            micro = [[s for row in micro for s in row]]
        elif tr.attention == "padding":
            micro = [[s] for row in micro for s in row]
        batch = collate(micro, tr.pad_id, length=row_length, mask_dtype=tr.compute_dtype, attention=tr.attention)
        clock.lap("data")
        last = m == a.grad_accum - 1
        sync = contextlib.nullcontext() if (tr.ddp is None or last) else tr.ddp.no_sync()
        with sync:
            with tr.amp:
                ce, mask, token_mode = token_losses(tr.forward_model, batch, tr.device, tr.compute_dtype)
            loss = (ce * mask).sum() * scale
            clock.lap("forward")
            if engine is not None:
                engine.backward(loss)
                clock.lap("backward")
                engine.step()
                clock.lap("optimizer")
            else:
                loss.backward()
                clock.lap("backward")
        with torch.no_grad():
            totals.add(ce, mask, token_mode, batch["token_mode"])
        clock.lap("other")
    if engine is not None:
        grad_norm = float(engine.get_global_grad_norm() or 0.0)
    else:
        params = [p for p in tr.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, a.optim.grad_clip))
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
    lrs = lr_by_group(tr.optimizer)
    tr.scheduler.step()
    clock.lap("optimizer")
    t = totals.all_reduced(env)
    dt = time.time() - t0
    metrics = {"loss": (t.ce_think + t.ce_direct) / max(1.0, t.n_think + t.n_direct),
               "loss_think": t.ce_think / t.n_think if t.n_think else float("nan"),
               "loss_direct": t.ce_direct / t.n_direct if t.n_direct else float("nan"), "grad_norm": grad_norm,
               "tokens_per_s": t.real_tokens / dt, "padding_waste": 1.0 - t.real_tokens / max(1.0, t.slots),
               **{f"lr_{k}": v for k, v in lrs.items()}}
    return metrics, t


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------
class _Console:
    """Rank-0 console: plain lines always, and a rich progress bar with ETA on a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None
        if enabled:
            from rich.console import Console

            self.console = Console(highlight=False)

    def start(self, total: int, done: int) -> None:
        if not (self.enabled and self.console.is_terminal):
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(TextColumn("anneal"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=self.console)
        self.task = self.progress.add_task("anneal", total=total, completed=done, info="")
        self.progress.start()

    def print(self, msg: str) -> None:
        if self.enabled:
            self.console.print(msg, markup=False, soft_wrap=True)

    def advance(self, info: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, info=info)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _git_version() -> str:
    import r4b_core

    return r4b_core.__version__


def run_anneal(cfg: RunConfig, train_uri: str | None = None, base_model_uri: str | None = None,
               out_uri: str | None = None, tracker=None) -> dict:
    """Train the bi-mode model; returns the manifest written next to the model at `out_uri`.

    URIs default to the run layout (layout.py): curated data, base model, `<run>/anneal/model`.
    Skips in seconds when `out_uri` already holds a manifest with the same config hash.
    """
    import torch

    from r4b_core import layout
    from r4b_core.identity import identity_hash
    from r4b_core.storage import Store
    from r4b_core.training import checkpoint as ckpt
    from r4b_core.training.distributed import barrier, init_distributed, teardown
    from r4b_core.training.packing import use_segment_attention

    a = cfg.anneal
    store = Store.from_config(cfg.storage)
    train_uri = train_uri or layout.curated_uri(cfg)
    base_model_uri = base_model_uri or layout.base_model_dir(cfg)
    out_uri = out_uri or layout.model_dir(cfg, STAGE)
    ckpt_root = layout.checkpoints_dir(out_uri)
    ident = identity(cfg, store, train_uri, base_model_uri)
    config_hash = identity_hash(ident)

    # ---- skip: a finished run with the same identity ------------------------------------------
    if config_hash is not None and store.is_complete(out_uri, config_hash):
        manifest = store.read_manifest(out_uri)
        manifest["skipped"] = True
        return manifest

    if not store.exists(train_uri):  # before minutes of model loading
        raise AnnealError(f"{train_uri}: training data not found; run `r4b curate` first or pass --train URI")
    use_ds = a.distributed.deepspeed != "none"
    env = init_distributed(a.distributed.backend, force=use_ds)
    cache_dir = Path(tempfile.mkdtemp(prefix=f"r4b-anneal-r{env.rank}-"))
    console = _Console(env.is_main)
    t_start = time.time()
    tracking = tracker if env.is_main else None
    stage_run = tracking.stage(STAGE) if tracking is not None else contextlib.nullcontext()
    try:
        with stage_run:
            # ---- setup: model, data, optimizer ----------------------------------------------------
            from r4b_core.models.loading import load_model, save_model

            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            model, processor = load_model(base_model_uri, cfg.model, store=store, dtype=torch.float32)
            model.train()
            samples, compliance_items, report = prepare_data(cfg, store, train_uri, model, processor, cache_dir)
            for line in report.problems:
                console.print(f"data: {line}")
            console.print(f"data: {report.used} samples ({report.think} think / {report.direct} direct, "
                          f"reasoning ratio {report.reasoning_ratio:.2f}), {report.skipped} skipped, "
                          f"{report.overlong_truncated} truncated, {report.held_out} held out; "
                          f"{report.tokens} tokens, {report.target_tokens} target tokens")
            trainer, trainee = setup_trainer(a, model, samples, processor.tokenizer.pad_token_id, env, console)
            stream = RowStream([len(s) for s in samples], a.pack_length, a.packing, cfg.seed)
            rows_per_step = env.world_size * a.grad_accum * a.micro_batch_size
            step, cursor, history, resumed_from = resume_from_checkpoint(store, ckpt_root, trainee, a, ident,
                                                                         config_hash, env, console, cache_dir)

            # ---- train ----------------------------------------------------------------------------
            if tracking is not None:
                tracking.log_params({"anneal": a.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json"),
                                     "seed": cfg.seed, "world_size": env.world_size, "train_uri": train_uri,
                                     "base_model_uri": base_model_uri, "config_hash": config_hash,
                                     "data": {k: v for k, v in report.as_dict().items() if k != "problems"}})
                tracking.log_dict(cfg.model_dump(mode="json"), "config/resolved.json")
            console.start(a.steps, step)
            clock = trainer.clock
            t_train, cpu_train = time.time(), time.process_time()
            steps_this_run = 0
            tokens_this_run = slots_this_run = 0
            while step < a.steps:
                clock.mark()
                rows, cursor = stream.take(cursor, rows_per_step)
                metrics, totals = anneal_step(trainer, rows)
                step += 1
                steps_this_run += 1
                tokens_this_run += totals.real_tokens
                slots_this_run += totals.slots
                # None (not NaN: manifests are strict JSON) for a mode absent from this step
                history.append({"step": step, **{k: None if math.isnan(metrics[k]) else round(metrics[k], 6)
                                                 for k in ("loss", "loss_think", "loss_direct")}})
                console.advance(f"loss {metrics['loss']:.4f}")
                if step % a.log_every == 0 or step == a.steps or step == 1:
                    console.print(f"step {step}/{a.steps} loss {metrics['loss']:.4f} think {metrics['loss_think']:.4f} "
                                  f"direct {metrics['loss_direct']:.4f} lr {metrics.get('lr_llm', 0):.2e} "
                                  f"tok/s {metrics['tokens_per_s']:.0f} waste {metrics['padding_waste']:.3f}")
                    if tracking is not None:
                        tracking.log_metrics({k: v for k, v in metrics.items() if not math.isnan(v)}, step=step)
                if step % a.checkpoint_every == 0 and step < a.steps:
                    uri = ckpt.save(store, ckpt_root, step, trainee, env,
                                    {"cursor": list(cursor), "config_hash": config_hash, "identity": ident,
                                     "history": history})
                    if env.is_main:
                        pruned = ckpt.prune(store, ckpt_root, a.keep_checkpoints)
                        console.print(f"checkpoint {uri}" + (f" (pruned {len(pruned)})" if pruned else ""))
                clock.lap("other")  # metrics, logging, checkpoints
            console.close()
            train_s, train_cpu_s = time.time() - t_train, time.process_time() - cpu_train
            use_segment_attention(trainee.model, False)  # the saved model and the compliance check use the default
            console.print("time split (s): " + ", ".join(f"{k} {v:.2f}" for k, v in clock.wall.items()))

            # ---- save, check, commit --------------------------------------------------------------
            manifest = None
            gather = contextlib.nullcontext()
            if trainee.zero_stage == 3:
                import deepspeed

                gather = deepspeed.zero.GatheredParameters(list(trainee.model.parameters()), modifier_rank=None)
            with gather:
                if env.is_main:
                    final = trainee.model
                    final.eval()
                    # An earlier output and its manifest stay until this block succeeds; then the new
                    # folder (no manifest yet) replaces them in one step, and the commit below follows.
                    with store.atomic_dir(out_uri) as staging:
                        save_model(final, processor, staging)
                        compliance = {}
                        if compliance_items:
                            reloaded, rproc = load_model(staging, cfg.model, dtype=torch.float32)
                            reloaded.to(env.device)
                            max_new = report.max_target_tokens + 8
                            compliance = mode_compliance(reloaded, rproc, compliance_items, max_new)
                            console.print(f"mode compliance: think {compliance['think']:.3f} no_think "
                                          f"{compliance['no_think']:.3f} over {compliance['samples']} prompts")
                            del reloaded
                    last_k = history[-max(1, min(10, len(history))):]
                    final_metrics = {  # means over the last 10 steps
                        "loss": _mean([h["loss"] for h in last_k]),
                        "loss_think": _mean([h["loss_think"] for h in last_k]),
                        "loss_direct": _mean([h["loss_direct"] for h in last_k]),
                        "compliance_think": compliance.get("think"),
                        "compliance_no_think": compliance.get("no_think"),
                        "train_s": round(train_s, 2),
                        "train_cpu_s": round(train_cpu_s, 2),  # rank 0's CPU time (wall time lies under load)
                        # effective (non-pad) tokens per second of this invocation, all ranks
                        "tokens_per_s": round(tokens_this_run / train_s, 1) if train_s > 0 else None,
                        "padding_waste": round(1 - tokens_this_run / slots_this_run, 4) if slots_this_run else None,
                        # where rank 0's training time went, per phase (PHASES), this invocation
                        "time_split_s": _PhaseClock.rounded(clock.wall),
                        "time_split_cpu_s": _PhaseClock.rounded(clock.cpu),
                        "segment_attention": trainer.segments,
                        "attention": trainer.varlen or {"block": "mask"}.get(trainer.attention, trainer.attention),
                    }
                    manifest = {
                        "stage": STAGE,
                        "config_hash": config_hash,
                        "code_version": _git_version(),
                        "inputs": {"train": train_uri, "base_model": base_model_uri},
                        "outputs": {"model": out_uri, "checkpoints": ckpt_root},
                        "steps": a.steps,
                        "steps_this_run": steps_this_run,
                        "resumed_from_step": resumed_from,
                        "world_size": env.world_size,
                        "deepspeed": a.distributed.deepspeed,
                        "packing": a.packing,
                        "data": report.as_dict(),
                        "metrics": final_metrics,
                        "compliance": compliance,
                        "loss_curve": history,
                        "wall_time_s": round(time.time() - t_start, 2),
                    }
                    store.commit(out_uri, manifest)
                    if tracking is not None:
                        tracking.log_metrics({f"final/{k}": v for k, v in final_metrics.items()
                                              if isinstance(v, (int, float)) and not isinstance(v, bool)}
                                             | {f"final/time_{k}_s": v for k, v in clock.wall.items()}, step=step)
                        tracking.log_dict(compliance, "compliance.json")
                    def fmt(key: str) -> str:  # a mode absent from the data has no loss
                        value = final_metrics.get(key)
                        return "-" if value is None else f"{value:.4f}"

                    console.print(f"anneal done: {out_uri} (loss {fmt('loss')}, think {fmt('loss_think')}, "
                                  f"direct {fmt('loss_direct')}, {train_s:.1f}s training)")
            barrier(env)
            return ckpt.agree(manifest, env)
    finally:
        console.close()
        shutil.rmtree(cache_dir, ignore_errors=True)
        teardown(env)


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return round(sum(xs) / len(xs), 6) if xs else None
