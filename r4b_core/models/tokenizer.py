"""The tiny model's tokenizer and the served chat template.

`train_tokenizer(texts, vocab_size)` trains a byte-level BPE tokenizer on a corpus (the synthetic
data's questions, reasoning traces and answers) and wraps it as a transformers tokenizer that
`save_pretrained` writes and both transformers and vLLM load. Design choices, each for a reason:

- byte-level BPE: every string encodes, nothing maps to <unk>;
- every digit is its own token: numbers are compared digit by digit by the tiny model, and a
  number never merges with its neighbours;
- runs of newlines are isolated pre-tokens, so "\\n\\n" is the same single token at the end of a
  forced prefix ("<think>\\n\\n</think>\\n\\n") and inside a full SFT transcript; this is what makes
  a forced prompt a token-exact prefix of the training sequence (tests/unit/test_tokenizer.py);
- `<|im_start|>`, `<|im_end|>` (EOS), `<|endoftext|>` (pad) and `<image>` are special tokens;
  `<think>` / `</think>` are ordinary added tokens (as in Qwen3) so they survive decoding with
  `skip_special_tokens=True`.

`chat_template()` is the Jinja template the model is saved and served with. For a user turn it
renders exactly `modes.chat_prompt(...)` and takes `thinking_mode` = auto | long | short (the
R-4B model card), with Qwen3's `enable_thinking` boolean as an alias. All strings come from
`r4b_core.modes`.
"""

from __future__ import annotations

import json
from typing import Iterable

from r4b_core import modes

PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [PAD_TOKEN, modes.IM_START, modes.IM_END, modes.IMAGE_TOKEN]
THINK_TOKENS = [modes.THINK_OPEN, modes.THINK_CLOSE]
IMAGE_PART_TYPES = ("image", "image_url", "input_image")


def _lit(s: str) -> str:
    """A Python string as a Jinja string literal (JSON quoting is valid Jinja)."""
    return json.dumps(s)


def _mode_header() -> str:
    """Jinja that sets `r4b_prefix` (mode name -> forced prefix) and `r4b_mode` from the request's
    `thinking_mode` (or Qwen3's `enable_thinking`), refusing unknown names; from modes.py."""
    prefixes = ", ".join(f"{_lit(name)}: {_lit(modes.GENERATION_PREFIX[mode])}"
                         for name, mode in modes.SERVING_MODE_NAMES.items())
    allowed = ", ".join(modes.SERVING_MODE_NAMES)
    long_name = next(n for n, m in modes.SERVING_MODE_NAMES.items() if m is modes.Mode.THINK)
    short_name = next(n for n, m in modes.SERVING_MODE_NAMES.items() if m is modes.Mode.NO_THINK)
    auto_name = next(n for n, m in modes.SERVING_MODE_NAMES.items() if m is modes.Mode.AUTO)
    return (
        "{%- set r4b_prefix = {" + prefixes + "} -%}\n"
        "{%- if thinking_mode is defined and thinking_mode is not none -%}"
        "{%- set r4b_mode = thinking_mode | string | lower -%}"
        "{%- elif enable_thinking is defined and enable_thinking is not none -%}"
        "{%- set r4b_mode = " + _lit(long_name) + " if enable_thinking else " + _lit(short_name) + " -%}"
        "{%- else -%}{%- set r4b_mode = " + _lit(auto_name) + " -%}{%- endif -%}\n"
        "{%- if r4b_mode not in r4b_prefix -%}"
        "{{ raise_exception('unknown thinking_mode ' ~ r4b_mode ~ '; allowed: " + allowed + "') }}"
        "{%- endif -%}\n"
    )


THINKING_BASE_OPEN = "{#- r4b: the model's own template follows -#}"
THINKING_BASE_CLOSE = "{#- r4b: end of the model's own template -#}"


def thinking_template(base: str) -> str:
    """A model's own chat template with `thinking_mode` added (the served template of a family
    model): the model renders the turns and its generation prompt, the mode's forced prefix
    follows. `ChatFormat` reads the base back out, so prompts are never prefixed twice. Qwen3's
    `enable_thinking` is an alias of the mode, so the base does not see it."""
    return ("{#- r4b thinking_mode = " + ", ".join(modes.SERVING_MODE_NAMES) + " around the model's template -#}\n"
            + _mode_header()
            # the mode is ours to render: a base that reads Qwen3's `enable_thinking` (an alias of the
            # mode here) sees it unset, as if not passed, or its own think block would follow ours
            + "{%- set enable_thinking = r4b_unset_name -%}\n"
            + THINKING_BASE_OPEN + base + THINKING_BASE_CLOSE
            + "{%- if add_generation_prompt -%}{{ r4b_prefix[r4b_mode] }}{%- endif -%}")


