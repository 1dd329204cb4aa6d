"""In-process rollouts with transformers: the `hf` RolloutEngine.

    from r4b_core.rollout.hf import HFEngine
    engine = HFEngine(model, processor)                 # shares the live (training) module
    outs = engine.generate([GenerationRequest(prompt=modes.chat_prompt(q, 1, Mode.THINK),
                                              images=[img], mode=Mode.THINK, n=4, temperature=1.0, seed=7)])
    engine.update_weights(model, version=3)             # nothing to copy: the module is shared

Prompts arrive as text that already ends in the forced prefix (built with modes.chat_prompt); the
processor expands the `<image>` placeholders. Generation is batched with left padding and a KV
cache; position ids follow the attention mask (as `model.generate` does), so a request's output
does not depend on what else is in its batch.

Sampling: greedy at temperature 0 (ties go to the lowest id, as argmax), otherwise exact samples
from softmax(logits / T) drawn with the Gumbel-max trick from a per-sample `torch.Generator` seeded
from (request seed, sample index), so results are reproducible and independent of batching.
`logprobs` are log-probabilities of the chosen tokens under the distribution they were sampled
from (log_softmax(logits / T); T = 1 for greedy), which is what the BPO importance ratio needs.
Generation stops at the EOS token (`<|im_end|>`): the EOS token is included in `token_ids` and
`logprobs` (the policy chose to stop) but not in `text`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from r4b_core import modes
from r4b_core.errors import R4BError
from r4b_core.rollout.base import Completion, GenerationRequest


class RolloutError(R4BError):
    """A request that cannot be generated; the message names the request key and the fix."""


def load_images(images: list[Any]) -> list[Any]:
    """PIL images as they are; local paths (or file:// URIs) opened as RGB."""
    from PIL import Image

    out = []
    for im in images:
        if isinstance(im, (str, Path)):
            path = str(im)
            path = path[len("file://"):] if path.startswith("file://") else path
            if "://" in path:
                raise RolloutError(f"image {im!r}: remote images must be fetched first (storage.Store.local_path)")
            with Image.open(path) as f:
                im = f.convert("RGB")
        out.append(im.convert("RGB") if getattr(im, "mode", "RGB") != "RGB" else im)
    return out


def check_request(req: GenerationRequest) -> None:
    n_placeholders = req.prompt.count(modes.IMAGE_TOKEN)
    if n_placeholders != len(req.images):
        raise RolloutError(f"request {req.key!r}: the prompt has {n_placeholders} {modes.IMAGE_TOKEN} "
                           f"placeholder(s) but {len(req.images)} image(s) were given; build the prompt with "
                           f"modes.chat_prompt(question, num_images=len(images), mode=...)")
    if req.n < 1 or req.max_new_tokens < 1 or req.temperature < 0:
        raise RolloutError(f"request {req.key!r}: n={req.n}, max_new_tokens={req.max_new_tokens}, "
                           f"temperature={req.temperature}; need n >= 1, max_new_tokens >= 1, temperature >= 0")


def suppressed_token_ids(processor) -> list[int]:
    """Tokens a rollout never emits: the image placeholder. A completion containing it could not be
    fed back to the model (Llava would look for image features for it), so both engines mask it and
    every logprob here is under that masked distribution (teacher_forced_logprobs does the same)."""
    tok = getattr(processor, "tokenizer", processor)
    tid = tok.convert_tokens_to_ids(modes.IMAGE_TOKEN)
    return [tid] if isinstance(tid, int) and tid != tok.unk_token_id else []


def sample_seed(request_seed: int | None, sample_index: int, fallback: int) -> int:
    """A 63-bit seed for one sample, stable across batchings and processes."""
    base = f"{request_seed if request_seed is not None else 'none-' + str(fallback)}/{sample_index}"
    return int.from_bytes(hashlib.sha256(base.encode()).digest()[:8], "little") >> 1


class HFEngine:
    """RolloutEngine over an in-process transformers VLM (LLaVA-style)."""

    def __init__(self, model, processor, device: str | None = None, max_batch_size: int = 64, seed: int = 0):
        """`device`: where inputs go; default the model's own device (the module is never moved)."""
        import torch

        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.policy_version = 0
        self._calls = 0
        self._seed = seed
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.eos_ids.add(self.tokenizer.convert_tokens_to_ids(modes.IM_END))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.suppress_ids = suppressed_token_ids(processor)

    # -- protocol --------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        for req in requests:
            check_request(req)
        self._calls += 1
        rows = [(ri, j) for ri, req in enumerate(requests) for j in range(req.n)]
        out: dict[tuple[int, int], Completion] = {}
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start:start + self.max_batch_size]
            for key, comp in zip(chunk, self._generate_rows(requests, chunk)):
                out[key] = comp
        return [out[key] for key in rows]

    def update_weights(self, model_or_path: Any, version: int) -> None:
        """Serve `model_or_path` from now on: a module (shared, no copy) or a saved folder."""
        if isinstance(model_or_path, (str, Path)):
            from r4b_core.models.loading import load_model

            model_or_path, self.processor = load_model(str(model_or_path))
            self.tokenizer = self.processor.tokenizer
            model_or_path.to(self.device)
        self.model = model_or_path
        self.policy_version = version

    def close(self) -> None:
        self.model = None

    # -- internals -------------------------------------------------------------------------------
    def _encode(self, requests: list[GenerationRequest], request_indices: list[int]):
        """One left-padded row per request (its n samples share it): the processor and the vision
        tower see each prompt and image once, not once per sample."""
        texts, images = [], []
        for ri in request_indices:
            texts.append(requests[ri].prompt)
            images.extend(load_images(requests[ri].images))
        saved_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        finally:
            self.tokenizer.padding_side = saved_side
        return {k: v.to(self.device) for k, v in enc.items()}

    def _generate_rows(self, requests: list[GenerationRequest], rows: list[tuple[int, int]]) -> list[Completion]:
        import torch

        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self._decode(model, requests, rows)
        finally:
            model.train(was_training)

    def _text_step(self, model):
        """A decode step without the multimodal wrapper: after the prefill no row has images left,
        and for a LLaVA-style model the wrapper then only embeds the ids and applies the LM head to
        the decoder's output — the same math, minus ~1 ms of per-call overhead per token. Models
        that are not decoder + plain head (or cap their logits) take the full forward."""
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        text_cfg = getattr(model.config, "text_config", model.config)
        plain = (decoder is not None and decoder is not model and head is not None
                 and not getattr(text_cfg, "final_logit_softcapping", None)
                 and not getattr(text_cfg, "logit_scale", None))
        if not plain:
            def step(ids, attn, pos, cache):
                out = model(input_ids=ids, attention_mask=attn, position_ids=pos, cache=cache, use_cache=True)
                return out.logits[:, -1, :], out.cache
            return step

        def step(ids, attn, pos, cache):
            out = decoder(input_ids=ids, attention_mask=attn, position_ids=pos, cache=cache, use_cache=True)
            return head(out.last_hidden_state[:, -1, :]), out.cache
        return step

    def _decode(self, model, requests, rows) -> list[Completion]:
        """Prefill each distinct request once, expand its KV cache to its n samples, then decode
        all rows together; rows that finished are dropped from the batch as they accumulate."""
        import torch

        uniq = list(dict.fromkeys(ri for ri, _ in rows))
        enc = self._encode(requests, uniq)
        input_ids, attn = enc.pop("input_ids"), enc.pop("attention_mask")
        bsz = len(rows)
        owner = torch.tensor([uniq.index(ri) for ri, _ in rows], device=self.device)
        unique_prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attn)]
        prompt_ids = [unique_prompt_ids[uniq.index(ri)] for ri, _ in rows]
        temps = torch.tensor([requests[ri].temperature for ri, _ in rows], dtype=torch.float32, device=self.device)
        limits = [requests[ri].max_new_tokens for ri, _ in rows]
        gens = []
        for ri, j in rows:
            g = torch.Generator(device="cpu")
            g.manual_seed(sample_seed(requests[ri].seed, j, fallback=self._seed * 1_000_003 + self._calls * 1009 + ri))
            gens.append(g)
        position_ids = (attn.long().cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1, **enc)
        cache = out.cache
        logits = out.logits[:, -1, :].float()
        if len(uniq) != bsz or bool((owner != torch.arange(bsz, device=self.device)).any()):
            cache.batch_select_indices(owner)          # sample rows share their request's prefix K/V
            logits = logits[owner]
        attn = attn[owner]
        next_pos = position_ids[owner, -1:] + 1
        step_fn = self._text_step(model)
        sampler = _GumbelSampler(gens, temps, logits.shape[-1], max(limits))
        live = list(range(bsz))                         # original row of each batch position
        tokens: list[list[int]] = [[] for _ in range(bsz)]
        logps: list[list[float]] = [[] for _ in range(bsz)]
        finish = [""] * bsz
        for step in range(max(limits)):
            if self.suppress_ids:
                logits[:, self.suppress_ids] = float("-inf")
            chosen, chosen_lp = sampler.choose(logits, live, step)
            done_here = 0
            for b, tok, lp in zip(live, chosen.tolist(), chosen_lp.tolist()):
                if finish[b]:
                    done_here += 1               # finished earlier, still in the batch
                    continue
                tokens[b].append(tok)
                logps[b].append(lp)
                if tok in self.eos_ids:
                    finish[b] = "stop"
                elif len(tokens[b]) >= limits[b]:
                    finish[b] = "length"
                done_here += bool(finish[b])
            if done_here == len(live):
                break
            feed = chosen.unsqueeze(1)
            if done_here * 4 >= len(live):
                # a finished row would keep costing compute; drop them once a quarter of the batch is done
                keep = [k for k, b in enumerate(live) if not finish[b]]
                sel = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(sel)
                attn, next_pos, feed = attn[sel], next_pos[sel], feed[sel]
                live = [live[k] for k in keep]
            attn = torch.cat([attn, torch.ones((len(live), 1), dtype=attn.dtype, device=self.device)], dim=1)
            logits, cache = step_fn(feed, attn, next_pos, cache)
            logits = logits.float()
            next_pos = next_pos + 1
        comps = []
        for b, (ri, _) in enumerate(rows):
            req = requests[ri]
            ids = tokens[b]
            body = ids[:-1] if finish[b] == "stop" else ids
            comps.append(Completion(key=req.key, mode=req.mode,
                                    text=self.tokenizer.decode(body, skip_special_tokens=True),
                                    token_ids=ids, logprobs=logps[b], finish_reason=finish[b],
                                    prompt_token_ids=prompt_ids[b], policy_version=self.policy_version))
        return comps


