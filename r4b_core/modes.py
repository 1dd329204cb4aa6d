"""The bi-mode contract: the one place that knows the think / no-think strings.

Qwen3 style, as R-4B uses it (see RECIPE.md):

    thinking target   "<think>\\n{reasoning}\\n</think>\\n\\n{answer}"
    direct target     "<think>\\n\\n</think>\\n\\n{answer}"

Generation prefixes, appended after the assistant header:

    auto      "<think>"                      the model decides (next token "\\n" or "\\n\\n")
    think     "<think>\\n"                   forced reasoning
    no_think  "<think>\\n\\n</think>\\n\\n"  forced direct answer

SFT data, BPO rollouts, evaluation prompts and the served chat template all build their strings
here, so that the token ids of a forced prefix are the ids the model saw during training.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# what closes a think block that has reasoning, up to the answer: `reasoning + THINK_END + answer`;
# a thinking budget that runs out closes the block with exactly this string (serving)
THINK_END = "\n" + THINK_CLOSE + "\n\n"

# Chat markup (ChatML, as Qwen3). The image placeholder is expanded by the processor.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"


class Mode(str, enum.Enum):
    AUTO = "auto"
    THINK = "think"
    NO_THINK = "no_think"

    @classmethod
    def parse(cls, value: str | Mode) -> Mode:
        """Accept our names and the R-4B serving names (long / short)."""
        if isinstance(value, Mode):
            return value
        aliases = {"long": cls.THINK, "short": cls.NO_THINK, "no-think": cls.NO_THINK,
                   "nothink": cls.NO_THINK, "thinking": cls.THINK}
        key = str(value).strip().lower()
        if key in aliases:
            return aliases[key]
        try:
            return cls(key)
        except ValueError:
            allowed = ", ".join(m.value for m in cls) + " (or long / short)"
            raise ValueError(f"unknown thinking mode {value!r}; allowed: {allowed}") from None


GENERATION_PREFIX: dict[Mode, str] = {
    Mode.AUTO: THINK_OPEN,
    Mode.THINK: THINK_OPEN + "\n",
    Mode.NO_THINK: THINK_OPEN + "\n\n" + THINK_CLOSE + "\n\n",
}

# R-4B model card names for the served `thinking_mode` chat-template kwarg.
SERVING_MODE_NAMES: dict[str, Mode] = {"auto": Mode.AUTO, "long": Mode.THINK, "short": Mode.NO_THINK}


def generation_prefix(mode: Mode | str) -> str:
    return GENERATION_PREFIX[Mode.parse(mode)]


def thinking_target(reasoning: str, answer: str) -> str:
    """SFT target of a reasoning item. The reasoning must be non-empty."""
    reasoning = reasoning.strip()
    if not reasoning:
        raise ValueError("thinking_target needs a non-empty reasoning trace; use direct_target")
    return f"{THINK_OPEN}\n{reasoning}{THINK_END}{answer.strip()}"


def direct_target(answer: str) -> str:
    """SFT target of a non-reasoning item: the think block is present and empty."""
    return f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n{answer.strip()}"


def target_for(answer: str, reasoning: str | None) -> str:
    return thinking_target(reasoning, answer) if reasoning and reasoning.strip() else direct_target(answer)


def target_mode(target: str) -> Mode:
    """Which forced mode a target string starts with (THINK or NO_THINK)."""
    return Mode.NO_THINK if target.startswith(GENERATION_PREFIX[Mode.NO_THINK]) else Mode.THINK


def user_message(question: str, num_images: int = 1) -> str:
    """The user turn's content: one image placeholder per image, then the question."""
    return (IMAGE_TOKEN + "\n") * num_images + question.strip()


def chat_prompt(question: str, num_images: int = 1, mode: Mode | str | None = Mode.AUTO,
                system: str | None = None) -> str:
    """Full prompt text up to and including the generation prefix of `mode`.

    mode=None stops after the assistant header (the SFT prompt, whose target brings its own
    `<think>` block). The Jinja chat template in models/tokenizer.py renders the same string.
    """
    parts = []
    if system:
        parts.append(f"{IM_START}system\n{system}{IM_END}\n")
    parts.append(f"{IM_START}user\n{user_message(question, num_images)}{IM_END}\n")
    parts.append(f"{IM_START}assistant\n")
    if mode is not None:
        parts.append(generation_prefix(mode))
    return "".join(parts)


@dataclass(frozen=True)
class ParsedResponse:
    """What a model said, split into its parts.

    mode: THINK when a non-empty reasoning block was produced, NO_THINK when the block was empty
    or absent. closed: the think block was closed (False for truncated or malformed output, in
    which case `answer` is empty: a run that never finished thinking has not answered).
    """

    mode: Mode
    reasoning: str
    answer: str
    closed: bool


def parse_response(text: str, prefix_mode: Mode | str | None = None) -> ParsedResponse:
    """Split a completion into (mode used, reasoning, answer).

    `text` is what the model generated. If it was generated after a forced prefix, pass
    `prefix_mode` and the prefix is put back in front before parsing, so the same function
    handles auto, forced and full transcripts. Robust to: missing open tag, missing close tag
    (truncation), repeated tags, stray whitespace, and an empty string.
    """
    if prefix_mode is not None:
        text = generation_prefix(prefix_mode) + text
    text = text.replace(IM_END, "")
    stripped = text.lstrip()
    if not stripped.startswith(THINK_OPEN):
        # No think block at all: a plain answer (or a stray close tag we drop).
        if THINK_CLOSE in stripped:
            before, _, after = stripped.partition(THINK_CLOSE)
            reasoning, answer = before.strip(), after.strip()
            return ParsedResponse(Mode.THINK if reasoning else Mode.NO_THINK, reasoning, answer, True)
        return ParsedResponse(Mode.NO_THINK, "", stripped.strip(), True)
    body = stripped[len(THINK_OPEN):]
    if THINK_CLOSE not in body:
        reasoning = body.replace(THINK_OPEN, "").strip()
        return ParsedResponse(Mode.THINK if reasoning else Mode.NO_THINK, reasoning, "", False)
    reasoning, _, answer = body.partition(THINK_CLOSE)
    reasoning = reasoning.replace(THINK_OPEN, "").strip()
    # A second think block after the answer is junk, not part of the answer.
    answer = answer.split(THINK_OPEN)[0].replace(THINK_CLOSE, "").strip()
    return ParsedResponse(Mode.THINK if reasoning else Mode.NO_THINK, reasoning, answer, True)


def strip_thinking(text: str) -> str:
    """The answer part of a completion, as scored by rewards and evaluation."""
    return parse_response(text).answer
