import pytest

from r4b_core import modes
from r4b_core.modes import Mode, parse_response


def test_targets_and_prefixes_share_strings():
    t = modes.thinking_target("a=2\nb=3\n2*3=6", "6")
    d = modes.direct_target("6")
    assert t == "<think>\na=2\nb=3\n2*3=6\n</think>\n\n6"
    assert d == "<think>\n\n</think>\n\n6"
    assert t.startswith(modes.generation_prefix(Mode.THINK))
    assert d.startswith(modes.generation_prefix(Mode.NO_THINK))
    assert modes.generation_prefix("auto") == "<think>"
    assert modes.target_mode(t) is Mode.THINK and modes.target_mode(d) is Mode.NO_THINK


def test_thinking_target_rejects_empty_reasoning():
    with pytest.raises(ValueError, match="non-empty"):
        modes.thinking_target("  ", "1")
    assert modes.target_for("1", None) == modes.direct_target("1")


@pytest.mark.parametrize("name,mode", [("long", Mode.THINK), ("short", Mode.NO_THINK), ("auto", Mode.AUTO),
                                       ("no_think", Mode.NO_THINK), ("THINK", Mode.THINK)])
def test_mode_aliases(name, mode):
    assert Mode.parse(name) is mode


def test_mode_unknown_names_allowed_values():
    with pytest.raises(ValueError, match="allowed: auto, think, no_think"):
        Mode.parse("medium")


@pytest.mark.parametrize("text,prefix,expected", [
    ("<think>\nstep\n</think>\n\n42", None, (Mode.THINK, "step", "42", True)),
    ("<think>\n\n</think>\n\n42", None, (Mode.NO_THINK, "", "42", True)),
    ("42", Mode.NO_THINK, (Mode.NO_THINK, "", "42", True)),
    ("step one\nstep two\n</think>\n\n7", Mode.THINK, (Mode.THINK, "step one\nstep two", "7", True)),
    ("\n\n</think>\n\n7", Mode.AUTO, (Mode.NO_THINK, "", "7", True)),
    ("\nsteps that never end", Mode.AUTO, (Mode.THINK, "steps that never end", "", False)),
    ("", None, (Mode.NO_THINK, "", "", True)),
    ("", Mode.THINK, (Mode.NO_THINK, "", "", False)),
    ("plain answer", None, (Mode.NO_THINK, "", "plain answer", True)),
    ("<think>a</think>b<think>junk</think>", None, (Mode.THINK, "a", "b", True)),
    ("<think><think>x</think>\n\n5<|im_end|>", None, (Mode.THINK, "x", "5", True)),
    ("reasoning</think> 9", None, (Mode.THINK, "reasoning", "9", True)),
])
def test_parse_response(text, prefix, expected):
    r = parse_response(text, prefix)
    assert (r.mode, r.reasoning, r.answer, r.closed) == expected


def test_chat_prompt_layout():
    p = modes.chat_prompt("What is 2+3?", num_images=1, mode=Mode.NO_THINK)
    assert p == ("<|im_start|>user\n<image>\nWhat is 2+3?<|im_end|>\n"
                 "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert modes.chat_prompt("q", 0, mode=None).endswith("<|im_start|>assistant\n")
