"""vLLM worker extension used by the r4b sidecar (`--worker-extension-cls
r4b_vllm_worker.R4BWorkerExtension`; this folder is on the server's PYTHONPATH).

After `POST /collective_rpc {"method": "reload_weights", ...}` vLLM re-processes every layer whose
weights it loaded. A tied output layer (Qwen3-4B ties it to the input embedding) is never loaded
under its own name, so on CPU it keeps the matrix it packed at start-up and the server silently
samples from stale logits. `r4b_refresh_output_layer` re-ties the head to the (new) embedding
and re-packs it. Call it through `/collective_rpc` after every reload; it is cheap and correct for
untied models too. `r4b_reload_weights(weights_path)` does the reload and the refresh in one call.
"""


class R4BWorkerExtension:
    def r4b_reload_weights(self, weights_path: str):
        """The worker's in-place `reload_weights` and `r4b_refresh_output_layer` in one RPC: a
        weight sync pays one HTTP round trip for both (the sync is on BPO's critical path)."""
        import time

        t0 = time.perf_counter()
        self.reload_weights(weights_path=weights_path)
        t1 = time.perf_counter()
        out = self.r4b_refresh_output_layer()
        # server-side seconds, so a sync's cost can be split from the HTTP round trip
        out.update(reload_s=t1 - t0, refresh_s=time.perf_counter() - t1)
        return out

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