class _GumbelSampler:
    """Greedy rows: argmax; sampled rows: Gumbel-max over log_softmax(logits / T), the uniforms
    drawn from the row's own generator. A CPU generator yields the same stream whether drawn one
    vocabulary-sized vector per step or a block of steps at once, so the draws are made in blocks
    and the noise of all rows is transformed in one tensor op: identical samples, far fewer calls."""

    MAX_BLOCK = 16
    MAX_FLOATS = 1 << 24           # noise buffer cap (64 MiB): a real vocabulary gets short blocks

    def __init__(self, gens, temps, vocab: int, max_steps: int):
        import torch

        self.gens, self.temps, self.vocab, self.max_steps = gens, temps, vocab, max_steps
        self.greedy = temps <= 0
        self.all_greedy = bool(self.greedy.all())
        self.divisor = torch.where(self.greedy, torch.ones_like(temps), temps).unsqueeze(1)
        self.block = max(1, min(self.MAX_BLOCK, max_steps, self.MAX_FLOATS // max(1, len(gens) * vocab)))
        self.noise = None          # [rows, block, vocab] uniforms for steps block_start ...
        self.block_start, self.block_len = 0, 0

    def choose(self, logits, live: list[int], step: int):
        import torch

        idx = torch.tensor(live, device=logits.device)
        logp = torch.log_softmax(logits / self.divisor[idx], dim=-1)
        chosen = logp.argmax(dim=-1)
        if not self.all_greedy:
            if step >= self.block_start + self.block_len:
                self._draw(live, step)
            u = self.noise[idx, step - self.block_start].clamp_(min=1e-20, max=1.0 - 1e-7)
            sampled = torch.argmax(logp + (-torch.log(-torch.log(u))).to(logp.device), dim=-1)
            chosen = torch.where(self.greedy[idx], chosen, sampled)
        return chosen, logp.gather(1, chosen.unsqueeze(1)).squeeze(1)

    def _draw(self, live: list[int], step: int) -> None:
        import torch

        if self.noise is None:
            self.noise = torch.zeros((len(self.gens), self.block, self.vocab))
        self.block_start, self.block_len = step, min(self.block, self.max_steps - step)
        for b in live:
            if not bool(self.greedy[b]):
                torch.rand((self.block_len, self.vocab), generator=self.gens[b], out=self.noise[b, :self.block_len])


def teacher_forced_logprobs(model, processor, prompt: str, images: list[Any], token_ids: list[int],
                            temperature: float = 1.0) -> list[float]:
    """log p(token_ids | prompt, images) token by token, under softmax(logits / T) (T = 1 when 0)
    with the engines' suppressed tokens masked: the distribution the rollouts were sampled from."""
    import torch

    enc = processor(text=[prompt], images=load_images(images) or None, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    n_prompt = enc["input_ids"].shape[1]
    ids = torch.cat([enc["input_ids"], torch.tensor([token_ids], device=device)], dim=1)
    attn = torch.ones_like(ids)
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, **extra).logits[0].float()
    finally:
        model.train(was_training)
    t = temperature if temperature > 0 else 1.0
    logits = logits[n_prompt - 1:-1]
    suppress = suppressed_token_ids(processor)
    if suppress:
        logits[:, suppress] = float("-inf")
    logp = torch.log_softmax(logits / t, dim=-1)
    return logp.gather(1, torch.tensor(token_ids, device=device).unsqueeze(1)).squeeze(1).tolist()

