"""Rule-based answer checking: the BPO reward, curation's labels and evaluation's accuracy.

One function scores for all three: `RewardScorer.score(completions, records, prefix_modes=...)`,
given what the model generated and the mode whose prefix was forced before it (bpo.score_rollouts,
curate.apply_labels / consistency_check and evaluate.predict call it; `is_correct` and
`accuracy_reward` are the same path for one item and for TRL). Per item, cheapest first:

0. the answer type: the record's `answer_type`, or, when it has none, the type its reference
   implies (`infer_answer_type`: `B` or `(B)` is a choice, `-3` an integer, `0.5` / `50%` /
   `\\sqrt{2}` a number, anything else text); a `text` item whose reference is a number is
   scored as that number.
1. `extract_answer(text)` — strip the think block (modes.py; a block that never closed means the
   model never answered → None), then take `\\boxed{…}` (nested braces; an unclosed last box means
   the output was cut off → None), else "the answer is …" / "Answer: …", else for choice items a
   letter or an option's text, for text items the last line, for numbers the whole answer if it
   is a number or a simple expression, else the number the answer's prose answers with (below).
2. in-process fast paths that decide nearly every item exactly: numbers (signs, decimals,
   `1,000`, `1e3`, `3/4`, `\\frac{3}{4}`), percentages, simple arithmetic (+ - × ÷ ^ and
   parentheses, bounded), choices (letter or option text), text (case, whitespace and punctuation
   insensitive; a minus sign that starts a number is kept: `x = -4` is not `x = 4`).
3. `math-verify` (sympy) for what the fast paths cannot decide (`\\sqrt{64}`, `2\\pi`, …), always
   in worker processes: its SIGALRM timeouts fail off the main thread (a peer project silently
   scored every item 0 that way) and C-level sympy work ignores signals anyway. Math too big to
   evaluate never goes there (see below); for what still hangs, each item gets a wall-clock
   timeout: the hung worker is killed, the item scores 0, the timeout is counted and a fresh worker
   takes its place.

Rules worth knowing:
* prose answers (no box, no "answer:" phrase, not a number or expression, no `= value` at the
  end): of the last sentence that holds a number, take the first number after its last verb of
  being or result (is, are, was, were, be, equals, makes, gives, gets, comes to, amounts to: "so
  the sum is 15" → 15, "there are 17 apples and 3 pears" → 17), else a number followed by "in
  total" / "in all" / "altogether", else the number the sentence starts with when a word follows
  it ("17 apples and 3 pears" → 17), else the sentence's last number ("I see 3 and 4, so 7" → 7).
  A hedge such as "it is 1,000 or 2,000" reads as its first number.
* percentages: `50%` equals `0.5`; a `%` on exactly one side may also be a dropped unit, so `50%`
  equals `50` as well (but `0.5` does not equal `50`).
* `integer` answers compare exactly (`248.0` = `248`); `number` answers within 1e-6 relative
  (absolute below 1), never across a sign.
* numbers above 10^2000 or with exponents beyond ±1000 are compared as digit strings or not at all
  (never expanded), and expressions whose value would pass 10^2000 score 0 without a verifier.
  So do factorials of anything but a literal up to 1000 and factorials inside powers
  (`(10^{999})!`, `9^{999!}`): rejected by size before any evaluation, unless the reference is
  the same text.

    from r4b_core.rewards import RewardScorer, accuracy_reward, extract_answer, is_correct
    with RewardScorer(workers=2, timeout_s=5) as scorer:
        rewards = scorer.score(completions, records, prefix_modes=modes)   # or answers + answer_types
        print(scorer.counters)  # items, correct, fast_path, verifier, unfinished, parse_failures, ...
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
from collections import Counter, deque
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from r4b_core import modes
from r4b_core.errors import R4BError

# --- limits that keep every fast path bounded -------------------------------------------------
MAX_EXACT_DIGITS = 2000        # longer integers compare as digit strings (never int())
MAX_EXPONENT = 1000            # 1e±N beyond this is not a usable number
MAX_EXPR_CHARS = 200           # longer "expressions" are not simple
MAX_EXPR_BITS = 7000           # ~2100 digits: bigger intermediate values stop the evaluator
MAX_VERIFIER_CHARS = 300       # longer strings never go to math-verify
MAX_BRACE_DEPTH = 12
MAX_FACTORIAL = 1000           # n! reaches the verifier for a literal n up to this (1000! has 2,568 digits)
NUMBER_RTOL = Fraction(1, 10**6)


class RewardError(R4BError):
    """The scorer cannot work (e.g. its verifier workers do not start)."""


# ---------------------------------------------------------------------------------------------
# Cleaning and number parsing
# ---------------------------------------------------------------------------------------------
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"), ("`", "`"))
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_LATEX_SPACES = re.compile(r"\\[,;:! ]|\\quad|\\qquad|~|\{,\}")


def _clean(s: str) -> str:
    """Drop math delimiters, markdown, LaTeX spacing and a trailing full stop."""
    s = unicodedata.normalize("NFKC", s).strip()
    s = s.replace("\u2212", "-").replace("\\%", "%").replace("\\$", "")     # \$: a currency sign
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = _TEXT_CMD.sub(r"\1", s)
    s = _LATEX_SPACES.sub("", s)
    for _ in range(3):
        s = s.strip().rstrip(".").strip()
        for a, b in _WRAPPERS:
            if len(s) >= len(a) + len(b) and s.startswith(a) and s.endswith(b):
                s = s[len(a):len(s) - len(b)]
    return s.strip()


@dataclass(frozen=True)
class _Num:
    """A parsed number: exact value, or the canonical digit string of a huge integer."""

    value: Fraction | None
    big: str | None = None
    percent: bool = False


_NUM_RE = re.compile(r"([+-]?)\s*([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)?(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]+))?\s*(%?)")
_FRAC_RE = re.compile(r"([+-]?)\s*\\frac\{([^{}]*)\}\{([^{}]*)\}\s*(%?)")
_SLASH_RE = re.compile(r"([^/]+)/([^/]+)")


def _plain_number(s: str) -> _Num | None:
    m = _NUM_RE.fullmatch(s)
    if not m or (m.group(2) is None and m.group(3) is None):
        return None
    sign, whole, frac, exp, pct = m.groups()
    whole = (whole or "0").replace(",", "")
    frac = frac or ""
    if exp is not None and (len(exp.lstrip("+-")) > 5 or abs(int(exp)) > MAX_EXPONENT):
        return None
    if len(whole) + len(frac) > MAX_EXACT_DIGITS:
        if frac.strip("0") or exp is not None:
            return None   # a huge non-integer: nothing sensible to compare against
        digits = whole.lstrip("0") or "0"
        return _Num(None, ("-" if sign == "-" and digits != "0" else "") + digits, bool(pct))
    value = Fraction(int(whole + frac), 10 ** len(frac)) * Fraction(10) ** int(exp or 0)
    return _Num(-value if sign == "-" else value, None, bool(pct))


def parse_number(text: str) -> _Num | None:
    """A whole string as one number (int, decimal, 1,000, 1e3, 3/4, \\frac{3}{4}, 50%), or None."""
    s = _clean(text)
    if not s:
        return None
    n = _plain_number(s)
    if n is not None:
        return n
    m = _FRAC_RE.fullmatch(s)
    if m is None:
        m2 = _SLASH_RE.fullmatch(s)
        if m2 is None:
            return None
        pct = m2.group(2).rstrip().endswith("%")
        parts = ("", m2.group(1), m2.group(2).rstrip().rstrip("%"), "%" if pct else "")
    else:
        parts = m.groups()
    sign, a, b, pct = parts
    na, nb = _plain_number(a.strip()), _plain_number(b.strip())
    if not na or not nb or na.value is None or nb.value is None or na.percent or nb.percent or nb.value == 0:
        return None
    v = na.value / nb.value
    return _Num(-v if sign == "-" else v, None, bool(pct))


# ---------------------------------------------------------------------------------------------
# Simple expressions: + - * / ^ and parentheses over plain numbers, exactly, with size limits
# ---------------------------------------------------------------------------------------------
class _NotSimple(Exception):
    pass


class _TooBig(Exception):
    pass


_EXPR_TOKEN = re.compile(r"\s*(?:([0-9]+(?:\.[0-9]+)?|\.[0-9]+)|(\*\*|[-+*/^()]))")
_MULS = ("\\times", "\\cdot", "×", "·", "∗", "⋅")


def _braced(s: str, i: int) -> tuple[str, int] | None:
    """Content of the brace group starting at s[i] == '{' and the index after it; None if unclosed."""
    depth = 0
    for j in range(i, len(s)):
        c = s[j]
        if c == "{":
            depth += 1
            if depth > MAX_BRACE_DEPTH:
                return None
        elif c == "}":
            depth -= 1
            if depth == 0:
                return s[i + 1:j], j + 1
    return None


def _expand_frac(s: str) -> str:
    """\\frac{a}{b} → ((a)/(b)), innermost groups included."""
    out = []
    i = 0
    while True:
        k = s.find("\\frac", i)
        if k < 0:
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:k])
        j = k + len("\\frac")
        while j < len(s) and s[j] == " ":
            j += 1
        num = _braced(s, j) if j < len(s) and s[j] == "{" else None
        if num is None:
            raise _NotSimple
        den = _braced(s, num[1]) if num[1] < len(s) and s[num[1]] == "{" else None
        if den is None:
            raise _NotSimple
        out.append(f"(({_expand_frac(num[0])})/({_expand_frac(den[0])}))")
        i = den[1]


def _check_size(v: Fraction) -> Fraction:
    if v.numerator.bit_length() > MAX_EXPR_BITS or v.denominator.bit_length() > MAX_EXPR_BITS:
        raise _TooBig
    return v


def evaluate_expression(text: str) -> Fraction:
    """Exact value of a simple arithmetic expression; raises _NotSimple or _TooBig."""
    s = _clean(text)
    if not s or len(s) > MAX_EXPR_CHARS:
        raise _NotSimple
    for m in _MULS:
        s = s.replace(m, "*")
    s = s.replace("÷", "/").replace("\\div", "/")
    s = _expand_frac(s).replace("{", "(").replace("}", ")")
    tokens: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(s):
        m = _EXPR_TOKEN.match(s, pos)
        if not m:
            if s[pos:].strip() == "":
                break
            raise _NotSimple
        pos = m.end()
        if m.group(1) is not None:
            tokens.append(("n", Fraction(m.group(1))))
        else:
            tokens.append(("o", "^" if m.group(2) == "**" else m.group(2)))
    if not tokens:
        raise _NotSimple
    i = 0

    def peek() -> tuple[str, Any] | None:
        return tokens[i] if i < len(tokens) else None

    def take() -> tuple[str, Any]:
        nonlocal i
        if i >= len(tokens):
            raise _NotSimple
        i += 1
        return tokens[i - 1]

    def expr(depth: int) -> Fraction:
        if depth > 30:
            raise _NotSimple
        v = term(depth)
        while peek() in (("o", "+"), ("o", "-")):
            op = take()[1]
            w = term(depth)
            v = _check_size(v + w if op == "+" else v - w)
        return v

    def term(depth: int) -> Fraction:
        v = unary(depth)
        while peek() in (("o", "*"), ("o", "/")):
            op = take()[1]
            w = unary(depth)
            if op == "/" and w == 0:
                raise _NotSimple
            v = _check_size(v * w if op == "*" else v / w)
        return v

    def unary(depth: int) -> Fraction:
        if peek() in (("o", "+"), ("o", "-")):
            op = take()[1]
            v = unary(depth + 1)
            return -v if op == "-" else v
        return power(depth)

    def power(depth: int) -> Fraction:
        base = atom(depth)
        if peek() == ("o", "^"):
            take()
            e = unary(depth + 1)
            if e.denominator != 1:
                raise _NotSimple
            if abs(base) not in (0, 1):
                size = max(base.numerator.bit_length(), base.denominator.bit_length())
                if abs(e.numerator) > MAX_EXPR_BITS or size * abs(e.numerator) > MAX_EXPR_BITS:
                    raise _TooBig
            if base == 0 and e < 0:
                raise _NotSimple
            if abs(base) == 1:
                return base ** (e.numerator % 2) if base < 0 else base
            return _check_size(base ** e.numerator)
        return base

    def atom(depth: int) -> Fraction:
        kind, val = take()
        if kind == "n":
            return val
        if val == "(":
            v = expr(depth + 1)
            if take() != ("o", ")"):
                raise _NotSimple
            return v
        raise _NotSimple

    value = expr(0)
    if i != len(tokens):
        raise _NotSimple
    return value


def _value(text: str) -> _Num | None:
    """A number, or the value of a simple expression; None when neither (raises _TooBig)."""
    n = parse_number(text)
    if n is not None:
        return n
    try:
        return _Num(evaluate_expression(text))
    except _NotSimple:
        return None


def _close(a: Fraction, b: Fraction, exact: bool) -> bool:
    if a == b:
        return True
    if exact or a * b < 0:           # rounding never flips a sign: -1e-7 is not 1e-7
        return False
    return abs(a - b) <= NUMBER_RTOL * max(Fraction(1), abs(b))


def _numbers_equal(p: _Num, r: _Num, exact: bool) -> bool:
    if p.big is not None or r.big is not None:
        if p.percent != r.percent:
            return False
        if p.big is not None and r.big is not None:
            return p.big == r.big
        big, other = (p.big, r) if p.big is not None else (r.big, p)
        # Exact values stay below ~3,100 digits (MAX_EXACT_DIGITS + MAX_EXPONENT), so str() is safe.
        return other.value.denominator == 1 and str(other.value.numerator) == big
    pv = p.value / 100 if p.percent else p.value
    rv = r.value / 100 if r.percent else r.value
    if _close(pv, rv, exact):
        return True
    # A "%" on exactly one side may be a dropped (or added) unit: 50% vs 50.
    return p.percent != r.percent and _close(p.value, r.value, exact)


# ---------------------------------------------------------------------------------------------
# Answer extraction
# ---------------------------------------------------------------------------------------------
_BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_PHRASE_RE = re.compile(r"(?i)\b(?:final\s+answer|answer)\s*(?:is\s*:?|:|=)\s*")
_SCAN_RE = re.compile(
    r"\\frac\{\s*-?[0-9]+(?:\.[0-9]+)?\s*\}\{\s*-?[0-9]+(?:\.[0-9]+)?\s*\}"
    r"|(?<![\w.])[-+]?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?"
    r"(?:\s*/\s*[0-9]+(?:\.[0-9]+)?)?(?:[eE][-+]?[0-9]+)?(?:\s*\\?%)?")
_LETTER_RE = re.compile(r"\(?([A-Za-z])\)?[.:)]?")
_LEAD_LETTER_RE = re.compile(r"\(?([A-Z])[.:)]\s+\S")
_OPTION_WORD_RE = re.compile(r"(?i)\b(?:option|choice)\s*\(?([A-Z])\)?(?![A-Za-z])")
_STANDALONE_RE = re.compile(r"(?<![A-Za-z])\(?([A-Z])\)?(?![A-Za-z])")


def _boxed(ans: str) -> str | None | bool:
    """Content of the last \\boxed{…}; False when there is none; None when it never closed."""
    last = None
    for m in _BOX_RE.finditer(ans):
        last = m
    if last is None:
        return False
    j = last.end()
    while j < len(ans) and ans[j] == " ":
        j += 1
    if j < len(ans) and ans[j] == "{":
        got = _braced(ans, j)
        return None if got is None else got[0]
    m = re.match(r"\S+", ans[j:])
    return m.group(0) if m else None


def _first_number(s: str) -> str | None:
    m = _SCAN_RE.search(s)
    return m.group(0).strip() if m else None


# Prose answers: the number the last sentence answers with (rule in the module docstring).
_SENTENCE_END_RE = re.compile(r"[.!?;](?:\s+|$)|\n")
_COPULA_RE = re.compile(r"(?i)\b(?:is|are|was|were|be|equals?|makes?|gives?|gets?|got|comes\s+to|amounts\s+to)\b")
_TOTAL_RE = re.compile(r"\s*(?:in\s+total|in\s+all|altogether|total)\b", re.IGNORECASE)
_LEADS_WITH_WORD_RE = re.compile(r"\s+[^\W\d_]")


def _prose_number(s: str) -> str | None:
    """The number a prose answer answers with, from its last sentence that holds one."""
    sentence = None
    for part in reversed(_SENTENCE_END_RE.split(s)):
        if _SCAN_RE.search(part):
            sentence = part
            break
    if sentence is None:
        return None
    numbers = list(_SCAN_RE.finditer(sentence))
    copulas = [m for m in _COPULA_RE.finditer(sentence, 0, numbers[-1].start())]
    if copulas:                                  # "so the sum is 15", "there are 17 apples and 3 pears"
        return next(n for n in numbers if n.start() >= copulas[-1].end()).group(0).strip()
    totals = [n for n in numbers if _TOTAL_RE.match(sentence, n.end())]
    if totals:                                   # "3 red and 4 blue, 7 in total"
        return totals[-1].group(0).strip()
    first = numbers[0]
    if not sentence[:first.start()].strip() and _LEADS_WITH_WORD_RE.match(sentence, first.end()):
        return first.group(0).strip()            # "17 apples and 3 pears": the sentence leads with it
    return numbers[-1].group(0).strip()


# What may go to math-verify: short, one line, ASCII, balanced, no prose, known LaTeX commands
# only, no long digit runs, one small power at most, factorials of small literals only. Anything else is scored by the fast paths alone (an
# answer sympy would need minutes for is not an answer a reward should wait on).
_LATEX_OK = frozenset("frac sqrt pi cdot times div pm mp infty ln log exp sin cos tan binom "
                      "circ deg approx".split())
_PROSE_RE = re.compile(r"[A-Za-z]{2,}")
_COMMAND_RE = re.compile(r"\\([A-Za-z]+)")
_DIGIT_RUN_RE = re.compile(r"[0-9]{16}|[eE\^][-+{(\s]*[0-9]{4}")     # long numbers, big exponents


_FACTORIAL_ARG_RE = re.compile(r"(?<![0-9.])([0-9]+)\s*$")
_EXPONENT_TOKEN_RE = re.compile(r"[^\s+\-*/=,]*")


def _oversized(s: str) -> bool:
    """A factorial too big to evaluate: n! needs a literal n <= MAX_FACTORIAL, and no factorial may
    be raised to a power, factorised again or sit in an exponent ((10^{999})!, 9^{999!}, 5!^{99})."""
    for k, ch in enumerate(s):
        if ch != "!":
            continue
        arg = _FACTORIAL_ARG_RE.search(s, 0, k)
        if arg is None or int(arg.group(1)) > MAX_FACTORIAL or s[k + 1:].lstrip()[:1] in ("!", "^"):
            return True
    caret = s.find("^")
    if caret >= 0 and "!" in s:
        j = caret + 1
        while j < len(s) and s[j] == " ":
            j += 1
        if s[j:j + 1] in ("{", "("):       # the group, read as braces: (5!) and {5!} alike
            group = _braced(s[j:].replace("(", "{").replace(")", "}"), 0)
            exponent = group[0] if group else s[j:]
        else:
            exponent = _EXPONENT_TOKEN_RE.match(s, j).group(0)
        return "!" in exponent
    return False


def _math_shape(s: str) -> bool:
    """Short, one line, ASCII, balanced, no prose, known LaTeX commands only, something numeric."""
    if not 0 < len(s) <= MAX_VERIFIER_CHARS or not s.isascii() or not s.isprintable() or "<" in s:
        return False
    if any(c not in _LATEX_OK for c in _COMMAND_RE.findall(s)) or _PROSE_RE.search(_COMMAND_RE.sub(" ", s)):
        return False
    for o, c in ("{}", "()"):
        depth = 0
        for ch in s:
            depth += (ch == o) - (ch == c)
            if depth < 0 or depth > MAX_BRACE_DEPTH:
                return False
        if depth:
            return False
    return any(ch.isdigit() for ch in s) or "\\pi" in s or "\\infty" in s


def _verifiable(s: str) -> bool:
    """Math of a size the verifier finishes quickly: no long digit runs, one power, small factorials."""
    return _math_shape(s) and not (_DIGIT_RUN_RE.search(s) or s.count("^") > 1 or _oversized(s))


def _is_symbolic(s: str) -> bool:
    """Math only a verifier can read (\\sqrt{2}, 2\\pi, (10^{7})!): keep it whole, not its digits."""
    return any(ch in s for ch in "\\!^") and _math_shape(s)


def _numeric_candidate(s: str, prose: bool) -> str | None:
    """The number a piece of answer text states: itself, the part after the last '=', symbolic
    math as a whole, else its first number (a box or an "answer:" phrase) or, for a whole prose
    answer (`prose`), the number its last sentence answers with."""
    s = _clean(s)
    if not s:
        return None
    tail = _clean(s.rsplit("=", 1)[1]) if "=" in s else ""
    try:
        if _value(s) is not None:
            return s
        if tail and _value(tail) is not None:
            return tail
    except _TooBig:
        return s
    for cand in (tail, s):
        if _is_symbolic(cand):
            return cand
    return _prose_number(s) if prose else _first_number(s)


# Words and digit runs; a minus sign that starts a number stays (x = -4 is not x = 4).
_TEXT_TOKEN_RE = re.compile(r"(?:(?<![^\W_])-(?=[0-9]))?[^\W_]+")


def _norm_text(s: str) -> str:
    """Case, whitespace and punctuation insensitive form: "  Red. " -> "red", "(-1, 2)" -> "-1 2"."""
    return " ".join(_TEXT_TOKEN_RE.findall(_clean(s).casefold()))


def _choice_index(s: str, choices: Sequence[str] | None) -> int | None:
    """Which option a string names: a letter (A, (B), c., option D) or the option's text."""
    s = _clean(s)
    if not s:
        return None
    n = len(choices) if choices else 26

    def ok(letter: str) -> int | None:
        k = ord(letter.upper()) - ord("A")
        return k if 0 <= k < n else None

    m = _LETTER_RE.fullmatch(s)
    if m and ok(m.group(1)) is not None:
        return ok(m.group(1))
    if choices:
        norm = _norm_text(s)
        texts = [_norm_text(c) for c in choices]
        if norm in texts:
            return texts.index(norm)
    for rx in (_LEAD_LETTER_RE, _OPTION_WORD_RE):
        m = rx.match(s) if rx is _LEAD_LETTER_RE else rx.search(s)
        if m and ok(m.group(1)) is not None:
            return ok(m.group(1))
    if choices:
        padded = f" {_norm_text(s)} "
        hits = [k for k, t in enumerate(texts) if t and f" {t} " in padded]
        if len(hits) == 1:
            return hits[0]
    found = None
    for m in _STANDALONE_RE.finditer(s):
        if ok(m.group(1)) is not None:
            found = ok(m.group(1))
    return found


