"""The tiny tokenizer and the chat template, and the token-id contract of the bi-mode format:
SFT sequences, forced-mode prompts and the served chat template share token ids up to the end of
the forced prefix, and the auto-mode decision is a single token."""

import pytest
from PIL import Image

from r4b_core import modes
from r4b_core.data.schema import Record
from r4b_core.errors import R4BError
from r4b_core.modes import Mode

THINKING = Record(id="t1", images=["a.png"], question="The bars show 17 and 25. What is 17 * 25 - 8?",
                  answer="417", answer_type="integer", category="math", label="reasoning",
                  reasoning="17 * 25 = 425\n425 - 8 = 417\n\nSo the result is 417.")
DIRECT = Record(id="d1", images=["b.png", "c.png"], question="  What colour is the square?  ", answer="red",
                category="perception", label="direct")
CORPUS = [THINKING.question, THINKING.answer, THINKING.reasoning, DIRECT.question, DIRECT.answer,
          "Step 1: 3 + 4 = 7\nStep 2: 7 * 2 = 14", "What number is shown in the top-left cell?"] * 30


@pytest.fixture(scope="module")
def tok():
    from r4b_core.models.tokenizer import train_tokenizer

    return train_tokenizer(CORPUS, 512)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def _messages(rec: Record, part_type="image"):
    images = [{"type": part_type, "image_url": {"url": "data:,"}} if part_type == "image_url" else {"type": part_type}
              for _ in rec.images]
    return [{"role": "user", "content": images + [{"type": "text", "text": rec.question}]}]


