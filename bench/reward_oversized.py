"""A BPO reward batch with oversized answers: scoring time now / as before the size rules.

    PYTHONPATH=. .venv/bin/python bench/reward_oversized.py [--batch 64] [--timeout 5]

A batch of `--batch` completions, four of them answers too big to evaluate (`9^{999!}`,
`(10^{999})!`, `10000000!`, `2^{1000!}`), the rest plain or symbolic answers. Now:
`RewardScorer.score` rejects the four by size. Before: the same scorer, with the four sent to
math-verify as the scorer used to send them (its worker pool, `--timeout` s each, a hung worker
killed and restarted). Both sides start from warm workers. Prints the times, the pool's timeouts
and restarts, then `reward_oversized ratio=X` (now / before; lower is better).
"""

from __future__ import annotations

import argparse
import time

import common                      # the offline environment, this checkout, load()
from r4b_core.rewards import RewardScorer

OVERSIZED = ["9^{999!}", "(10^{999})!", "10000000!", "2^{1000!}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=5.0)
    a = ap.parse_args()
    plain = [(f"\\boxed{{{i + 2}}}", str(i + 2)) if i % 4 else (f"\\boxed{{\\sqrt{{{(i + 2) ** 2}}}}}", str(i + 2))
             for i in range(a.batch - len(OVERSIZED))]
    texts = [p for p, _ in plain] + [f"\\boxed{{{x}}}" for x in OVERSIZED]
    refs = [r for _, r in plain] + ["3"] * len(OVERSIZED)
    print(f"{common.load()}; batch {a.batch}, {len(OVERSIZED)} oversized, timeout {a.timeout} s")
    with RewardScorer(workers=2, timeout_s=a.timeout) as scorer:
        scorer.score(["\\boxed{\\sqrt{4}}"] * 2, ["2"] * 2, "integer")          # warm both workers
        t0 = time.perf_counter()
        now = scorer.score(texts, refs, "integer")
        t_now = time.perf_counter() - t0
        starts = scorer._pool.starts
        t0 = time.perf_counter()
        before = scorer.score(texts[:len(plain)], refs[:len(plain)], "integer")
        verdicts = scorer._pool.run([(x, "3") for x in OVERSIZED])       # where the old scorer sent them
        t_before = time.perf_counter() - t0
        before += [float(s == "ok" and bool(v)) for s, v in verdicts]
        assert now == before, "both sides must score alike"
        print(f"now: {t_now:.2f} s, {starts - 2} worker restarts; before: {t_before:.2f} s, "
              f"{sum(s == 'timeout' for s, _ in verdicts)} timeouts, {scorer._pool.starts - starts} worker restarts")
    print(f"reward_oversized ratio={t_now / t_before:.3f}")


if __name__ == "__main__":
    main()