def _from_answer(ans: str, answer_type: str | None, choices: Sequence[str] | None) -> str | None:
    box = _boxed(ans)
    if box is None:
        return None        # the last box never closed: the answer was cut off
    if box is not False:
        candidate, prose = box, False
    else:
        phrase = None
        for m in _PHRASE_RE.finditer(ans):
            phrase = m
        if phrase is not None and ans[phrase.end():].split("\n", 1)[0].strip():
            candidate, prose = ans[phrase.end():].split("\n", 1)[0], False
        else:
            candidate, prose = ans, True
    if answer_type == "choice" or (choices and answer_type is None):
        k = _choice_index(candidate, choices)
        if k is None:
            return None
        return chr(ord("A") + k)
    if answer_type == "text":
        lines = [ln for ln in candidate.splitlines() if ln.strip()]
        text = _clean(lines[-1]) if lines else ""
        return text or None
    return _numeric_candidate(candidate, prose)


def extract_answer(text: str | None, answer_type: str | None = None, choices: Sequence[str] | None = None,
                   prefix_mode: modes.Mode | str | None = None) -> str | None:
    """The final answer a completion states, or None when nothing parses.

    `prefix_mode`: the forced mode the completion was generated after (its prefix is not part of
    `text`); without it, `text` is read as a full transcript or a plain answer.
    """
    if not isinstance(text, str) or not text.strip():
        return None
    if prefix_mode is None:
        ans = modes.strip_thinking(text)
    else:
        ans = modes.parse_response(text, prefix_mode=prefix_mode).answer
    ans = ans.strip()
    if not ans:
        return None        # no answer, or a think block that never closed
    return _from_answer(ans, answer_type, choices)


