"""Prompts in the model's own chat format, with the bi-mode prefix from modes.py.

    fmt = ChatFormat.of(processor)
    fmt.prompt("What is 7 + 5?", num_images=1, mode=Mode.THINK)   # the family's user turn + "<think>\\n"
    fmt.prompt(question, 1, mode=None) + target + fmt.end_of_turn   # an SFT transcript
    fmt.count_images(prompt)                                        # placeholders in a rendered prompt

Every family renders a user turn its own way (Qwen: `<|vision_start|><|image_pad|><|vision_end|>`,
Gemma3: `<start_of_image>`, SmolVLM: `User:<image>…<end_of_utterance>`), so a prompt is the model's
chat template applied to one user message (images first, then the question) with the generation
prompt, followed by the mode's forced prefix (modes.generation_prefix). r4b's own template (the
tiny model's) already takes the mode as `thinking_mode`; for it the prompt is `modes.chat_prompt`,
the same string, so both paths give the token ids the model was trained on.

`end_of_turn` is the token that ends an assistant turn, read from the model's generation config
(its EOS ids) as the template renders it after an assistant message: what SFT targets end with
and what generation stops at.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from r4b_core import modes
from r4b_core.models.tokenizer import THINKING_BASE_CLOSE, THINKING_BASE_OPEN

R4B_TEMPLATE_MARK = "r4b chat template"      # first line of models/tokenizer.chat_template()
_PROBE = "\x00r4b-probe\x00"


def _messages(question: str, num_images: int, answer: str | None = None, system: str | None = None) -> list[dict]:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": question}]
    msgs = ([{"role": "system", "content": [{"type": "text", "text": system}]}] if system else [])
    msgs.append({"role": "user", "content": content})
    if answer is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return msgs


@dataclass(frozen=True)
class ChatFormat:
    template: str | None          # the model's chat template (None: r4b's own format)
    image_placeholder: str        # what one image part renders to (counted in prompts)
    end_of_turn: str              # the token string that closes an assistant turn
    tokenizer: object = field(default=None, compare=False, repr=False)   # renders the template

    @classmethod
    def of(cls, processor, generation_config=None) -> ChatFormat:
        """The format of a processor (or tokenizer) and, for the end of turn, the model's generation config."""
        tok = getattr(processor, "tokenizer", processor)
        template = getattr(processor, "chat_template", None) or getattr(tok, "chat_template", None)
        if template and THINKING_BASE_OPEN in template:          # a served folder: the model's own inside
            template = template.split(THINKING_BASE_OPEN, 1)[1].split(THINKING_BASE_CLOSE, 1)[0]
        if not template or R4B_TEMPLATE_MARK in template:
            return cls(None, modes.IMAGE_TOKEN, modes.IM_END, tok)
        fmt = cls(template, "", "", tok)
        one, none = fmt._render(_PROBE, 1), fmt._render(_PROBE, 0)
        head = one.split(_PROBE)[0]
        placeholder = head[len(_common_prefix(head, none.split(_PROBE)[0])):].strip("\n") or head
        return cls(template, placeholder, _end_of_turn(fmt, tok, generation_config), tok)

    def _render(self, question: str, num_images: int, answer: str | None = None, system: str | None = None,
                generation: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            _messages(question, num_images, answer, system), chat_template=self.template, tokenize=False,
            add_generation_prompt=generation)

    def prompt(self, question: str, num_images: int = 1, mode: modes.Mode | str | None = modes.Mode.AUTO,
               system: str | None = None) -> str:
        """The prompt text up to and including `mode`'s forced prefix (mode=None: up to the
        assistant header, the SFT prompt whose target brings its own think block)."""
        if self.template is None:
            return modes.chat_prompt(question, num_images, mode, system=system)
        text = self._render(question.strip(), num_images, system=system)
        return text + (modes.generation_prefix(mode) if mode is not None else "")

    def count_images(self, prompt: str) -> int:
        return prompt.count(self.image_placeholder)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _end_of_turn(fmt: ChatFormat, tok, generation_config) -> str:
    """The EOS token the template writes right after an assistant message's text."""
    rendered = fmt._render(_PROBE, 0, answer="ANSWER", generation=False)
    after = rendered.split("ANSWER", 1)[1] if "ANSWER" in rendered else ""
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    eos = eos if eos is not None else tok.eos_token_id
    candidates = [tok.convert_ids_to_tokens(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos])]
    found = [(after.find(c), c) for c in candidates if c and c in after]
    if found:
        return min(found)[1]
    return tok.eos_token or candidates[0]