def images_as_text(base: str, image_token: str) -> str:
    """A text LM's chat template taking a VLM's messages (a model composed from a tower and an LM):
    each message's content parts become one string, the image token and a newline per image, then
    the texts joined by newlines (the user turn of r4b's own template and of vLLM's string-content
    format), so the LM's own template, which reads `content` as a string, renders the turns."""
    image_types = "(" + ", ".join(_lit(t) for t in IMAGE_PART_TYPES) + ")"
    return (
        "{#- r4b: the language model's template follows, each message's image parts as text -#}\n"
        "{%- set r4b_flat = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is string or message['content'] is none -%}"
        "{%- set r4b_flat.messages = r4b_flat.messages + [message] -%}"
        "{%- else -%}"
        "{%- set r4b_parts = namespace(images='', text=[]) -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] in " + image_types + " -%}"
        "{%- set r4b_parts.images = r4b_parts.images ~ " + _lit(image_token + "\n") + " -%}"
        "{%- elif part['type'] == 'text' -%}{%- set r4b_parts.text = r4b_parts.text + [part['text']] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set r4b_flat.messages = r4b_flat.messages + "
        "[dict(message, content=r4b_parts.images ~ r4b_parts.text | join(" + _lit("\n") + "))] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = r4b_flat.messages -%}\n"
        + base
    )


def served_chat_template(model_dir) -> str:
    """The template a model folder is served with: r4b's own for r4b's models (and folders without
    one), else the folder's own template with `thinking_mode` added."""
    from pathlib import Path

    path = Path(model_dir) / "chat_template.jinja"
    base = path.read_text() if path.is_file() else ""
    if not base.strip() or "r4b chat template" in base or THINKING_BASE_OPEN in base:
        return base if THINKING_BASE_OPEN in base else chat_template()
    return thinking_template(base)


def chat_template() -> str:
    """The Jinja chat template; built from modes.py so no tag string is written twice."""
    allowed = ", ".join(modes.SERVING_MODE_NAMES)
    image_types = "(" + ", ".join(_lit(t) for t in IMAGE_PART_TYPES) + ")"
    return (
        "{#- r4b chat template: renders r4b_core.modes.chat_prompt; thinking_mode = " + allowed + " -#}\n"
        + _mode_header() +
        "{%- for message in messages -%}"
        "{{ " + _lit(modes.IM_START) + " ~ message['role'] ~ " + _lit("\n") + " }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}"
        "{%- for part in message['content'] if part['type'] in " + image_types + " -%}"
        "{{ " + _lit(modes.IMAGE_TOKEN + "\n") + " }}"
        "{%- endfor -%}"
        "{%- set ns = namespace(text=[]) -%}"
        "{%- for part in message['content'] if part['type'] == 'text' -%}"
        "{%- set ns.text = ns.text + [part['text']] -%}"
        "{%- endfor -%}"
        "{{ ns.text | join(" + _lit("\n") + ") | trim }}"
        "{%- endif -%}"
        "{{ " + _lit(modes.IM_END + "\n") + " }}"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}"
        "{{ " + _lit(modes.IM_START + "assistant\n") + " ~ r4b_prefix[r4b_mode] }}"
        "{%- endif -%}"
    )


def _markup_corpus() -> list[str]:
    """Transcripts in the chat format, so BPE always learns the markup's own merges ("\\n\\n")."""
    out = []
    for mode in (None, modes.Mode.AUTO, modes.Mode.THINK, modes.Mode.NO_THINK):
        out.append(modes.chat_prompt("What is 1 + 2?", num_images=1, mode=mode))
    out.append(modes.thinking_target("1 + 2 = 3", "3") + modes.IM_END)
    out.append(modes.direct_target("3") + modes.IM_END)
    return out * 8


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train the byte-level BPE tokenizer; returns a `PreTrainedTokenizerFast` with the chat
    template set. `vocab_size` counts every token, added ones included."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from r4b_core.errors import R4BError

    # 256 byte symbols + our added tokens must fit, plus some room for merges.
    minimum = 256 + len(SPECIAL_TOKENS) + len(THINK_TOKENS) + 16
    if vocab_size < minimum:
        raise R4BError(f"model.tiny.vocab_size: {vocab_size} is too small for a byte-level tokenizer; "
                       f"use at least {minimum}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(texts)
    if not corpus:
        raise R4BError("train_tokenizer: the corpus is empty; pass the training texts (questions, traces, answers)")
    tok.train_from_iterator(corpus + _markup_corpus(), trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=modes.IM_END,
        pad_token=PAD_TOKEN,
        model_input_names=["input_ids", "attention_mask"],
        chat_template=chat_template(),
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