# ---------------------------------------------------------------------------------------------
# Correctness: the answer type, fast paths, then the verifier
# ---------------------------------------------------------------------------------------------
_LETTER_REF_RE = re.compile(r"\(?[A-Z]\)?\.?")


def _numeric_type(reference: str) -> str | None:
    """integer / number when the reference is a number or a simple expression, else None."""
    try:
        n = _value(reference)
    except _TooBig:
        return "number"
    if n is None:
        return None
    return "integer" if n.big is not None or (not n.percent and n.value.denominator == 1) else "number"


def infer_answer_type(reference: str, choices: Sequence[str] | None = None) -> str:
    """The answer type a reference implies: `choice` (options given, or one capital letter such as
    `B` or `(B)`), `integer` / `number` (a number or simple expression; symbolic math such as
    `\\sqrt{2}` is a number), else `text`."""
    s = _clean(str(reference))
    if choices or _LETTER_REF_RE.fullmatch(s):
        return "choice"
    return _numeric_type(s) or ("number" if _is_symbolic(s) else "text")


def _answer_type(reference: str, declared: str | None, choices: Sequence[str] | None) -> str:
    """What an item is scored as: its declared type, inferred when absent; a `text` item whose
    reference is a number is scored as that number (`-4` is not `4`, `4.0` is `4`)."""
    if declared is None:
        return infer_answer_type(reference, choices)
    if declared == "text" and not choices:
        return _numeric_type(_clean(reference)) or "text"
    return declared


