"""The rollout protocol shared by curation, BPO and evaluation.

An engine turns `GenerationRequest`s (prompt text rendered in the served model's chat format,
`engine.chat.prompt(question, n_images, mode)`, images, a forced mode, sampling settings) into
`Completion`s carrying token ids, text, per-token logprobs, the finish reason and the policy
version that produced them. `hf` runs in-process; `vllm` talks to a
vLLM server (the sidecar).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from r4b_core.errors import R4BError
from r4b_core.modes import Mode

if TYPE_CHECKING:
    from r4b_core.models.chat import ChatFormat


class PromptTooLong(R4BError):
    """Requests whose prompt leaves no room for their max_new_tokens within the model's positions;
    `keys` names them, so a caller can drop them and go on (curation rejects their items)."""

    def __init__(self, message: str, keys: list[str]):
        super().__init__(message)
        self.keys = keys


@dataclass
class GenerationRequest:
    prompt: str                      # full prompt text incl. the generation prefix of `mode` (engine.chat.prompt)
    images: list[Any] = field(default_factory=list)   # PIL images or paths
    mode: Mode = Mode.AUTO
    max_new_tokens: int = 64
    temperature: float = 0.0         # 0 = greedy
    n: int = 1                       # samples for this prompt
    seed: int | None = None
    key: str = ""                    # caller's id (record id), copied onto completions
    # most reasoning tokens before the think block is closed with modes.THINK_END (the rule of
    # r4b_core/assets/r4b_thinking.py, as served); None = no budget. A prompt that closed the block
    # (no-think) is never forced.
    thinking_budget: int | None = None


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
    """What curation, evaluation and BPO use. Curation and evaluation only generate; BPO also
    pushes its weights after each update and reads how the push went. An in-process engine shares
    the trainer's module, so its pushes are free and its checks trivially pass (empty figures)."""

    policy_version: int
    # the served model's prompt format: requests are rendered with it (its template, image
    # placeholder, end of turn)
    chat: ChatFormat
    # the last push: its timings and, once checked, verify_s and max_abs_diff ({} if nothing to time)
    last_sync: dict[str, float]
    # the check of the previous push that the last `generate` finished (overlapped verification),
    # with wait_s = how long the finished rollouts waited for it; None when there was none
    last_rollout_verify: dict[str, float] | None
    # every passed push check not yet reported: {version, verify_s, max_abs_diff}; readers empty it
    sync_checks: list[dict]
    # how the last push reached the served model ("in place", or why another path ran); "" if none
    reload_path: str

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """All completions of all requests; request i's n samples are consecutive."""
        ...

    def update_weights(self, model_or_path: Any, version: int) -> None:
        """Serve the given weights from now on; raise if that cannot be verified."""
        ...

    def push_weights(self, model_or_path: Any) -> dict[str, float]:
        """Serve the given weights from now on, unverified (the next rollouts' logprobs are the
        check: `bpo.sync_verify: rollout`); returns the push's timings."""
        ...

    def wait_verified(self) -> dict[str, float] | None:
        """Finish a pending push check, if any (raise on a mismatch); its figures, else None."""
        ...

    def close(self) -> None:
        ...
