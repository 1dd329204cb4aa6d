"""Rule-based rewards: extraction, the issue-15 cases (signs, letter references, inferred types,
prose, oversized math), the real math-verify worker path, a real hang that the wall-clock timeout
must kill, pool recovery, thread safety, TRL-style call, fast-path throughput."""

import os
import threading
import time

import pytest

from r4b_core.data.schema import Record
from r4b_core.modes import Mode
from r4b_core.rewards import RewardError, RewardScorer, accuracy_reward, extract_answer, is_correct

OPTS = ["red", "blue", "green"]
# The golden table of answer forms and their scores: tests/data/reward_golden.jsonl (test_reward_golden.py).


@pytest.mark.parametrize("text,atype,expected", [
    ("<think>\nA = 3\n</think>\n\n8", "integer", "8"),
    ("<think>\nA = 3", "integer", None),                         # truncated think block
    ("<think>\n\n</think>\n\n", "integer", None),                # empty answer
    ("\\boxed{\\frac{3}{4}}", "number", "\\frac{3}{4}"),
    ("\\boxed{x = \\frac{3}{4}}", "number", "\\frac{3}{4}"),
    ("so \\boxed{12} and later \\boxed{13", "integer", None),    # last box cut off
    ("The answer is 42, since 6 × 7 = 42.", "integer", "42"),
    ("The answer is 3 + 5 = 8", "integer", "8"),
    ("Answer: -7", "integer", "-7"),
    ("A = 37\nB = 25\n37 + 25 = 62", "integer", "62"),
    ("it is 1,000 or 2,000", "integer", "1,000"),               # prose: the number after "is"
    ("17 apples and 3 pears", "integer", "17"),                  # prose: the sentence leads with it
    ("3 red and 4 blue, 7 in total", "integer", "7"),
    ("I see 3 red and 4 blue, so 7", "integer", "7"),            # no rule fits: the last number
    ("\\boxed{\\sqrt{2}}", "number", "\\sqrt{2}"),
    ("Answer: red.", "text", "red"),
    ("I think (C).", "choice", "C"),
    ("nothing here", "integer", None),
    ("", None, None),
])
def test_extract_answer(text, atype, expected):
    choices = OPTS if atype == "choice" else None
    assert extract_answer(text, atype, choices) == expected


def test_extract_after_forced_prefix():
    # A forced-think completion excludes its "<think>\n" prefix: without prefix_mode its
    # unfinished trace would read as an answer; with it, it is (correctly) no answer.
    assert extract_answer("A = 3\nB = 5\n3 + 5 = 8", "integer") == "8"
    assert extract_answer("A = 3\nB = 5\n3 + 5 = 8", "integer", prefix_mode=Mode.THINK) is None
    assert extract_answer("A = 3\n</think>\n\n8", "integer", prefix_mode=Mode.THINK) == "8"
    assert extract_answer("8", "integer", prefix_mode=Mode.NO_THINK) == "8"


def test_sign_is_never_normalised_away():
    for p, r in (("4", "-4"), ("-3", "3"), ("1", "-1"), ("(1, 2)", "(-1, 2)"), ("x = 4", "x = -4")):
        assert is_correct(p, r, "text") is False and is_correct(r, p, "text") is False, (p, r)
    assert is_correct("-4", "-4", "text") and is_correct("(-1, 2)", "( -1 , 2 )", "text")


def test_letter_reference_without_a_declared_type():
    with RewardScorer(workers=1) as scorer:
        forms = ["Answer: (B)", "B", "\\boxed{B}", "(B)", "The answer is B."]
        assert scorer.score(forms, ["B"] * len(forms)) == [1.0] * len(forms)
        assert scorer.score(["Answer: (C)", "\\boxed{A}"], ["B", "B"]) == [0.0, 0.0]
        assert all(is_correct(f, "B") for f in forms)


def test_records_without_answer_type_get_the_type_their_answer_implies():
    recs = [Record(id=str(i), question="q", answer=a) for i, a in enumerate(["-3", "4", "1024", "B", "red"])]
    assert [r.answer_type for r in recs] == ["integer", "integer", "integer", "choice", "text"]
    with RewardScorer(workers=1) as scorer:
        assert scorer.score(["The result is -3.", "\\boxed{x=4}", "2^{10}", "Answer: (B)", "Red."], recs) == [1.0] * 5
        assert scorer.score(["The result is 3.", "\\boxed{x=-4}", "2^{11}", "Answer: (A)", "blue"], recs) == [0.0] * 5


def test_score_after_each_forced_prefix():
    # What BPO, curation and evaluation pass: the generated text and the mode whose prefix was forced.
    r = Record(id="r6", question="What is 6 + 6?", answer="12", answer_type="integer")
    texts = ["12", "\n3 steps\n</think>\n\n12", "\n12", "\n\n</think>\n\n\\boxed{12}", "13"]
    mode_of = [Mode.NO_THINK, Mode.AUTO, Mode.THINK, Mode.AUTO, Mode.NO_THINK]
    with RewardScorer(workers=1) as scorer:
        # THINK "\n12": the think block never closed -> no answer, counted as unfinished.
        assert scorer.score(texts, [r] * 5, prefix_modes=mode_of) == [1.0, 1.0, 0.0, 1.0, 0.0]
        assert scorer.counters["unfinished"] == 1 and scorer.counters["parse_failures"] == 0