def _decide(prediction: str, ref: str, atype: str,
            choices: Sequence[str] | None) -> tuple[bool | None, str, str]:
    """(verdict, prediction, reference) for an extracted answer and a non-empty reference of a
    known type; verdict None means only the verifier can tell."""
    if atype == "choice":
        rk = _choice_index(ref, choices)
        pk = _choice_index(prediction, choices)
        if pk is None:
            ex = extract_answer(prediction, "choice", choices)
            pk = _choice_index(ex, choices) if ex else None
        if rk is not None:
            return pk is not None and pk == rk, prediction, ref
        return _norm_text(prediction) == _norm_text(ref), prediction, ref
    if atype == "text":
        cands = [prediction]
        ex = extract_answer(prediction, "text")
        if ex and ex != prediction:
            cands.append(ex)
        nr = _norm_text(ref)
        return any(_norm_text(c) == nr for c in cands), prediction, ref
    # numbers
    exact = atype == "integer"
    cands = [prediction]
    ex = extract_answer(prediction, atype)
    if ex and ex != prediction:
        cands.append(ex)
    try:
        rv = _value(ref)
    except _TooBig:
        rv = None
    pvs: list[_Num] = []
    too_big = False
    for c in cands:
        try:
            pv = _value(c)
        except _TooBig:
            too_big = True
            continue
        if pv is not None:
            pvs.append(pv)
    if rv is not None and pvs:
        return any(_numbers_equal(pv, rv, exact) for pv in pvs), prediction, ref
    if too_big and rv is not None:
        return False, prediction, ref       # a value beyond 10^2000 cannot equal a parsed reference
    pred, clean_ref = _clean(ex or prediction), _clean(ref)
    if pred == clean_ref:
        return True, pred, clean_ref        # the same math, character for character
    if _verifiable(pred) and _verifiable(clean_ref):
        return None, pred, clean_ref
    return False, prediction, ref


