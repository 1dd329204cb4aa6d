"""vLLM worker extension used by the r4b sidecar (`--worker-extension-cls
r4b_vllm_worker.R4BWorkerExtension`; this folder is on the server's PYTHONPATH).

After `POST /collective_rpc {"method": "reload_weights", ...}` vLLM re-processes every layer whose
weights it loaded. A tied output layer (Qwen3-4B ties it to the input embedding) is never loaded
under its own name, so on CPU it keeps the matrix it packed at start-up and the server silently
samples from stale logits. `r4b_refresh_output_layer` re-ties the head to the (new) embedding
and re-packs it. Call it through `/collective_rpc` after every reload; it is cheap and correct for
untied models too. `r4b_reload_weights(weights_path)` does the reload and the refresh in one call.

The reload itself (`r4b_reload_weights`) takes a fast path when it can: the trainer writes the
weights in transformers' checkpoint layout (models/loading.saved_state_dict), the worker maps the
names with the model's own `hf_to_vllm_mapper` (as its `load_weights` does), fills the real rows of
vocabularies vLLM padded (embedding, LM head), concatenates the parts of packed layers (q/k/v ->
qkv_proj, gate/up -> gate_up_proj, from the model's `packed_modules_mapping`), copies every tensor
into its parameter in place, and re-packs the linear layers whose weight vLLM's CPU backend keeps
only inside a oneDNN handle. That is what vLLM's `reload_weights` does for this case, without its
per-layer meta-device restore and deferred loaders (measured on the tiny VLM: 26-29 ms -> 9-10 ms).
Anything the fast path does not recognise (a name it cannot place, a shape it cannot fill, a
parameter left unwritten) sends the call down vLLM's `reload_weights` instead, and says why in the
reply; the trainer's probe verification checks the result either way.
"""


def _has_module(model, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


class R4BWorkerExtension:
    def r4b_reload_weights(self, weights_path: str, fast: bool = True):
        """The worker's in-place `reload_weights` and `r4b_refresh_output_layer` in one RPC: a
        weight sync pays one HTTP round trip for both (the sync is on BPO's critical path)."""
        import time

        t0 = time.perf_counter()
        why_not = self._r4b_reload_in_place(weights_path) if fast else "fast path off"
        if why_not:
            self.reload_weights(weights_path=weights_path)
        t1 = time.perf_counter()
        out = self.r4b_refresh_output_layer()
        # server-side seconds, so a sync's cost can be split from the HTTP round trip
        out.update(reload_s=t1 - t0, refresh_s=time.perf_counter() - t1, fast=not why_not, slow_reason=why_not)
        return out

    def _r4b_reload_in_place(self, weights_path: str) -> str:
        """Load the safetensors in `weights_path` into the served model in place; returns "" on
        success, else why the fast path does not apply (nothing has been half-written then: every
        tensor is placed and checked before the first copy)."""
        from pathlib import Path

        import torch
        from safetensors.torch import load_file

        files = sorted(Path(weights_path).glob("*.safetensors"))
        if not files:
            return f"no *.safetensors in {weights_path}"
        tensors: dict = {}
        for f in files:
            tensors.update(load_file(str(f)))
        model = self.model_runner.get_model()
        # checkpoint names -> the served model's module names, as the model's own loader maps them
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        if mapper is not None:
            mapped = {}
            for key, t in tensors.items():
                name = mapper.map_name(key)
                if name is not None:
                    mapped[name] = t
            tensors = mapped
        # the model's fused layers; towers inside it (a SigLIP encoder) may fuse q/k/v without the
        # model declaring it, so the usual fusions count too wherever the unfused module is absent
        packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
        packed.update(getattr(model, "packed_modules_mapping", None) or {})
        part_of = {part: (name, i) for name, parts in packed.items() for i, part in enumerate(parts)}
        parts_by_target: dict = {}
        flat: dict = {}
        for key, t in tensors.items():
            module_path, _, leaf = key.rpartition(".")
            parent, _, module_name = module_path.rpartition(".")
            if module_name in part_of and not _has_module(model, module_path):
                name, i = part_of[module_name]
                parts_by_target.setdefault((f"{parent}.{name}" if parent else name, leaf, name), {})[i] = t
            else:
                flat[key] = t
        for (module_path, leaf, name), parts in parts_by_target.items():
            if sorted(parts) != list(range(len(packed[name]))):
                return f"{module_path}.{leaf}: got parts {sorted(parts)} of {packed[name]}"
            flat[f"{module_path}.{leaf}"] = torch.cat([parts[i] for i in range(len(parts))], dim=0)

        plan = []                      # (module, leaf, parameter, tensor, how)
        for key, t in flat.items():
            module_path, _, leaf = key.rpartition(".")
            try:
                module = model.get_submodule(module_path)
            except AttributeError:
                continue               # a checkpoint tensor the served model has no use for (vLLM skips it too)
            param = getattr(module, leaf, None)
            if not isinstance(param, torch.Tensor):
                continue
            if tuple(param.shape) == tuple(t.shape):
                plan.append((module, leaf, param, t, "copy"))
            elif leaf == "weight" and param.numel() == 0 and hasattr(module, "cpu_linear"):
                plan.append((module, leaf, param, t, "repack"))     # CPU linear: weight lives in the handle
            elif (getattr(module, "org_vocab_size", None) == t.shape[0] and t.ndim == param.ndim
                  and tuple(t.shape[1:]) == tuple(param.shape[1:])):
                plan.append((module, leaf, param, t, "rows"))       # vocabulary padded by vLLM: the real rows
            else:
                return f"{key}: checkpoint shape {tuple(t.shape)} does not fit parameter {tuple(param.shape)}"
        written = {id(p) for _, _, p, _, _ in plan}
        unwritten = [n for n, p in model.named_parameters() if id(p) not in written]
        if unwritten:
            return f"{len(unwritten)} parameter(s) not in the checkpoint, e.g. {unwritten[0]}"

        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        with torch.no_grad():
            for module, leaf, param, t, how in plan:
                if how == "copy":
                    param.copy_(t)
                elif how == "rows":
                    param[:t.shape[0]].copy_(t)
                else:
                    # what UnquantizedLinearMethod.process_weights_after_loading does on CPU
                    module.weight = torch.nn.Parameter(t.to(param.dtype).contiguous(), requires_grad=False)
                    dispatch_cpu_unquantized_gemm(module, remove_weight=True)
        # what vLLM's reload_weights clears after loading: state computed from the old weights
        self.model_runner.reset_encoder_cache()
        self.model_runner.reset_mm_cache()
        return ""

    def r4b_refresh_output_layer(self):
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
        from vllm.platforms import current_platform

        model = self.model_runner.get_model()
        text_config = self.model_runner.model_config.hf_text_config
        tied = bool(getattr(text_config, "tie_word_embeddings", False))
        heads = [m for m in model.modules() if isinstance(m, ParallelLMHead)]
        embeddings = [m for m in model.modules() if type(m) is VocabParallelEmbedding]
        retied = 0
        for head in heads:
            if tied and len(embeddings) == 1 and head.weight is not embeddings[0].weight:
                head.weight = embeddings[0].weight
                retied += 1
            if current_platform.is_cpu():
                from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

                dispatch_cpu_unquantized_gemm(head, remove_weight=False)
        return {"heads": len(heads), "tied": tied, "retied": retied}
