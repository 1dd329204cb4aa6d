"""Property tests: ≥ 10,000 random and adversarial strings through extract_answer and is_correct,
as predictions and as references — no exception, no hang, bounded total time; and for numbers
stated in a dozen forms under every answer type, sign flips never match and equal values always do."""

import random
import time
from fractions import Fraction

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from r4b_core.rewards import RewardScorer, _shared_pool, extract_answer, is_correct

TYPES = (None, "integer", "number", "text", "choice")
OPTS = ["red", "blue", "green", "7"]
REFS = ("8", "-5", "0.5", "50%", "3/4", "\\frac{1}{2}", "red", "B", "1,000")
PIECES = ("<think>", "</think>", "\n", "\n\n", "\\boxed{", "\\boxed", "{", "}", "\\frac{", "\\dfrac", "^", "^{",
          "9", "0", "99999", "-", "+", "%", "\\%", ",", ".", "/", "e", "E", "e-", "answer is ", "Answer:",
          "The final answer is", "$", "$$", "\\(", "\\)", "(", ")", "×", "÷", "\\times", "\\cdot", "\\sqrt{",
          "\\pi", "!", "=", "A", "(B)", "C.", "red", " ", "\u200f", "\u202e", "\u2212", "\u0663", "\uff13", "\u2460",
          "\u00bd", "\x00", "\\", "1e999999", "1,000", "0.", "\\text{", "**", "`", "\ud800", "🙂", "\\left(",
          "\\right)", "<|im_end|>", "\t")

STATS = {"strings": 0, "calls": 0, "slowest_call_s": 0.0}


def _exercise(s: str) -> None:
    n = STATS["strings"]
    STATS["strings"] += 1
    for t in TYPES:
        ch = OPTS if t == "choice" else None
        t0 = time.perf_counter()
        got = extract_answer(s, t, ch)
        assert got is None or isinstance(got, str)
        STATS["slowest_call_s"] = max(STATS["slowest_call_s"], time.perf_counter() - t0)
    # is_correct with the string as prediction and as reference (answer types in rotation);
    # undecided items go to the math-verify worker, whose 1 s wall-clock timeout bounds any hang.
    t, ref = TYPES[n % len(TYPES)], REFS[n % len(REFS)]
    ch = OPTS if t == "choice" else None
    assert is_correct(s, ref, t, ch, timeout_s=1.0) in (True, False)
    assert is_correct(ref, s, t, ch, timeout_s=1.0) in (True, False)
    STATS["calls"] += len(TYPES) + 2


def nasty_strings() -> list[str]:
    """Hand-made worst cases, then random splices of them with the pieces above."""
    base = [
        "9" * 10_000, "1" + "0" * 9_999, "-" + "9" * 5_000 + ".5", "1" * 100_000, "0" * 5000 + "8",
        "1e999999999", "1e-999999999", "9e99999", "1E+1000", "1e1000", "-1e-1000", "1e" + "9" * 5000,
        "{" * 5000, "}" * 5000, "\\boxed{" * 2000, "\\boxed{" + "1" * 100, "\\boxed", "\\boxed{}", "\\boxed{{{}",
        "(" * 3000 + "1" + ")" * 3000, "2^" * 2000 + "2", "2^{" * 500 + "2" + "}" * 500, "9^{9^{9^{9}}}",
        "10^{10^{10}}", "\\frac{" * 300, "\\frac{1}{0}", "1/0", "0/0", "0^{-1}", "2^{0.5}", "(-1)^{10000000}",
        "2^{-99999}", "(10^{400})^{10}", "1,".rstrip(",") * 1 + ",1" * 5000, "1,000" * 2000, "<think>" * 1000,
        "</think>" * 1000, "<think>\n" + "1" * 10_000, "answer is " * 3000, "Answer:" * 3000, "%" * 1000,
        "-" * 1000 + "1", "a" * 100_000, "\\sqrt{" * 100, "\u0661\u0662\u0663", "\uff11\uff12\uff13", "\u00bd",
        "\u202e123", "\ud800", "\x00" * 100, "$" * 999, "\\(" * 500, "**" * 500 + "8", "B" * 10_000,
        "(" * 20 + "B" + ")" * 20, "\\text{" * 200 + "red", "1" + "+1" * 5000, "1" + "*9" * 3000,
        "(" * 40 + "2^{2}" + ")" * 40 + "^{2}^{2}^{2}^{2}", "3.14.15.92", "1..2", "..", "+-+-+-1", "e", "E5",
        "\\boxed{10000000!}",          # would hang sympy: rejected by size before the worker
    ]
    rng = random.Random(7)
    out = list(base)
    pool = base[:40] + list(PIECES)
    while len(out) < 3000:
        k = rng.randint(1, 12)
        s = "".join(rng.choice(pool)[: rng.choice((3, 20, 200, 10**6))] for _ in range(k))
        out.append(s)
    return out