def _judge(completion: Any, reference: Any, answer_type: str | None, choices: Sequence[str] | None,
           prefix_mode: modes.Mode | str | None) -> tuple[str, bool | None, str, str]:
    """How one completion scores, short of the verifier: (outcome, verdict, prediction, reference).

    outcome: `no_reference`, `unfinished` (the think block never closed: no answer), `parse_failures`
    (no answer found), `fast_path` (verdict decided here) or `verifier` (verdict None: math-verify
    decides `prediction` against `reference`).
    """
    ref = str(reference).strip() if reference is not None else ""
    if not ref:
        return "no_reference", None, "", ""
    atype = _answer_type(ref, answer_type, choices)
    text = _completion_text(completion)
    pred = extract_answer(text, atype, choices, prefix_mode)
    if pred is None:
        finished = isinstance(text, str) and modes.parse_response(text, prefix_mode).closed
        return ("parse_failures" if finished else "unfinished"), False, "", ref
    if atype == "text":      # the whole answer may be it, over several lines ("A = 37\nB = 25")
        pred = modes.parse_response(text, prefix_mode).answer
    verdict, pred, ref = _decide(pred, ref, atype, choices)
    return ("fast_path" if verdict is not None else "verifier"), verdict, pred, ref


def is_correct(prediction: str | None, reference: str, answer_type: str | None = None,
               choices: Sequence[str] | None = None, timeout_s: float = 5.0,
               prefix_mode: modes.Mode | str | None = None) -> bool:
    """Whether `prediction` (an answer, or a completion) states the reference answer, exactly as
    `RewardScorer.score` decides it (`answer_type` None: inferred from the reference).

    Undecided items go to a shared math-verify worker process with a `timeout_s` wall clock (a
    timeout is a wrong answer). Safe to call from any thread.
    """
    outcome, verdict, pred, ref = _judge(prediction, reference, answer_type, choices, prefix_mode)
    if outcome != "verifier":
        return bool(verdict)
    status, value = _shared_pool(timeout_s).run([(pred, ref)])[0]
    return status == "ok" and bool(value)


