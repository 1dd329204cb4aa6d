"""Serving load: concurrent chat requests (mixed modes) against `r4b serve`'s server and plain vLLM.

    .venv/bin/python bench/serving.py [--model DIR] [--concurrency 32 --rounds 5 --max-tokens 48 --budget 48]

The model: `--model DIR`, else a tiny VLM annealed here on both modes of 24 synthetic items (~45 s,
as in tests/integration/test_serving.py), so answers come with real think blocks to split. Two
servers on that model, both started by rollout/vllm_server.VLLMServer with the same flags:
- ours:  serve.serving_server (the r4b reasoning parser, the thinking-budget logits processor, the
         middleware that checks images, applies budgets, adds `reasoning_content` and counts the mode
         metrics, no dev-mode routes): what `r4b serve` runs, with serve.thinking_budget = `--budget`;
- plain: the same launcher and flags without the r4b plugins (vLLM with our chat template only,
         no reasoning split).
Both are up at once and the measured rounds alternate ours / plain, so a change in the load of the
machine hits both alike. A round sends `--concurrency` requests at once with the AsyncOpenAI client:
a synthetic image (base64 data URL) and its question, thinking_mode cycling auto / long / short,
greedy. The budgeted mix: to ours, every auto / long request runs under a thinking budget, half of
them their own (chat_template_kwargs `thinking_budget`), half the server's default; `--budget`
defaults to `--max-tokens`, so the budget is tracked on every step but never closes a block and
both servers generate the same tokens (the overhead is what is measured). At the end ours' /metrics
must have counted every request (r4b_requests_total) and every budgeted one. Per server: requests/s (requests / wall time of the round, summed over rounds), p50 / p95
latency, errors (an HTTP error, or a malformed answer: short with reasoning or without content; for
ours also a missing reasoning_content alias). The last line is `serving ratio=X` (ours / plain
requests/s; goal >= 0.95 with 0 errors).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common                      # the offline environment, this checkout

MODES = ("auto", "long", "short")


def prompts(root: Path, n: int) -> list[tuple[str, str]]:
    """(image data URL, question) pairs from the synthetic generator."""
    from r4b_core.config import SyntheticDataConfig
    from r4b_core.data.schema import read_jsonl
    from r4b_core.data.synthetic import generate_split

    path = generate_split("eval", n, SyntheticDataConfig(seed=1), root / "prompts")
    out = []
    for r in read_jsonl(path).records:
        data = (path.parent / r.images[0]).read_bytes()
        out.append(("data:image/png;base64," + base64.b64encode(data).decode(), r.question))
    return out


def well_formed(response, mode: str, ours: bool) -> str | None:
    """Why a 200 response is malformed, or None."""
    choice = response.choices[0]
    msg = choice.message
    reasoning = getattr(msg, "reasoning_content", None)
    if ours and getattr(msg, "reasoning", None) != reasoning:
        return "reasoning_content is not the reasoning"
    if ours and mode == "short" and reasoning is not None:
        return "short mode returned reasoning"
    if not msg.content and choice.finish_reason == "stop" and (mode == "short" or not ours):
        return "finished without content"
    return None


async def one_round(client, batch: list[tuple[str, str, str]], max_tokens: int, ours: bool, budget: int):
    import openai

    async def one(i: int, url: str, question: str, mode: str):
        kwargs = {"thinking_mode": mode}
        if ours and mode != "short" and i % 2:
            kwargs["thinking_budget"] = budget     # the others: the server's default
        t0 = time.perf_counter()
        try:
            r = await client.chat.completions.create(
                model="r4b", max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": question}]}],
                extra_body={"chat_template_kwargs": kwargs})
            problem = well_formed(r, mode, ours)
            split = bool(getattr(r.choices[0].message, "reasoning_content", None))
        except openai.APIError as exc:
            cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
            problem, split = f"{type(exc).__name__}: {exc}{cause}", False
        return time.perf_counter() - t0, problem, split

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(i, *req) for i, req in enumerate(batch)))
    return time.perf_counter() - t0, results


async def measure(servers: dict, pool: list, stats: dict, a) -> None:
    from openai import AsyncOpenAI

    for rnd in range(a.rounds + 1):       # round 0 warms both up
        batch = [(*pool[(rnd * a.concurrency + i) % len(pool)], MODES[i % 3]) for i in range(a.concurrency)]
        order = list(servers) if rnd % 2 == 0 else list(reversed(list(servers)))
        for name in order:
            # a fresh client (connection pool) per round: a connection kept alive across the pause
            # between rounds may be closed by the server just as it is reused
            client = AsyncOpenAI(base_url=servers[name].url + "/v1", api_key="unused", max_retries=0, timeout=300)
            try:
                wall, results = await one_round(client, batch, a.max_tokens, name == "ours", a.budget)
            finally:
                await client.close()
            lat = sorted(r[0] for r in results)
            errors = [r[1] for r in results if r[1]]
            label = "warmup" if rnd == 0 else str(rnd)
            print(f"{name:<6} {label:>5} {len(batch) / wall:7.2f} {1000 * lat[len(lat) // 2]:8.0f} "
                  f"{1000 * lat[int(0.95 * (len(lat) - 1))]:8.0f} {len(errors):6d}", flush=True)
            if rnd == 0:
                continue
            s = stats[name]
            s["wall"] += wall
            s["n"] += len(batch)
            s["lat"] += lat
            s["errors"] += errors
            s["split"] += sum(r[2] for r in results)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model folder (default: anneal a tiny one here)")
    p.add_argument("--concurrency", type=int, default=32, help="requests sent at once per round")
    p.add_argument("--rounds", type=int, default=5, help="measured rounds per server (after one warm-up)")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--budget", type=int, default=None, help="thinking budget of ours' auto / long requests "
                   "(default: --max-tokens, tracked but never binding)")
    a = p.parse_args()
    a.budget = a.max_tokens if a.budget is None else a.budget

    from r4b_core import serve
    from r4b_core.config import RunConfig
    from r4b_core.rollout.vllm_server import VLLMServer

    tmp = Path(tempfile.mkdtemp(prefix="r4b-bench-serving-"))
    t0 = time.time()
    model = Path(a.model) if a.model else common.annealed_model(tmp)[0]
    print(f"model {model} ({time.time() - t0:.0f} s)", flush=True)
    cfg = RunConfig.model_validate({"serve": {"thinking_budget": a.budget}})
    flags = ["--max-model-len", str(cfg.serve.max_model_len), "--dtype", "auto"]
    servers = {
        "ours": serve.serving_server(cfg, model, port=0, log_path=tmp / "ours.log"),
        "plain": VLLMServer(model, cfg.vllm, log_path=tmp / "plain.log", extra_args=flags,
                            trust_request_chat_template=False, dev_mode=False),
    }
    pool = prompts(tmp, 64)
    stats = {name: {"wall": 0.0, "n": 0, "lat": [], "errors": [], "split": 0} for name in servers}
    try:
        for name, server in servers.items():
            t0 = time.time()
            server.start()
            print(f"{name}: up in {time.time() - t0:.0f} s at {server.url}", flush=True)
        print(f"{'server':<6} {'round':>5} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'errors':>6}")
        asyncio.run(measure(servers, pool, stats, a))
        counted = mode_metrics(servers["ours"].url)
    finally:
        for server in servers.values():
            server.stop()
    for name, s in stats.items():
        lat = sorted(s["lat"])
        print(f"{name}: {s['n']} requests, {s['n'] / s['wall']:.2f} req/s, p50 {1000 * statistics.median(lat):.0f} ms, "
              f"p95 {1000 * lat[int(0.95 * (len(lat) - 1))]:.0f} ms, errors {len(s['errors'])}, "
              f"with reasoning_content {s['split']}")
        for e in sorted(set(s["errors"]))[:5]:
            print(f"  error: {e}")
    sent = (a.rounds + 1) * a.concurrency
    budgeted = (a.rounds + 1) * sum(1 for i in range(a.concurrency) if MODES[i % 3] != "short")
    print(f"ours' /metrics: r4b_requests_total {counted['r4b_requests_total']:.0f} of {sent} sent, "
          f"r4b_thinking_budget_requests_total {counted['r4b_thinking_budget_requests_total']:.0f} of {budgeted} "
          f"budgeted, r4b_thinking_budget_exhausted_total {counted['r4b_thinking_budget_exhausted_total']:.0f}")
    ratio = (stats["ours"]["n"] / stats["ours"]["wall"]) / (stats["plain"]["n"] / stats["plain"]["wall"])
    print(f"serving ratio={ratio:.3f}")
    ok = counted["r4b_requests_total"] == sent and counted["r4b_thinking_budget_requests_total"] == budgeted
    return 0 if ok and not (stats["ours"]["errors"] or stats["plain"]["errors"]) else 1


def mode_metrics(url: str) -> dict[str, float]:
    """Sum over labels of ours' r4b_* counters, from its /metrics."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        lines = r.read().decode().splitlines()
    totals: dict[str, float] = {"r4b_requests_total": 0.0, "r4b_thinking_budget_requests_total": 0.0,
                                "r4b_thinking_budget_exhausted_total": 0.0}
    for line in lines:
        name = line.split("{")[0].split(" ")[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


if __name__ == "__main__":
    sys.exit(main())
