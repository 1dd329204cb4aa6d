"""The rollout protocol shared by curation, BPO and evaluation.

An engine turns `GenerationRequest`s (prompt text built with modes.chat_prompt, images, a forced
mode, sampling settings) into `Completion`s carrying token ids, text, per-token logprobs, the
finish reason and the policy version that produced them. `hf` runs in-process; `vllm` talks to a
vLLM server (the sidecar).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from r4b_core.modes import Mode


@dataclass
class GenerationRequest:
    prompt: str                      # full prompt text incl. the generation prefix of `mode`
    images: list[Any] = field(default_factory=list)   # PIL images or paths
    mode: Mode = Mode.AUTO
    max_new_tokens: int = 64
    temperature: float = 0.0         # 0 = greedy
    n: int = 1                       # samples for this prompt
    seed: int | None = None
    key: str = ""                    # caller's id (record id), copied onto completions


@dataclass
class Completion:
    key: str
    mode: Mode                       # the mode that was forced (AUTO if none)
    text: str                        # generated text only (the forced prefix is not included)
    token_ids: list[int]
    logprobs: list[float]            # one per generated token, under the sampling distribution
    finish_reason: str               # "stop" (EOS / <|im_end|>) or "length"
    prompt_token_ids: list[int] = field(default_factory=list)
    policy_version: int = 0


@runtime_checkable
class RolloutEngine(Protocol):
    policy_version: int

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """All completions of all requests; request i's n samples are consecutive."""
        ...

    def update_weights(self, model_or_path: Any, version: int) -> None:
        """Serve the given weights from now on; raise if that cannot be verified."""
        ...

    def close(self) -> None:
        ...