# ---------------------------------------------------------------------------------------------
# The verifier: math-verify in worker processes with a wall-clock timeout per item
# ---------------------------------------------------------------------------------------------
def _as_latex(s: str) -> str:
    return s if "$" in s or "\\boxed" in s else f"${s}$"


def _worker_main() -> None:
    """Entry point of a verifier worker: JSON lines in on stdin, JSON lines out on a private fd."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)             # stray prints from libraries must not corrupt the protocol
    mem_mb = int(os.environ.get("R4B_VERIFIER_MEMORY_MB", "0"))
    if mem_mb > 0:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, mem_mb << 20))
    import logging

    logging.disable(logging.CRITICAL)   # math-verify warns once per process about disabled timeouts
    from math_verify import parse, verify

    out.write('{"ready": true}\n')
    for line in sys.stdin:
        try:
            job = json.loads(line)
            gold = parse(_as_latex(job["ref"]), parsing_timeout=None)
            pred = parse(_as_latex(job["pred"]), parsing_timeout=None)
            ok = bool(gold and pred and verify(gold, pred, timeout_seconds=None))
            out.write(json.dumps({"ok": ok}) + "\n")
        except BaseException as exc:      # MemoryError under the rlimit, RecursionError, ...
            out.write(json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:200]}"}) + "\n")


class _Worker:
    def __init__(self, memory_mb: int):
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["R4B_VERIFIER_MEMORY_MB"] = str(memory_mb)
        for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = "1"
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from r4b_core.rewards import _worker_main; _worker_main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, env=env, close_fds=True)
        self.fd = self.proc.stdout.fileno()
        self.buf = b""
        self.ready = False
        self.started = time.monotonic()
        self.job: int | None = None
        self.deadline = 0.0

    def send(self, job: int, pred: str, ref: str, timeout_s: float) -> None:
        self.proc.stdin.write((json.dumps({"pred": pred, "ref": ref}) + "\n").encode())
        self.proc.stdin.flush()
        self.job, self.deadline = job, time.monotonic() + timeout_s

    def read_messages(self) -> list[dict] | None:
        """Complete messages available now; None when the worker has exited."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(ln) for ln in lines if ln.strip()]

    def stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-1500:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.stderr):
            try:
                f.close()
            except OSError:
                pass

    def close(self) -> None:
        try:
            self.proc.stdin.close()          # EOF: the worker's loop ends
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class _VerifierPool:
    """Worker processes started on first need; `run` scores jobs with a wall-clock timeout each."""

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, memory_mb: int = 2048,
                 start_timeout_s: float = 120.0):
        if workers < 1 or timeout_s <= 0:
            raise RewardError(f"RewardScorer(workers={workers}, timeout_s={timeout_s}): need workers >= 1 and "
                              "timeout_s > 0")
        self.size, self.timeout_s, self.memory_mb = workers, timeout_s, memory_mb
        self.start_timeout_s = start_timeout_s
        self.workers: list[_Worker] = []
        self.starts = 0
        self.counts: Counter[str] = Counter()     # jobs, ok, timeout, error over the pool's life
        self.lock = threading.Lock()

    def _spawn(self) -> None:
        self.workers.append(_Worker(self.memory_mb))
        self.starts += 1

    def run(self, jobs: list[tuple[str, str]]) -> list[tuple[str, Any]]:
        """[(pred, ref)] → [("ok", bool) | ("timeout", None) | ("error", message)], in order."""
        with self.lock:
            return self._run(jobs)

    def _run(self, jobs: list[tuple[str, str]]) -> list[tuple[str, Any]]:
        results: list[tuple[str, Any] | None] = [None] * len(jobs)
        pending = deque(range(len(jobs)))
        while pending or any(w.job is not None for w in self.workers):
            busy = sum(w.job is not None for w in self.workers)
            while len(self.workers) < min(self.size, len(pending) + busy):
                self._spawn()
            for w in list(self.workers):
                if w.ready and w.job is None and pending:
                    k = pending.popleft()
                    try:
                        w.send(k, jobs[k][0], jobs[k][1], self.timeout_s)
                    except OSError:                  # it died while idle: retry the job elsewhere
                        pending.appendleft(k)
                        w.job = None
                        w.kill()
                        self.workers.remove(w)
            now = time.monotonic()
            waits = [w.deadline - now if w.ready else w.started + self.start_timeout_s - now for w in self.workers
                     if w.job is not None or not w.ready]
            readable, _, _ = select.select([w.fd for w in self.workers], [], [], max(0.0, min(waits, default=0.05)))
            for w in list(self.workers):
                if w.fd in readable:
                    msgs = w.read_messages()
                    if msgs is None:                 # the worker died (crash, OOM kill)
                        if w.job is not None:
                            results[w.job] = ("error", f"verifier worker exited ({w.proc.poll()})")
                        elif not w.ready:
                            tail = w.stderr_tail()
                            w.kill()
                            self.workers.remove(w)
                            raise RewardError(f"the math-verify worker failed to start ({sys.executable}); "
                                              f"its stderr ends with: {tail.strip()[-600:]}")
                        w.kill()
                        self.workers.remove(w)
                        continue
                    for msg in msgs:
                        if msg.get("ready"):
                            w.ready = True
                        elif w.job is not None:
                            results[w.job] = ("ok", msg["ok"]) if "ok" in msg else ("error", msg.get("error"))
                            w.job = None
            now = time.monotonic()
            for w in list(self.workers):
                if w.job is not None and now > w.deadline:
                    results[w.job] = ("timeout", None)   # hung: kill it, a fresh worker replaces it
                    w.kill()
                    self.workers.remove(w)
                elif not w.ready and now > w.started + self.start_timeout_s:
                    w.kill()
                    self.workers.remove(w)
                    raise RewardError(f"the math-verify worker did not start within {self.start_timeout_s:.0f} s; "
                                      "the machine may be overloaded (raise start_timeout_s)")
        out = [r if r is not None else ("error", "lost") for r in results]
        self.counts["jobs"] += len(out)
        self.counts.update(status for status, _ in out)
        return out

    def close(self) -> None:
        with self.lock:
            for w in self.workers:
                w.close()
            self.workers.clear()


