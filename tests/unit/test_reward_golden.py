"""The golden table, tests/data/reward_golden.jsonl: at least 200 answer forms (numbers, signs,
fractions, percent, thousands separators, units, LaTeX, boxed, choices with and without a declared
type, prose, unclosed think blocks, forced prefixes) with the score each must get.

Each row: `completion` (what the model generated), `mode` (the forced prefix it was generated after;
null: a plain answer or a full transcript), `answer`, optional `answer_type` / `choices` (absent:
the record schema infers the type, as for any dataset), `expected` (1 or 0), `note`. The rows run
through the one scoring function, `RewardScorer.score`, and through each stage that calls it (BPO's
reward, curation's labels, evaluation's accuracy), which must all give the expected score.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r4b_core import bpo, curate, evaluate, modes
from r4b_core.config import RunConfig
from r4b_core.data.schema import Record
from r4b_core.modes import Mode
from r4b_core.rewards import RewardScorer, is_correct
from r4b_core.rollout.base import Completion

ROWS = [json.loads(line) for line in (Path(__file__).parents[1] / "data" / "reward_golden.jsonl")
        .read_text(encoding="utf-8").split("\n") if line.strip()]
RECORDS = [Record.model_validate({"id": f"g{i}", "question": "q", "answer": row["answer"],
                                  **{k: row[k] for k in ("answer_type", "choices") if row.get(k) is not None}})
           for i, row in enumerate(ROWS)]


def _mode(row: dict) -> Mode | None:
    return Mode.parse(row["mode"]) if row["mode"] else None


def _as_generated(row: dict) -> tuple[Mode, str]:
    """The row as a stage sees it: a forced mode and the text generated after its prefix (a full
    transcript starts with the auto prefix; a plain answer reads the same after the no-think one)."""
    if row["mode"]:
        return Mode.parse(row["mode"]), row["completion"]
    auto = modes.generation_prefix(Mode.AUTO)
    if row["completion"].startswith(auto):
        return Mode.AUTO, row["completion"][len(auto):]
    return Mode.NO_THINK, row["completion"]


def _completion(key: str, mode: Mode, text: str) -> Completion:
    return Completion(key=key, mode=mode, text=text, token_ids=[0], logprobs=[0.0], finish_reason="stop")


def _mismatches(got: list, rows: list[dict], where: str) -> str:
    bad = [f"{where}: row {ROWS.index(r) + 1}: {r['completion']!r} vs {r['answer']!r} "
           f"({r.get('answer_type')}, {r['note'] or '-'}): expected {r['expected']}, got {g}"
           for r, g in zip(rows, got) if g != r["expected"]]
    return "\n".join(bad)


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer(workers=2) as s:
        yield s


def test_the_table_covers_what_it_claims():
    assert len(ROWS) >= 200
    assert {r["expected"] for r in ROWS} == {0, 1}
    assert sum(r.get("answer_type") is None for r in ROWS) >= 40           # types inferred by the schema
    assert sum(bool(r.get("choices")) for r in ROWS) >= 20
    assert sum(r["mode"] is not None for r in ROWS) >= 10                  # forced prefixes
    assert sum(modes.THINK_OPEN in r["completion"] for r in ROWS) >= 10    # transcripts, unclosed blocks


def test_golden_table_through_the_scorer(scorer):
    got = scorer.score([r["completion"] for r in ROWS], RECORDS, prefix_modes=[_mode(r) for r in ROWS])
    assert not _mismatches(got, ROWS, "RewardScorer.score"), _mismatches(got, ROWS, "RewardScorer.score")
    c = scorer.counters
    print(f"golden table: {len(ROWS)} rows, counters {c}")
    assert c["timeouts"] == 0 and c["verifier_errors"] == 0
    # is_correct is the same path for one item
    single = [float(is_correct(r["completion"], rec.answer, rec.answer_type, rec.choices, prefix_mode=_mode(r)))
              for r, rec in zip(ROWS, RECORDS)]
    assert not _mismatches(single, ROWS, "is_correct"), _mismatches(single, ROWS, "is_correct")


def test_golden_table_through_bpo_curate_and_eval(scorer):
    generated = [_as_generated(r) for r in ROWS]
    comps = [_completion(rec.id, m, t) for rec, (m, t) in zip(RECORDS, generated)]

    # BPO: one rollout per prompt
    scored = bpo.score_rollouts(scorer, [bpo.Prompt(rec, []) for rec in RECORDS], comps, 1)
    got = [s.reward for s in scored]
    assert not _mismatches(got, ROWS, "bpo.score_rollouts"), _mismatches(got, ROWS, "bpo.score_rollouts")

    # curation labels from no-think samples: one sample per item, passes = its score
    direct = [k for k, (m, _) in enumerate(generated) if m == Mode.NO_THINK]
    items = [curate.Item(record=RECORDS[k], where=f"golden:{k + 1}", raw="{}") for k in direct]
    cfg = RunConfig().curate.model_copy(update={"num_samples": 1})
    curate.apply_labels(items, [[comps[k]] for k in direct], cfg, scorer, curate.CurateStats(num_samples=1))
    got = [it.num_correct for it in items]
    rows = [ROWS[k] for k in direct]
    assert len(direct) >= 150 and not _mismatches(got, rows, "curate"), _mismatches(got, rows, "curate")

    # evaluation: each mode's rows through predict, the engine replaying the table
    from r4b_core.models.chat import ChatFormat

    class Replay:
        policy_version = 0
        chat = ChatFormat.of(None)              # r4b's own prompt format (evaluate renders with it)

        def __init__(self, texts: dict[str, str]):
            self.texts = texts

        def generate(self, requests):
            return [_completion(r.key, r.mode, self.texts[r.key]) for r in requests]

    for mode in (Mode.AUTO, Mode.THINK, Mode.NO_THINK):
        ks = [k for k, (m, _) in enumerate(generated) if m == mode]
        engine = Replay({f"{RECORDS[k].id}\x1f{mode.value}": generated[k][1] for k in ks})
        preds, _ = evaluate.predict(engine, [RECORDS[k] for k in ks], [mode.value], 8, 64, scorer, "golden",
                                    lambda rec: [])
        got = [float(p["correct"]) for p in preds]
        rows = [ROWS[k] for k in ks]
        assert ks and not _mismatches(got, rows, f"eval {mode.value}"), _mismatches(got, rows, f"eval {mode.value}")