def test_timeout_kills_a_real_hang_and_the_pool_recovers():
    # The wall-clock timeout is the last line of defence, for a hang the size rules did not foresee:
    # math-verify (sympy) really hangs on 10000000! (minutes, growing memory), which the scorer no
    # longer sends, so the pool gets it directly. The worker is killed at the timeout, the item
    # counts as a timeout, and the next batch still works.
    with RewardScorer(workers=2, timeout_s=3.0) as scorer:    # generous: the machine may be loaded
        pool = scorer._pool
        t0 = time.monotonic()
        got = pool.run([("10000000!", "3"), ("\\sqrt{64}", "8")])
        elapsed = time.monotonic() - t0
        print(f"hang batch: {elapsed:.2f} s, pool {dict(pool.counts)}")
        assert got == [("timeout", None), ("ok", True)]
        assert 3.0 <= elapsed < 60
        assert pool.run([("\\sqrt{81}", "9"), ("(10^{7})!", "1")]) == [("ok", True), ("timeout", None)]
        assert pool.counts["timeout"] == 2 and pool.starts >= 3
        pids = [w.proc.pid for w in pool.workers]
        # Through the scorer: verifier items, fast-path items and an unfinished think block in one batch.
        rewards = scorer.score(["\\boxed{\\sqrt{64}}", "8", "<think>\nunfinished", "9"], ["8", "8", "8", "8"],
                               "integer")
        c = scorer.counters
        assert rewards == [1.0, 1.0, 0.0, 0.0]
        assert c["verifier"] == 1 and c["fast_path"] == 2 and c["unfinished"] == 1 and c["correct"] == 2
    for pid in pids:      # close() ended every worker the scorer started
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_pathological_answers_are_rejected_by_size_before_the_verifier():
    # Before: 9^{999!} cost a 5 s timeout plus a worker restart, (10^{999})! about a second of
    # sympy; now neither reaches a worker. The same math on both sides still matches.
    huge = ["\\boxed{9^{999!}}", "\\boxed{(10^{999})!}", "\\boxed{10000000!}", "2^{5!}", "(5!)!", "1001!", "5!^{2}"]
    with RewardScorer(workers=1, timeout_s=60.0) as scorer:
        assert scorer.score(huge, ["3"] * len(huge), "integer") == [0.0] * len(huge)
        assert scorer.score(["\\boxed{(10^{999})!}"], ["(10^{999})!"], "number") == [1.0]
        c = scorer.counters
        assert c["verifier"] == 0 and c["worker_starts"] == 0 and c["fast_path"] == len(huge) + 1
        assert scorer.score(["\\boxed{5!}", "6!"], ["120", "120"], "integer") == [1.0, 0.0]   # small: verified
        assert scorer.counters["verifier"] == 2


def test_is_correct_from_a_thread_uses_the_verifier():
    # SIGALRM-based timeouts fail off the main thread; ours live in worker processes.
    out = {}

    def work():
        out["sqrt"] = is_correct("\\boxed{\\sqrt{49}}", "7", "integer")
        out["wrong"] = is_correct("\\sqrt{50}", "7", "integer")

    t = threading.Thread(target=work)
    t.start()
    t.join(120)
    assert out == {"sqrt": True, "wrong": False}


def test_scorer_takes_records_and_counts():
    recs = [Record(id="1", question="q", answer="8", answer_type="integer"),
            Record(id="2", question="q", answer="red", answer_type="text"),
            Record(id="3", question="q", answer="B", answer_type="choice", choices=OPTS)]
    with RewardScorer() as scorer:
        got = scorer.score(["<think>\n\n</think>\n\n8", "Red", "blue"], recs)
        assert got == [1.0, 1.0, 1.0]
        assert scorer.counters["correct"] == 3 and scorer.counters["worker_starts"] == 0
        with pytest.raises(RewardError, match="2 answers for 3 completions"):
            scorer.score(["a", "b", "c"], ["1", "2"])


def test_accuracy_reward_trl_style():
    completions = [[{"role": "assistant", "content": "<think>\n3 + 5 = 8\n</think>\n\n8"}],
                   [{"role": "assistant", "content": "7"}],
                   [{"role": "assistant", "content": "8"}]]
    got = accuracy_reward(completions, answer=["8", "8", ""], answer_type=["integer"] * 3,
                          prompts=["p"] * 3, completion_ids=[[1]] * 3)
    assert got == [1.0, 0.0, None]      # None: no reference to score against
    assert accuracy_reward.__name__ == "accuracy_reward"
    # forced-mode completions without their prefix
    got = accuracy_reward(["3 + 5 = 8", "3 + 5 = 8\n</think>\n\n8"], answer=["8", "8"],
                          prefix_mode=[Mode.THINK, Mode.THINK])
    assert got == [0.0, 1.0]


def test_fast_path_throughput():
    n = 10_000
    completions = [f"<think>\nA = {i}\nB = 2\n{i} + 2 = {i + 2}\n</think>\n\n{i + 2}" if i % 2 else f"{i:,}"
                   for i in range(n)]
    answers = [str(i + 2) if i % 2 else str(i) for i in range(n)]
    with RewardScorer() as scorer:
        t0, c0 = time.perf_counter(), time.process_time()
        rewards = scorer.score(completions, answers, "integer")
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"fast path: {n} items in {wall:.2f} s wall / {cpu:.2f} s CPU = {n / wall:,.0f} items/s wall, "
              f"{n / cpu:,.0f} items/s CPU")
        assert rewards == [1.0] * n
        assert scorer.counters["fast_path"] == n and scorer.counters["worker_starts"] == 0
        assert n / cpu > 2000         # CPU time: wall time on this shared machine swings 10x
