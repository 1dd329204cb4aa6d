"""Seconds per optimizer step: our BPO step (in-process HF engine) vs TRL's GRPOTrainer (use_vllm=False).

    .venv/bin/python bench/bpo_vs_trl.py [--steps 6 --warmup 2 --prompts 4 --group 4 --max-new 32 --rounds 2]

Same tiny VLM (random init, the project's LLaVA-style toy), same synthetic visual-math prompts with
their images, same rollouts per prompt (TRL num_generations = our 2g), same maximum completion
length for every rollout (our think and no-think budgets both set to TRL's max_completion_length),
same temperature, one optimizer step per rollout batch (TRL: num_iterations 1, gradient
accumulation 1; ours: ppo_epochs 1), no reference model (beta 0), the same reward scorer, the same
torch thread count, both in this one process. A step is everything: generation, reward, loss,
backward, optimizer step (and for us the engine sync, a no-op in-process). Warm-up steps are
excluded. TRL's loss is its default (dapo: token-level, normalised over the batch) as ours
(token_mean PPO-clip); TRL's activation checkpointing (its default) is turned off, as ours.
Zero-variance groups are trained on both sides (our default drops them, which TRL does not do;
`--drop-zero-variance` shows that too).

Both sides use AdamW with the fused kernel (TRL's default `adamw_torch_fused`; ours through
`bpo.make_optimizer`, as the stage). The sides run in `--rounds` rounds that alternate which goes
first, so drifting load on a shared machine hits both. Prints the per-round and pooled per-step
figures of each side (wall and CPU seconds), our step-time split, and ends with
`bpo_vs_trl ratio=X` (mean ours / mean TRL over all timed steps; goal <= 0.5).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common                      # the offline environment, this checkout, the toy model

os.environ.setdefault("WANDB_DISABLED", "true")


def build(tmp: Path, n_prompts: int):
    model_dir, records, path = common.tiny_model_and_split(tmp, "rl", max(n_prompts, 64))
    return model_dir, records, common.images_of(records, path)


def time_ours(model_dir: Path, records, images, a) -> tuple[list[float], list[float], list[dict]]:
    from r4b_core import bpo
    from r4b_core.config import RunConfig
    from r4b_core.models.loading import load_model
    from r4b_core.rewards import RewardScorer
    from r4b_core.rollout.hf import HFEngine

    cfg = RunConfig.model_validate({"bpo": {
        "algorithm": a.algorithm, "prompts_per_step": a.prompts, "group_size": a.group, "temperature": 1.0,
        "max_new_tokens_think": a.max_new, "max_new_tokens_no_think": a.max_new, "micro_batch_size": a.micro_batch,
        "kl_beta": 0.0, "ppo_epochs": 1, "drop_zero_variance": a.drop_zero_variance,
        "optim": {"lr": 1e-6, "min_lr": 1e-6, "vision_lr": None, "projector_lr": None, "warmup_steps": 0}}})
    model, processor = load_model(str(model_dir))
    model.eval()
    prompts = [bpo.Prompt(r, im) for r, im in zip(records, images)]
    opt = bpo.make_optimizer(model, cfg.bpo)                # the stage's own optimizer
    walls, cpus, splits = [], [], []
    with RewardScorer() as scorer:
        engine = HFEngine(model, processor)
        tr = bpo.Trainer(model, None, opt, None, engine, scorer, bpo.PromptEncoder(processor), cfg)
        stream = bpo.PromptStream(prompts, seed=0)
        for step in range(a.warmup + a.steps):
            w, c = time.perf_counter(), time.process_time()
            result = bpo.bpo_step(tr, stream.take(step * a.prompts, a.prompts), step)
            w, c = time.perf_counter() - w, time.process_time() - c
            if step >= a.warmup:
                walls.append(w)
                cpus.append(c)
                splits.append({k: v for k, v in result.metrics.items() if k.startswith(("time/", "length/"))})
    return walls, cpus, splits


def time_trl(model_dir: Path, records, images, a, out_dir: Path) -> tuple[list[float], list[float], dict]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from r4b_core.models.loading import load_model
    from r4b_core.modes import Mode
    from r4b_core.rewards import RewardScorer

    model, processor = load_model(str(model_dir))
    n = (a.warmup + a.steps) * a.prompts
    rows = [{"prompt": [{"role": "user", "content": r.question}], "image": im[0], "answer": r.answer,
             "answer_type": r.answer_type} for r, im in zip(records, images)]
    rows = (rows * (n // len(rows) + 1))[:n]
    data = Dataset.from_list(rows)
    scorer = RewardScorer()

    def accuracy(completions, answer, answer_type, **_):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return scorer.score(texts, list(answer), answer_types=list(answer_type), prefix_modes=[Mode.AUTO] * len(texts))

    marks: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, args, state, control, **kw):
            marks.append((time.perf_counter(), time.process_time()))

    rollouts = 2 * a.group
    args = GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=a.prompts * rollouts, gradient_accumulation_steps=1,
        num_generations=rollouts, max_completion_length=a.max_new, temperature=1.0, num_iterations=1, beta=0.0,
        learning_rate=1e-6, max_steps=a.warmup + a.steps, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, bf16=False, dataloader_num_workers=0, use_vllm=False, seed=0, shuffle_dataset=False,
        disable_tqdm=True, log_completions=False,
        # TRL defaults to activation checkpointing (recomputes the forward in backward); we do not
        # checkpoint, so neither does TRL here: like for like
        gradient_checkpointing=False)
    trainer = GRPOTrainer(model=model, reward_funcs=accuracy, args=args, train_dataset=data,
                          processing_class=processor, callbacks=[Clock()])
    try:
        trainer.train()
    finally:
        scorer.close()
    opt = trainer.optimizer
    opt = getattr(opt, "optimizer", opt)
    print(f"TRL optimizer: {type(opt).__name__} (fused={opt.defaults.get('fused')}, "
          f"foreach={opt.defaults.get('foreach')})")
    spans = [(marks[i + 1][0] - marks[i][0], marks[i + 1][1] - marks[i][1]) for i in range(0, len(marks) - 1, 2)]
    spans = spans[a.warmup:]
    lengths = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
    return [s[0] for s in spans], [s[1] for s in spans], {"mean_completion_length": statistics.mean(lengths[a.warmup:])
                                                          if len(lengths) > a.warmup else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--prompts", type=int, default=4, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="g: rollouts per mode (TRL num_generations = 2g)")
    p.add_argument("--max-new", type=int, default=32, help="max new tokens of every rollout")
    p.add_argument("--micro-batch", type=int, default=32, help="our trainer micro-batch")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    p.add_argument("--rounds", type=int, default=2, help="TRL/ours rounds, alternating which goes first")
    p.add_argument("--algorithm", default="bpo", choices=["bpo", "grpo"], help="our side's algorithm")
    p.add_argument("--drop-zero-variance", action="store_true",
                   help="our default: skip groups whose rewards are all equal (TRL trains on them)")
    a = p.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    trl_w, trl_c, our_w, our_c, splits, lengths = [], [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="r4b-bench-") as tmp:
        tmp = Path(tmp)
        model_dir, records, images = build(tmp, a.prompts)
        records, images = records[:max(a.prompts * 4, 16)], images[:max(a.prompts * 4, 16)]
        print(f"setup: {a.prompts} prompts x {2 * a.group} rollouts, max {a.max_new} new tokens, "
              f"{a.threads} torch thread(s), {a.steps} timed steps after {a.warmup} warm-up, {a.rounds} "
              f"round(s) alternating which side goes first; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores")
        for r in range(a.rounds):
            # alternate the order: on a shared machine the load drifts, and each side gets both slots
            for side in (("trl", "ours") if r % 2 == 0 else ("ours", "trl")):
                if side == "trl":
                    w, c, info = time_trl(model_dir, records, images, a, tmp / f"trl{r}")
                    trl_w += w
                    trl_c += c
                    lengths.append(info["mean_completion_length"])
                else:
                    w, c, sp = time_ours(model_dir, records, images, a)
                    our_w += w
                    our_c += c
                    splits += sp
            print(f"round {r}: TRL {statistics.mean(trl_w[-a.steps:]):.3f} s/step, ours "
                  f"{statistics.mean(our_w[-a.steps:]):.3f} s/step, ratio "
                  f"{statistics.mean(our_w[-a.steps:]) / statistics.mean(trl_w[-a.steps:]):.3f} "
                  f"(load average {os.getloadavg()[0]:.1f})")

    def show(name, w, c):
        print(f"{name:>5}: {statistics.mean(w):.3f} s/step wall (median {statistics.median(w):.3f}), "
              f"{statistics.mean(c):.3f} s/step CPU")

    show("TRL", trl_w, trl_c)
    show("ours", our_w, our_c)
    print(f"TRL mean completion length {statistics.mean(x for x in lengths if x is not None):.2f}")
    keys = sorted({k for s in splits for k in s})
    print("our step split (mean): " + ", ".join(f"{k}={statistics.mean(s.get(k, 0.0) for s in splits):.3f}"
                                               for k in keys))
    ratio = statistics.mean(our_w) / statistics.mean(trl_w)
    cpu_ratio = statistics.mean(our_c) / statistics.mean(trl_c)
    print(f"CPU-time ratio {cpu_ratio:.3f}")
    print(f"bpo_vs_trl ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
