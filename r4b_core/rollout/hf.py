"""In-process rollouts with transformers: the `hf` RolloutEngine.

    from r4b_core.rollout.hf import HFEngine
    engine = HFEngine(model, processor)                 # shares the live (training) module
    outs = engine.generate([GenerationRequest(prompt=engine.chat.prompt(q, 1, Mode.THINK),
                                              images=[img], mode=Mode.THINK, n=4, temperature=1.0, seed=7)])
    engine.update_weights(model, version=3)             # nothing to copy: the module is shared

Prompts arrive as text that already ends in the forced prefix (built with engine.chat.prompt); the
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

Thinking budget: a request's `thinking_budget` runs in the decode loop as the same `ThinkingBudget`
that the vLLM server's logits processor runs (r4b_core/assets/r4b_thinking.py): once the reasoning
used the budget, the next tokens are forced to close the block with modes.THINK_END (each with
logprob 0, as vLLM reports a forced token) and the model answers.

Speed (a small model's decode step is bound by the number of tensor ops, not by FLOPs): each
request is encoded and prefilled once and its KV cache expanded to its n samples (BPO's 2g
rollouts of a prompt share one prefill and one vision pass); decode steps of Llama/Qwen-style text
models run through `_StaticDecoder` (preallocated KV cache, fused q|k|v and gate|up matmuls, checked
once per module against the model's forward, else the model's own forward is used); sampling noise
is drawn in blocks and transformed batch-wide; finished rows leave the batch. None of this changes a
sample: tests compare against one-request-at-a-time generation and the model's own forward.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from r4b_core import modes
from r4b_core.errors import R4BError
from r4b_core.rollout.base import Completion, GenerationRequest, PromptTooLong


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


def check_request(req: GenerationRequest, image_placeholder: str = modes.IMAGE_TOKEN) -> None:
    n_placeholders = req.prompt.count(image_placeholder)
    if n_placeholders != len(req.images):
        raise RolloutError(f"request {req.key!r}: the prompt has {n_placeholders} {image_placeholder} "
                           f"placeholder(s) but {len(req.images)} image(s) were given; build the prompt with "
                           f"ChatFormat.of(processor).prompt(question, num_images=len(images), mode=...)")
    if req.n < 1 or req.max_new_tokens < 1 or req.temperature < 0:
        raise RolloutError(f"request {req.key!r}: n={req.n}, max_new_tokens={req.max_new_tokens}, "
                           f"temperature={req.temperature}; need n >= 1, max_new_tokens >= 1, temperature >= 0")
    if req.thinking_budget is not None and req.thinking_budget < 0:
        raise RolloutError(f"request {req.key!r}: thinking_budget={req.thinking_budget}; need a number of "
                           f"tokens >= 0, or None for no budget")


def context_limit(model) -> int | None:
    """Positions the model can attend over (its text model's max_position_embeddings), if stated."""
    config = getattr(model, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        limit = getattr(cfg, "max_position_embeddings", None)
        if isinstance(limit, int) and limit > 0:
            return limit
    return None


def check_prompt_lengths(requests: list[GenerationRequest], lengths: list[int], limit: int | None,
                         counted: str = "tokens") -> None:
    """PromptTooLong for the requests whose prompt (`lengths`, in tokens) leaves no room for a
    single new token in `limit` positions, before any of them costs a prefill. (A prompt that fits
    generates at most the positions left, as vLLM clamps max_tokens; finish reason "length".)"""
    over = [(r, n) for r, n in zip(requests, lengths) if limit and n >= limit]
    if over:
        req, n = over[0]
        more = f" (and {len(over) - 1} more requests)" if len(over) > 1 else ""
        raise PromptTooLong(f"request {req.key!r}: a prompt of {n} {counted} leaves no room in the model's {limit} "
                            f"positions{more}; shorten the question (records longer than data.max_question_chars "
                            "are refused)", [r.key for r, _ in over])


def suppressed_token_ids(processor) -> list[int]:
    """Tokens a rollout never emits: the image (and video) placeholders. A completion containing one
    could not be fed back to the model (it would look for image features for it), so both engines
    mask them and every logprob here is under that masked distribution (teacher_forced_logprobs
    does the same). The ids are the processor's own (`image_token_id`, `video_token_id`)."""
    tok = getattr(processor, "tokenizer", processor)
    ids = {getattr(processor, attr, None) for attr in ("image_token_id", "video_token_id")}
    ids.add(tok.convert_tokens_to_ids(modes.IMAGE_TOKEN) if modes.IMAGE_TOKEN in tok.get_vocab() else None)
    return sorted(i for i in ids if isinstance(i, int) and i != tok.unk_token_id)


def encode_prompts(processor, texts: list[str], images: list[list[Any]], **kwargs) -> dict:
    """The processor's inputs for a batch of prompts, one image list per prompt (what Gemma3 and
    Idefics3 need to tell the prompts' images apart; the others accept the same nesting). Every
    tensor the processor returns (pixel_values, image_grid_thw, image_sizes, pixel_attention_mask,
    token_type_ids, ...) is kept: the model's forward takes them all."""
    if any(images):
        return dict(processor(text=texts, images=[load_images(ims) for ims in images], return_tensors="pt",
                              **kwargs))
    return dict(processor(text=texts, return_tensors="pt", **kwargs))


def rope_positions(model, enc: dict):
    """Prompt position ids from the model's own rope-index function where it has one (M-RoPE:
    Qwen2.5-VL, Qwen3-VL; shape (3, B, L)), else None (the caller's 1-D positions apply)."""
    inner = getattr(model, "model", None)
    rope_index = getattr(inner, "get_rope_index", None)
    if rope_index is None:
        return None
    extra = {k: v for k, v in enc.items() if k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts",
                                                   "mm_token_type_ids")}
    positions, _ = rope_index(enc["input_ids"], attention_mask=enc.get("attention_mask"), **extra)
    return positions


def budget_states(tokenizer, requests: list[GenerationRequest], prompt_ids: list[list[int]]) -> list | None:
    """One `ThinkingBudget` per row whose request has a thinking budget (None for the others; None
    for all when no request has one): the per-request rule that vLLM's logits processor runs
    (r4b_core/assets/r4b_thinking.py), so both engines close a think block at the same token."""
    from r4b_core.assets.r4b_thinking import ThinkingBudget, ThinkTokens

    if all(r.thinking_budget is None for r in requests):
        return None
    try:
        tokens = ThinkTokens.of(tokenizer)
    except ValueError as exc:
        key = next(r.key for r in requests if r.thinking_budget is not None)
        raise RolloutError(f"request {key!r}: {exc}") from None
    return [None if r.thinking_budget is None else ThinkingBudget(r.thinking_budget, ids, tokens)
            for r, ids in zip(requests, prompt_ids)]


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
        # the trainer's module is shared: pushes copy nothing and have nothing to check
        self.last_sync: dict[str, float] = {}
        self.last_rollout_verify: dict[str, float] | None = None
        self.sync_checks: list[dict] = []
        self.reload_path = ""
        self._calls = 0
        self._seed = seed
        self._set_processor(processor)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self._fast_checked: dict[int, bool] = {}      # id(model) -> static decoder verified

    def _set_processor(self, processor) -> None:
        """Chat format, end-of-turn ids and masked ids of the served model (they change with it)."""
        from r4b_core.models.chat import ChatFormat

        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        generation_config = getattr(self.model, "generation_config", None)
        self.chat = ChatFormat.of(processor, generation_config)
        eos = getattr(generation_config, "eos_token_id", None)
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.eos_ids.add(self.tokenizer.convert_tokens_to_ids(self.chat.end_of_turn))
        self.suppress_ids = suppressed_token_ids(processor)
        self.max_positions = context_limit(self.model)

    # -- protocol --------------------------------------------------------------------------------
    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        for req in requests:
            check_request(req, self.chat.image_placeholder)
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

            model_or_path, processor = load_model(str(model_or_path))
            model_or_path.to(self.device)
            self.model = model_or_path
            self._set_processor(processor)
        self.model = model_or_path
        self.max_positions = context_limit(model_or_path)
        self.policy_version = version

    def push_weights(self, model_or_path: Any) -> dict[str, float]:
        self.update_weights(model_or_path, self.policy_version)
        return {}

    def wait_verified(self) -> dict[str, float] | None:
        return None

    def close(self) -> None:
        self.model = None

    # -- internals -------------------------------------------------------------------------------
    def _encode(self, requests: list[GenerationRequest], request_indices: list[int]):
        """One left-padded row per request (its n samples share it): the processor and the vision
        tower see each prompt and image once, not once per sample."""
        texts = [requests[ri].prompt for ri in request_indices]
        images = [requests[ri].images for ri in request_indices]
        saved_side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = encode_prompts(self.processor, texts, images, padding=True)
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

    def _stepper(self, model, cache, attn, max_new: int):
        """The decode-step implementation for this call: the static-cache decoder where the model
        is a plain Llama/Qwen-style decoder and has passed its one-time check, else HF's forward."""
        fast = _StaticDecoder.build(model, cache, attn, max_new)
        if fast is None:
            return _HFStepper(model, cache, attn)
        if self._fast_checked.get(id(model)) is None:
            # one step both ways, once per module: the fast path must give HF's logits
            import copy

            import torch

            feed = torch.ones((attn.shape[0], 1), dtype=torch.long, device=attn.device)
            pos = attn.long().sum(-1, keepdim=True)
            ref = _HFStepper(model, copy.deepcopy(cache), attn).step(feed, pos)
            got = _StaticDecoder.build(model, cache, attn, max_new).step(feed, pos)
            diff = float((ref.float() - got.float()).abs().max())
            self._fast_checked[id(model)] = diff <= 1e-4
            if diff > 1e-4:
                import warnings

                warnings.warn(f"HFEngine: the static-cache decoder differs from the model's forward by "
                              f"{diff:.2e} on {type(model).__name__}; using the model's forward")
        return fast if self._fast_checked[id(model)] else _HFStepper(model, cache, attn)

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
        check_prompt_lengths([requests[ri] for ri in uniq], [len(ids) for ids in unique_prompt_ids],
                             self.max_positions)
        prompt_ids = [unique_prompt_ids[uniq.index(ri)] for ri, _ in rows]
        temps = torch.tensor([requests[ri].temperature for ri, _ in rows], dtype=torch.float32, device=self.device)
        # Prompt + generation stay within the model's positions (vLLM clamps max_tokens the same way).
        room = [self.max_positions - len(ids) if self.max_positions else None for ids in prompt_ids]
        limits = [requests[ri].max_new_tokens if left is None else min(requests[ri].max_new_tokens, left)
                  for (ri, _), left in zip(rows, room)]
        gens = []
        for ri, j in rows:
            g = torch.Generator(device="cpu")
            g.manual_seed(sample_seed(requests[ri].seed, j, fallback=self._seed * 1_000_003 + self._calls * 1009 + ri))
            gens.append(g)
        position_ids = rope_positions(model, {"input_ids": input_ids, "attention_mask": attn, **enc})
        if position_ids is None:
            position_ids = (attn.long().cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, use_cache=True,
                    logits_to_keep=1, **enc)
        cache = out.cache
        logits = out.logits[:, -1, :].float()
        if len(uniq) != bsz or bool((owner != torch.arange(bsz, device=self.device)).any()):
            cache.batch_select_indices(owner)          # sample rows share their request's prefix K/V
            logits = logits[owner]
        attn = attn[owner]
        # generated tokens are text: one position each, after the prompt's last (M-RoPE: its largest)
        last = position_ids[..., -1:] if position_ids.ndim == 2 else position_ids.amax(dim=(0, 2)).unsqueeze(-1)
        next_pos = last[owner] + 1
        stepper = self._stepper(model, cache, attn, max(limits))
        sampler = _GumbelSampler(gens, temps, logits.shape[-1], max(limits))
        budgets = budget_states(self.tokenizer, [requests[ri] for ri, _ in rows], prompt_ids)
        live = list(range(bsz))                         # original row of each batch position
        tokens: list[list[int]] = [[] for _ in range(bsz)]
        logps: list[list[float]] = [[] for _ in range(bsz)]
        finish = [""] * bsz
        for step in range(max(limits)):
            if self.suppress_ids:
                logits[:, self.suppress_ids] = float("-inf")
            for k, b in enumerate(live if budgets else ()):
                forced = budgets[b].advance(tokens[b]) if budgets[b] is not None else None
                if forced is not None:          # as the vLLM processor: one allowed token, logprob 0
                    logits[k] = float("-inf")
                    logits[k, forced] = 0.0
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
                stepper.select(sel)
                next_pos, feed = next_pos[sel], feed[sel]
                live = [live[k] for k in keep]
            logits = stepper.step(feed, next_pos).float()
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


class _HFStepper:
    """Decode steps through the model's own forward. For a LLaVA-style model the multimodal wrapper
    is skipped: after the prefill no row has images left, and the wrapper then only embeds the ids
    and applies the LM head to the decoder's output — the same math minus per-call overhead."""

    def __init__(self, model, cache, attn):
        self.cache, self.attn = cache, attn
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        text_cfg = getattr(model.config, "text_config", model.config)
        self.plain = (decoder is not None and decoder is not model and head is not None
                      and not getattr(text_cfg, "final_logit_softcapping", None)
                      and not getattr(text_cfg, "logit_scale", None))
        self.model, self.decoder, self.head = model, decoder, head

    def select(self, idx) -> None:
        self.cache.batch_select_indices(idx)
        self.attn = self.attn[idx]

    def step(self, ids, pos):
        import torch

        self.attn = torch.cat([self.attn, torch.ones_like(self.attn[:, :1])], dim=1)
        if self.plain:
            out = self.decoder(input_ids=ids, attention_mask=self.attn, position_ids=pos, cache=self.cache, use_cache=True)
            return self.head(out.last_hidden_state[:, -1, :])
        out = self.model(input_ids=ids, attention_mask=self.attn, position_ids=pos, cache=self.cache, use_cache=True)
        return out.logits[:, -1, :]


class _StaticDecoder:
    """Decode steps for Llama/Qwen2/Qwen3-style text decoders, written out with a preallocated KV
    cache and the q|k|v and gate|up projections fused into one matmul each: a decode step of a small
    model is bound by the number of tensor ops, and this does about half of HF's (no cache
    concatenation, no mask rebuilding, no module dispatch). Same math as the modules (RMSNorm in
    float32, rotary embedding, GQA attention over the prefix and the tokens so far); HFEngine checks
    it against the model's forward once per module before trusting it. `build` returns None for
    anything it does not recognise (other block types, sliding windows, dynamic RoPE, biases in o/mlp)."""

    @classmethod
    def build(cls, model, cache, attn, max_new: int):
        try:
            dec = model.get_decoder()
            head = model.get_output_embeddings()
            layers = list(dec.layers)
            rope = dec.rotary_emb
            cfg = dec.config
        except AttributeError:
            return None
        text_cfg = getattr(model.config, "text_config", model.config)
        if (dec is model or head is None or not layers or getattr(rope, "rope_type", None) not in ("default", "linear")
                or "mrope_section" in (getattr(cfg, "rope_parameters", None) or {})
                or getattr(text_cfg, "final_logit_softcapping", None) or getattr(text_cfg, "logit_scale", None)
                or any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or []))
                or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
                or len(getattr(cache, "layers", [])) != len(layers)):
            return None
        for layer in layers:
            at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if (at is None or mlp is None or not all(hasattr(at, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
                    or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
                    or type(mlp.act_fn).__name__ not in ("SiLUActivation", "SiLU")
                    or len({at.q_proj.bias is None, at.k_proj.bias is None, at.v_proj.bias is None}) > 1
                    or at.o_proj.bias is not None or mlp.down_proj.bias is not None
                    or mlp.gate_proj.bias is not None or mlp.up_proj.bias is not None
                    or getattr(at, "sliding_window", None)
                    or not all(hasattr(n, "variance_epsilon") for n in (layer.input_layernorm, layer.post_attention_layernorm))):
                return None
        return cls(dec, head, layers, cache, attn, max_new)

    def __init__(self, dec, head, layers, cache, attn, max_new: int):
        import torch

        self.dec, self.head, self.layers = dec, head, layers
        self.head_dim = layers[0].self_attn.head_dim
        self.scaling = [l.self_attn.scaling for l in layers]
        self.qkv, self.splits, self.gate_up, self.inter = [], [], [], []
        for l in layers:
            at = l.self_attn
            ws = [at.q_proj.weight, at.k_proj.weight, at.v_proj.weight]
            bs = [at.q_proj.bias, at.k_proj.bias, at.v_proj.bias]
            self.qkv.append((torch.cat(ws), torch.cat(bs) if all(b is not None for b in bs) else None))
            self.splits.append([w.shape[0] for w in ws])
            self.gate_up.append(torch.cat([l.mlp.gate_proj.weight, l.mlp.up_proj.weight]))
            self.inter.append(l.mlp.gate_proj.weight.shape[0])
        rows, prefix = attn.shape
        self.t = prefix                                    # next cache slot
        self.mask = torch.zeros((rows, prefix + max_new), dtype=torch.bool, device=attn.device)
        self.mask[:, :prefix] = attn.bool()
        self.keys, self.values = [], []
        for layer_cache in cache.layers:
            k, v = layer_cache.keys, layer_cache.values       # [rows, kv_heads, prefix, head_dim]
            kb = k.new_zeros((k.shape[0], k.shape[1], prefix + max_new, k.shape[3]))
            vb = v.new_zeros((v.shape[0], v.shape[1], prefix + max_new, v.shape[3]))
            kb[:, :, :prefix] = k
            vb[:, :, :prefix] = v
            self.keys.append(kb)
            self.values.append(vb)

    @staticmethod
    def _rms(x, norm):
        import torch

        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        return norm.weight * h.to(dtype)

    @staticmethod
    def _rotate(x, cos, sin):
        import torch

        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def select(self, idx) -> None:
        self.mask = self.mask[idx]
        self.keys = [k[idx] for k in self.keys]
        self.values = [v[idx] for v in self.values]

    def step(self, ids, pos):
        import torch.nn.functional as F

        rows, t, d = ids.shape[0], self.t, self.head_dim
        h = self.dec.embed_tokens(ids[:, 0])                                    # [rows, hidden]
        cos, sin = self.dec.rotary_emb(h, pos)                                  # [rows, 1, d]
        self.mask[:, t] = True
        mask = self.mask[:, None, None, :t + 1]
        for i, layer in enumerate(self.layers):
            at = layer.self_attn
            w, b = self.qkv[i]
            q, k, v = F.linear(self._rms(h, layer.input_layernorm), w, b).split(self.splits[i], dim=-1)
            q, k, v = q.view(rows, -1, d), k.view(rows, -1, d), v.view(rows, -1, d)
            if getattr(at, "q_norm", None) is not None:
                q, k = self._rms(q, at.q_norm), self._rms(k, at.k_norm)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)            # [rows, heads, d]
            self.keys[i][:, :, t] = k
            self.values[i][:, :, t] = v
            o = F.scaled_dot_product_attention(q[:, :, None], self.keys[i][:, :, :t + 1], self.values[i][:, :, :t + 1],
                                               attn_mask=mask, scale=self.scaling[i], enable_gqa=True)
            h = h + at.o_proj(o.reshape(rows, -1))
            gu = F.linear(self._rms(h, layer.post_attention_layernorm), self.gate_up[i])
            n = self.inter[i]
            h = h + layer.mlp.down_proj(F.silu(gu[:, :n]) * gu[:, n:])
        self.t = t + 1
        return self.head(self._rms(h, self.dec.norm))


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

    enc = encode_prompts(processor, [prompt], [images])
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    n_prompt = enc["input_ids"].shape[1]
    ids = torch.cat([enc["input_ids"], torch.tensor([token_ids], device=device)], dim=1)
    attn = torch.ones_like(ids)
    # per-token inputs of the prompt (Gemma3's token_type_ids, Qwen's mm_token_type_ids) cover the
    # completion too: text, 0
    extra = {k: (torch.cat([v, v.new_zeros((1, len(token_ids)))], dim=1)
                 if v.ndim == 2 and v.shape[1] == n_prompt and k.endswith("token_type_ids") else v)
             for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
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

