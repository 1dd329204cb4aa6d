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
    def _encode(self, requests: list[GenerationRequest], rows: list[tuple[int, int]]):
        texts, images = [], []
        per_request_images = {}
        for ri, _ in rows:
            req = requests[ri]
            texts.append(req.prompt)
            if ri not in per_request_images:
                per_request_images[ri] = load_images(req.images)
            images.extend(per_request_images[ri])
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

    def _decode(self, model, requests, rows) -> list[Completion]:
        import torch

        enc = self._encode(requests, rows)
        input_ids, attn = enc.pop("input_ids"), enc.pop("attention_mask")
        bsz = input_ids.shape[0]
        prompt_ids = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attn)]
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
        next_pos = position_ids[:, -1:] + 1
        tokens: list[list[int]] = [[] for _ in range(bsz)]
        logps: list[list[float]] = [[] for _ in range(bsz)]
        finish = [""] * bsz
        for step in range(max(limits)):
            if self.suppress_ids:
                logits[:, self.suppress_ids] = float("-inf")
            chosen, chosen_lp = self._choose(logits, temps, gens, finish)
            for b in range(bsz):
                if finish[b]:
                    continue
                tokens[b].append(int(chosen[b]))
                logps[b].append(float(chosen_lp[b]))
                if int(chosen[b]) in self.eos_ids:
                    finish[b] = "stop"
                elif len(tokens[b]) >= limits[b]:
                    finish[b] = "length"
            if all(finish):
                break
            feed = torch.tensor([[t[-1]] for t in tokens], device=self.device)   # finished rows: ignored
            attn = torch.cat([attn, torch.ones((bsz, 1), dtype=attn.dtype, device=self.device)], dim=1)
            out = model(input_ids=feed, attention_mask=attn, position_ids=next_pos, cache=cache, use_cache=True)
            cache = out.cache
            logits = out.logits[:, -1, :].float()
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

    @staticmethod
    def _choose(logits, temps, gens, finish):
        """Greedy rows: argmax; sampled rows: Gumbel-max over logits / T with the row's generator."""
        import torch

        greedy = temps <= 0
        scaled = logits / torch.where(greedy, torch.ones_like(temps), temps).unsqueeze(1)
        logp = torch.log_softmax(scaled, dim=-1)
        chosen = logp.argmax(dim=-1)
        for b in range(logits.shape[0]):
            if greedy[b] or finish[b]:
                continue
            u = torch.rand(logits.shape[1], generator=gens[b]).clamp_(min=1e-20, max=1.0 - 1e-7)
            gumbel = -torch.log(-torch.log(u)).to(logits.device)
            chosen[b] = int(torch.argmax(logp[b] + gumbel))
        return chosen, logp.gather(1, chosen.unsqueeze(1)).squeeze(1)


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