_SHARED: dict[float, _VerifierPool] = {}
_SHARED_LOCK = threading.Lock()


def _shared_pool(timeout_s: float) -> _VerifierPool:
    with _SHARED_LOCK:
        if timeout_s not in _SHARED:
            _SHARED[timeout_s] = _VerifierPool(workers=1, timeout_s=timeout_s)
        return _SHARED[timeout_s]


@atexit.register
def _close_shared() -> None:
    for pool in list(_SHARED.values()):
        pool.close()
    _SHARED.clear()


# ---------------------------------------------------------------------------------------------
# Batch scoring
# ---------------------------------------------------------------------------------------------
def _completion_text(c: Any) -> str | None:
    """A completion as text: a string, or TRL's conversational [{"role", "content"}] form."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        content = c[-1].get("content")
        if isinstance(content, list):   # multimodal content parts
            return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else None
    if isinstance(c, dict):
        return c.get("content") if isinstance(c.get("content"), str) else None
    return getattr(c, "text", None)


def _per_item(value: Any, n: int, name: str) -> list:
    if value is None or isinstance(value, (str, modes.Mode)):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise RewardError(f"{name} has {len(value)} entries for {n} completions; pass one per completion")
    return value


class RewardScorer:
    """Scores batches of completions; math-verify runs in `workers` processes, `timeout_s` each.

    Use as a context manager (or call close()) so the workers end with it. `counters` (a dict):
    items, scored (items with a reference), correct, fast_path, verifier, unfinished (the think
    block never closed), parse_failures (no answer could be extracted), timeouts, verifier_errors,
    no_reference, worker_starts.
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, memory_limit_mb: int = 2048,
                 start_timeout_s: float = 120.0):
        self._pool = _VerifierPool(workers, timeout_s, memory_limit_mb, start_timeout_s)
        self._counts: Counter[str] = Counter()

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.close()

    @property
    def counters(self) -> dict[str, int]:
        keys = ("items", "scored", "correct", "fast_path", "verifier", "unfinished", "parse_failures",
                "timeouts", "verifier_errors", "no_reference")
        out = {k: self._counts.get(k, 0) for k in keys}
        out["worker_starts"] = self._pool.starts
        return out

    def score(self, completions: Sequence[Any], answers: Sequence[Any], answer_types: Any = None,
              choices: Any = None, prefix_modes: Any = None) -> list[float | None]:
        """1.0 / 0.0 per completion (None where the reference is empty): BPO's reward, curation's
        labels and evaluation's accuracy all come from here.

        `completions`: strings, objects with `.text` (rollout Completions) or TRL's conversational
        form. `answers`: reference strings, or records (anything with .answer, .answer_type, .choices),
        whose type and choices are used unless `answer_types` / `choices` are given. `choices` is
        one list of options per item (or None). `prefix_modes`: the forced mode each completion was
        generated after, when the completions do not include their prefix.
        """
        n = len(completions)
        if len(answers) != n:
            raise RewardError(f"{len(answers)} answers for {n} completions; pass one reference per completion")
        types = _per_item(answer_types, n, "answer_types")
        # One option list per item, or a single option list (of strings) for every item.
        per_item = choices is not None and len(choices) == n and all(x is None or isinstance(x, (list, tuple))
                                                                     for x in choices)
        opts = list(choices) if per_item else [choices] * n
        pmodes = _per_item(prefix_modes, n, "prefix_modes")
        out: list[float | None] = [None] * n
        jobs: list[tuple[str, str]] = []
        where: list[int] = []
        c = self._counts
        for i in range(n):
            c["items"] += 1
            ref, atype, ch = answers[i], types[i], opts[i]
            if hasattr(ref, "answer"):
                atype = atype or getattr(ref, "answer_type", None)
                ch = ch if ch is not None else getattr(ref, "choices", None)
                ref = ref.answer
            outcome, verdict, pred, ref = _judge(completions[i], ref, atype, ch, pmodes[i])
            if outcome == "no_reference":
                c[outcome] += 1
                continue
            c["scored"] += 1
            if outcome == "verifier":
                jobs.append((pred, ref))
                where.append(i)
                continue
            c[outcome] += 1
            c["correct"] += bool(verdict)
            out[i] = float(bool(verdict))
        if jobs:
            c["verifier"] += len(jobs)
            for i, (status, value) in zip(where, self._pool.run(jobs)):
                ok = status == "ok" and bool(value)
                c["timeouts"] += status == "timeout"
                c["verifier_errors"] += status == "error"
                c["correct"] += ok
                out[i] = float(ok)
        return out


_DEFAULT: RewardScorer | None = None


def default_scorer() -> RewardScorer:
    """The process-wide scorer behind accuracy_reward (closed at exit)."""
    global _DEFAULT
    with _SHARED_LOCK:
        if _DEFAULT is None:
            _DEFAULT = RewardScorer()
            atexit.register(_DEFAULT.close)
        return _DEFAULT


def accuracy_reward(completions: Sequence[Any], answer: Sequence[Any], answer_type: Any = None,
                    choices: Any = None, prefix_mode: Any = None, **kw: Any) -> list[float | None]:
    """TRL-style reward function: dataset columns arrive as keyword lists (answer, answer_type,
    choices, prefix_mode); unknown columns (prompts, completion_ids, ...) are ignored."""
    return default_scorer().score(completions, answer, answer_type, choices, prefix_mode)