@pytest.mark.parametrize("rec", [THINKING, DIRECT], ids=["thinking", "direct"])
def test_sft_forced_and_template_share_token_ids(tok, rec):
    n = len(rec.images)
    target = rec.sft_target()
    forced_mode = modes.target_mode(target)
    assert forced_mode is (Mode.THINK if rec is THINKING else Mode.NO_THINK)
    sft = _ids(tok, modes.chat_prompt(rec.question, n, mode=None) + target + modes.IM_END)
    forced = _ids(tok, modes.chat_prompt(rec.question, n, mode=forced_mode))
    serving_name = {Mode.THINK: "long", Mode.NO_THINK: "short"}[forced_mode]
    templated = tok.apply_chat_template(_messages(rec), thinking_mode=serving_name, add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    assert sft[:len(forced)] == forced
    assert templated == forced
    # The forced prefix ends exactly where the target's answer (or reasoning) begins.
    prefix_len = len(_ids(tok, modes.generation_prefix(forced_mode)))
    assert tok.decode(forced[-prefix_len:]) == modes.generation_prefix(forced_mode)
    # Same with images expanded by the processor-style placeholder repetition: the prefix
    # property is about the text after the images, which the expansion does not touch.
    auto = _ids(tok, modes.chat_prompt(rec.question, n, mode=Mode.AUTO))
    auto_templated = tok.apply_chat_template(_messages(rec, "image_url"), thinking_mode="auto",
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
    assert auto_templated == auto
    assert sft[:len(auto)] == auto
    assert auto[-1] == tok.convert_tokens_to_ids(modes.THINK_OPEN)


def test_auto_mode_decision_is_one_token(tok):
    def first_after_think(rec):
        sft = _ids(tok, modes.chat_prompt(rec.question, len(rec.images), mode=None) + rec.sft_target())
        auto = _ids(tok, modes.chat_prompt(rec.question, len(rec.images), mode=Mode.AUTO))
        return sft[len(auto)]

    think_tok, direct_tok = first_after_think(THINKING), first_after_think(DIRECT)
    assert think_tok != direct_tok
    assert tok.decode([think_tok]) == "\n"
    assert tok.decode([direct_tok]) == "\n\n"
    # The no-think prefix after `<think>` is exactly three tokens: "\n\n", "</think>", "\n\n".
    tail = _ids(tok, modes.generation_prefix(Mode.NO_THINK))[1:]
    assert [tok.decode([t]) for t in tail] == ["\n\n", modes.THINK_CLOSE, "\n\n"]


def test_newline_runs_and_digits_are_isolated(tok):
    assert _ids(tok, "\n\n42") == _ids(tok, "\n\n") + _ids(tok, "42")
    assert _ids(tok, "x\n\ny") == _ids(tok, "x") + _ids(tok, "\n\n") + _ids(tok, "y")
    pieces = tok.convert_ids_to_tokens(_ids(tok, "1234567890"))
    assert pieces == list("1234567890")
    assert len(_ids(tok, "\n\n")) == 1 and len(_ids(tok, "\n")) == 1


@pytest.mark.parametrize("text", ["héllo wörld", "数学 题 123", "emoji 🙂🙃 ok", "tab\tand\r\nCRLF", "\x00\x07 ctl",
                                  "   leading and trailing   ", ""])
def test_byte_level_round_trip(tok, text):
    assert tok.decode(_ids(tok, text)) == text
    assert tok.unk_token_id is None or tok.unk_token_id not in _ids(tok, text)


def test_special_and_think_tokens(tok):
    for t in modes.IM_START, modes.IM_END, modes.IMAGE_TOKEN, "<|endoftext|>", modes.THINK_OPEN, modes.THINK_CLOSE:
        assert len(_ids(tok, t)) == 1, t
    assert tok.eos_token == modes.IM_END and tok.pad_token == "<|endoftext|>"
    assert tok.model_input_names == ["input_ids", "attention_mask"]
    ids = _ids(tok, modes.thinking_target("a", "b") + modes.IM_END)
    # think tags are ordinary added tokens: they survive skip_special_tokens, <|im_end|> does not.
    assert tok.decode(ids, skip_special_tokens=True) == modes.thinking_target("a", "b")
    assert len(tok) <= 512


def test_template_variants(tok):
    q = "What is 2 + 3?"
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]

    def render(**kw):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)

    assert render() == modes.chat_prompt(q, 1, Mode.AUTO)      # default: auto
    assert render(enable_thinking=True) == modes.chat_prompt(q, 1, Mode.THINK)
    assert render(enable_thinking=False) == modes.chat_prompt(q, 1, Mode.NO_THINK)
    assert render(thinking_mode="short", enable_thinking=True) == modes.chat_prompt(q, 1, Mode.NO_THINK)
    with pytest.raises(Exception, match="allowed: auto, long, short"):
        render(thinking_mode="medium")
    system = [{"role": "system", "content": "Be brief."}]
    text = tok.apply_chat_template(system + msgs, tokenize=False, add_generation_prompt=True, thinking_mode="long")
    assert text == modes.chat_prompt(q, 1, Mode.THINK, system="Be brief.")
    plain = [{"role": "user", "content": modes.user_message(q, 0)}]
    assert tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True) == modes.chat_prompt(q, 0)
    no_gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert no_gen == modes.chat_prompt(q, 1, mode=None).removesuffix(modes.IM_START + "assistant\n")


def test_save_and_reload_keeps_ids_and_template(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = modes.chat_prompt(THINKING.question, 1, None) + THINKING.sft_target() + modes.IM_END
    assert _ids(again, text) == _ids(tok, text)
    assert again.chat_template == tok.chat_template


def test_bad_sizes_and_empty_corpus():
    from r4b_core.models.tokenizer import train_tokenizer

    with pytest.raises(R4BError, match="vocab_size"):
        train_tokenizer(CORPUS, 200)
    with pytest.raises(R4BError, match="corpus is empty"):
        train_tokenizer([], 512)


def test_processor_expands_images_without_touching_the_prefix(tok):
    from r4b_core.models.tiny import make_processor

    proc = make_processor(tok, 64, 16)
    img = Image.new("RGB", (50, 30), (10, 200, 10))
    forced = modes.chat_prompt(THINKING.question, 1, Mode.THINK)
    full = modes.chat_prompt(THINKING.question, 1, None) + THINKING.sft_target()
    a = proc(text=[forced], images=[img], return_tensors="pt")["input_ids"][0].tolist()
    b = proc(text=[full], images=[img], return_tensors="pt")["input_ids"][0].tolist()
    image_id = tok.convert_tokens_to_ids(modes.IMAGE_TOKEN)
    assert a.count(image_id) == 16 and b[:len(a)] == a