_SETTINGS = settings(max_examples=4000, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))
_random_text = _SETTINGS(given(st.text(max_size=300))(_exercise))
_random_pieces = _SETTINGS(given(st.lists(st.one_of(st.sampled_from(PIECES), st.integers(-10**30, 10**30).map(str),
                                                    st.text(max_size=5)), max_size=40).map("".join))(_exercise))


def test_ten_thousand_strings():
    t0 = time.monotonic()
    for s in nasty_strings():
        _exercise(s)
    _random_text()          # hypothesis: arbitrary unicode
    _random_pieces()        # hypothesis: splices of the pieces that matter to the parsers
    elapsed = time.monotonic() - t0
    verifier = dict(_shared_pool(1.0).counts)
    print(f"property test: {STATS['strings']} strings, {STATS['calls']} calls in {elapsed:.1f} s, "
          f"slowest extract_answer {STATS['slowest_call_s'] * 1000:.1f} ms, math-verify worker: {verifier}")
    assert STATS["strings"] >= 10_000
    assert STATS["slowest_call_s"] < 2.0
    assert elapsed < 400


# --- properties of the score itself: sign flips never match, equal values always do ---------------
_SCORER = None


def _score(preds: list[str], refs: list[str], types: list[str | None]) -> list[float]:
    global _SCORER
    if _SCORER is None:
        _SCORER = RewardScorer(workers=1)
    return _SCORER.score(preds, refs, answer_types=types)


def _canon(v: Fraction) -> str:
    """The reference form: an integer, an exact decimal, else p/q."""
    if v.denominator == 1:
        return str(v.numerator)
    k = next((k for k in range(1, 10) if (v * 10**k).denominator == 1), None)
    if k is None:
        return f"{v.numerator}/{v.denominator}"
    digits = str(abs(v.numerator) * 10**k // v.denominator).rjust(k + 1, "0")
    return ("-" if v < 0 else "") + f"{digits[:-k]}.{digits[-k:]}"


def _forms(v: Fraction) -> list[str]:
    """Ways a model states the value v."""
    s = _canon(v)
    sign = "-" if v < 0 else ""
    out = [s, f"\\boxed{{{s}}}", f"The answer is {s}.", f"${s}$", f"x = {s}", f"**{s}**", f"There are {s} apples.",
           f"<think>\nfirst 17, then {s}\n</think>\n\n{s}", s.replace("-", "\u2212"), f"Answer: ({s})"]
    if v.denominator == 1:
        out += [f"{v.numerator:,}", f"{s}.0", f"\\boxed{{{sign}{abs(v.numerator):,}}}".replace(",", "{,}")]
    elif "/" in s:
        out += [f"{sign}\\frac{{{abs(v.numerator)}}}{{{v.denominator}}}", f"\\boxed{{\\dfrac{{{v.numerator}}}{{{v.denominator}}}}}"]
    else:
        out += [s + "0"] + ([f"{sign}{abs(v) * 100}%"] if (v * 100).denominator == 1 else [])     # 0.5 as 50%
    return out


_VALUES = st.one_of(
    st.integers(-10**15, 10**15).map(Fraction),
    st.builds(lambda n, k: Fraction(n, 10**k), st.integers(-10**9, 10**9), st.integers(1, 9)),   # decimals
    st.builds(Fraction, st.integers(-999, 999), st.integers(1, 999)))                            # fractions
_PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                     suppress_health_check=list(HealthCheck))


def _types(v: Fraction) -> list[str | None]:
    return [None, "number", "text"] + (["integer"] if v.denominator == 1 else [])


@_PROPERTY
@given(_VALUES)
def test_equal_values_always_match(v):
    preds, refs, types = [], [], []
    for t in _types(v):
        for f in _forms(v):
            preds.append(f), refs.append(_canon(v)), types.append(t)
    got = _score(preds, refs, types)
    assert _SCORER.counters["verifier"] == 0          # every form is decided in-process
    assert got == [1.0] * len(got), [(p, r, t) for p, r, t, g in zip(preds, refs, types, got) if g != 1.0]


@_PROPERTY
@given(_VALUES.filter(lambda v: v != 0))
def test_sign_flips_never_match(v):
    preds, refs, types = [], [], []
    for t in _types(v):
        for f in _forms(-v):
            preds.append(f), refs.append(_canon(v)), types.append(t)
        for f in _forms(v):
            preds.append(f), refs.append(_canon(-v)), types.append(t)
    got = _score(preds, refs, types)
    assert _SCORER.counters["verifier"] == 0
    assert got == [0.0] * len(got), [(p, r, t) for p, r, t, g in zip(preds, refs, types, got) if g != 0.0]
