"""Effective SFT throughput: sequence packing vs plain padding, same data and same model.

    .venv/bin/python bench/sft_packing.py [--records 600 --steps 20 --rounds 3 --threads 1 --pack-length 512]
    .venv/bin/python bench/sft_packing.py --device cuda        # on a GPU machine, unchanged otherwise

Every side is the real annealing stage (`run_anneal`, one process) on the tiny VLM and synthetic
visual-math data with the bi-mode length mix (math items of difficulty >= 2 train with their
reasoning trace, everything else with a direct target: short and long sequences mixed, as in
R-4B's annealing data). All sides get the same token budget per micro-batch (micro_batch_size x
pack_length slots for packing; as many samples as fit it at the data set's longest sample for
padding: the same memory bound) and the same attention code (`anneal.attention=auto`: per-sample
SDPA on CPU; on CUDA the flash-attention varlen kernel where `flash_attn` is installed).

    packed   samples grouped first-fit into `micro_batch_size` rows of up to `pack_length` tokens;
             the micro-batch's samples then run end to end with no pad, each attending only to
             itself (per-sample attention, boundaries from the position ids; the LM head only
             where a target follows, as on every side).
    fixed    plain padding: one sample per row, every row padded to one fixed length, the data
             set's longest sample (`pad_to=pack_length` with pack_length = that length: the
             shortest fixed length that truncates nothing). Printed on the line above the last.
    dynamic  one sample per row, padded to the longest sample of its micro-batch (LLaVA's collator
             does this). The strongest padding baseline: the one of the last line.
    mask     (not a baseline) packing through the previous path: the 4D block-diagonal mask and
             rows of exactly pack_length, for the before/after of the packed path.

Dynamic padding already removes much of the waste that packing removes: at equal cost per token
slot the ratio against it would be the real-token shares, (1 - packed waste) / (1 - dynamic waste)
(printed as the bound; not a measurement), and it stays below that because part of the cost
follows real tokens, not slots (the vision tower per image, the LM head per target, attention per
sample), which padding does not multiply.

Effective tokens are non-pad tokens; waste is the pad share of all token slots. Tokens per second
are per second of compute: the training loop's CPU seconds with one torch thread (the default),
which is the wall time the loop takes on an idle core; on a shared machine wall time is inflated by
other people's work by arbitrary factors (printed too, with the load average). With `--threads N >
1` or `--device cuda` the ratios use wall time instead (the stage synchronizes CUDA per phase). Rounds alternate the sides so that load changes hit all of
them; the best round of each counts. The time split (data = taking rows + collate, forward,
backward, optimizer, other = metrics and logging) is the stage's own (`metrics.time_split_cpu_s`).

The last line is `sft_packing ratio=X`: packed / dynamic-padding effective tokens per second, as
measured (goal >= 2.0).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import common                      # the offline environment, this checkout, the toy model, load()

SIDES = ("packed", "fixed", "dynamic", "mask")


def build(tmp: Path, n: int):
    """A bi-mode SFT JSONL and a tiny model whose tokenizer was trained on it."""
    from r4b_core.data.schema import write_jsonl

    model_dir, records, path = common.tiny_model_and_split(tmp, "train", n)
    for r in records:
        r.label = "reasoning" if (r.category == "math" and r.difficulty >= 2) else "direct"
    sft = tmp / "data" / "sft.jsonl"
    write_jsonl(sft, records)
    return sft, model_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=600)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per measured run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pack-length", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=4, help="packed rows per micro-batch")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a loaded machine)")
    ap.add_argument("--no-mask", action="store_true", help="skip the previous packed path (4D mask)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: the stage trains on the GPU (bf16 autocast, as `r4b anneal` there)")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""        # the stage takes a GPU whenever it sees one

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")

    from r4b_core.anneal import prepare_data, run_anneal
    from r4b_core.config import RunConfig
    from r4b_core.models.loading import load_model
    from r4b_core.storage import Store

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="r4b-bench-sft-"))
    sft, model_dir = build(tmp, args.records)

    def cfg_for(**anneal) -> RunConfig:
        return RunConfig.model_validate({
            "name": "bench", "storage": {"root": str(tmp / "runs")},
            "anneal": {"steps": args.steps, "compliance_samples": 0, "checkpoint_every": 10**6,
                       "log_every": 10**6, "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2}, **anneal},
        })

    model, processor = load_model(model_dir)
    base = cfg_for(pack_length=args.pack_length)
    samples, _, report = prepare_data(base, Store.from_config(base.storage), str(sft), model, processor, tmp / "cache")
    lengths = sorted(len(s) for s in samples)
    longest = lengths[-1]
    budget = args.micro_batch * args.pack_length
    padded_micro = max(1, budget // longest)
    sides = {
        "packed": cfg_for(pack_length=args.pack_length, micro_batch_size=args.micro_batch, packing=True),
        "fixed": cfg_for(pack_length=longest, micro_batch_size=padded_micro, packing=False, pad_to="pack_length"),
        "dynamic": cfg_for(pack_length=args.pack_length, micro_batch_size=padded_micro, packing=False),
        "mask": cfg_for(pack_length=args.pack_length, micro_batch_size=args.micro_batch, packing=True,
                        attention="mask", pad_to="pack_length"),
    }
    if args.no_mask:
        del sides["mask"]
    print(f"data: {report.used} samples, {report.think} thinking / {report.direct} direct "
          f"(reasoning ratio {report.reasoning_ratio:.2f}); tokens per sample min {lengths[0]} "
          f"median {lengths[len(lengths) // 2]} mean {sum(lengths) / len(lengths):.0f} max {longest}")
    print(f"token budget per micro-batch {budget}: packed {args.micro_batch} rows of <= {args.pack_length}; "
          f"fixed {padded_micro} samples each padded to {longest}; dynamic {padded_micro} samples padded to "
          f"the micro-batch's longest; {args.steps} steps per run, {args.threads} torch thread(s)")
    print(f"before: {common.load()}" + (f"; {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""))

    best: dict[str, dict] = {}
    for rnd in range(args.rounds):
        for name, cfg in sides.items():
            out = tmp / "runs" / f"{name}-{rnd}" / "model"
            m = run_anneal(cfg, str(sft), str(model_dir), str(out))["metrics"]
            tokens = m["tokens_per_s"] * m["train_s"]
            cpu_clock = args.threads == 1 and args.device == "cpu"
            seconds = m["train_cpu_s"] if cpu_clock else m["train_s"]
            split = m["time_split_cpu_s"] if cpu_clock else m["time_split_s"]
            row = {"tok_s": tokens / seconds, "waste": m["padding_waste"], "wall": m["train_s"],
                   "cpu": m["train_cpu_s"], "wall_tok_s": m["tokens_per_s"],
                   "split_ms": {k: 1000 * v / args.steps for k, v in split.items()}}
            print(f"round {rnd} {name} ({m['attention']}): {row['tok_s']:.0f} effective tokens/s, waste {row['waste']:.3f} "
                  f"({row['cpu']:.1f}s CPU, {row['wall']:.1f}s wall = {row['wall_tok_s']:.0f} tokens/s wall)")
            if name not in best or row["tok_s"] > best[name]["tok_s"]:
                best[name] = row
    print(f"after: {common.load()}")
    phases = list(best["packed"]["split_ms"])
    print(f"{'side':8s} {'tokens/s':>9s} {'waste':>7s}   ms per step: " + " ".join(f"{p:>9s}" for p in phases))
    for name, row in best.items():
        print(f"{name:8s} {row['tok_s']:9.0f} {100 * row['waste']:6.1f}%   {'':13s}"
              + " ".join(f"{row['split_ms'][p]:9.1f}" for p in phases))
    packed = best["packed"]
    bound = (1 - packed["waste"]) / (1 - best["dynamic"]["waste"])
    if "mask" in best:
        print(f"packed path speed-up over the 4D-mask path: {packed['tok_s'] / best['mask']['tok_s']:.2f}x")
    print(f"real-token share bound vs dynamic padding at equal cost per slot (not measured): {bound:.2f}")
    print(f"ratio vs fixed padding (every sample padded to the data's longest): "
          f"{packed['tok_s'] / best['fixed']['tok_s']:.2f}")
    # the measured ratio against the strongest padding baseline (each micro-batch to its longest)
    print(f"sft_packing ratio={packed['tok_s'] / best['dynamic']['tok_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
