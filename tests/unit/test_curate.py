"""Curation logic on hand-made completions: labelling, judge parsing, consistency filter, dedup,
keyword filter, quarantine of bad lines, and a whole run_curate with a replaying engine."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from r4b_core import curate, modes
from r4b_core.config import RunConfig
from r4b_core.data.schema import Record
from r4b_core.errors import R4BError
from r4b_core.modes import Mode
from r4b_core.rollout.base import Completion, GenerationRequest


@pytest.fixture(scope="module")
def scorer():
    from r4b_core.rewards import RewardScorer

    with RewardScorer(workers=1) as s:
        yield s


def rec(i: int, **kw) -> Record:
    base = dict(id=f"r{i}", question=f"What is {i} + {i}?", answer=str(2 * i), answer_type="integer",
                category="math", difficulty=1)
    base.update(kw)
    return Record(**base)


def comp(key: str, text: str, mode=Mode.NO_THINK) -> Completion:
    return Completion(key=key, mode=mode, text=text, token_ids=list(range(len(text.split()) + 1)),
                      logprobs=[0.0] * (len(text.split()) + 1), finish_reason="stop")


# --- labelling ---------------------------------------------------------------------------------
def test_label_threshold():
    assert curate.label_for_passes(0, 0) == "reasoning"
    assert curate.label_for_passes(1, 0) == "direct"
    assert curate.label_for_passes(8, 0) == "direct"
    assert curate.label_for_passes(2, 2) == "reasoning"
    assert curate.label_for_passes(3, 2) == "direct"


def _label(scorer, records, groups, max_correct=0, n=4):
    cfg = RunConfig().curate.model_copy(update={"num_samples": n, "max_correct_for_reasoning": max_correct})
    items = [curate.Item(record=r, where=f"x.jsonl:{i + 1}", raw="{}") for i, r in enumerate(records)]
    stats = curate.CurateStats(num_samples=n)
    curate.apply_labels(items, groups, cfg, scorer, stats)
    return items, stats


def test_all_wrong_is_reasoning_any_right_is_direct(scorer):
    a, b, c = rec(1), rec(2), rec(3)
    groups = [
        [comp("r1", "7"), comp("r1", "3"), comp("r1", ""), comp("r1", "5")],      # 0/4 -> reasoning
        [comp("r2", "1"), comp("r2", "4"), comp("r2", "9"), comp("r2", "0")],     # 1/4 -> direct
        [comp("r3", "6")] * 4,                                                     # 4/4 -> direct
    ]
    items, stats = _label(scorer, [a, b, c], groups)
    assert [it.label for it in items] == ["reasoning", "direct", "direct"]
    assert [it.num_correct for it in items] == [0, 1, 4]
    assert stats.pass_hist["math"] == [1, 1, 0, 0, 1]


def test_threshold_two_correct_still_reasoning(scorer):
    # "10.0" and "The answer is 10" count as right: the BPO reward's scorer decides, not string equality.
    groups = [[comp("r5", "10.0"), comp("r5", "The answer is 10."), comp("r5", "0"), comp("r5", "1")]]
    items, _ = _label(scorer, [rec(5)], groups, max_correct=2)
    assert items[0].label == "reasoning" and items[0].num_correct == 2
    items, _ = _label(scorer, [rec(5)], groups, max_correct=1)
    assert items[0].label == "direct"


def test_no_think_sample_that_opens_a_think_block_is_not_an_answer(scorer):
    # After the no-think prefix the block is closed; a sample that re-opens one and never closes
    # it has no final answer (parse_response drops junk after the answer).
    groups = [[comp("r1", "<think>\n2"), comp("r1", "3"), comp("r1", "3"), comp("r1", "3")]]
    items, _ = _label(scorer, [rec(1)], groups)
    assert items[0].num_correct == 0


@pytest.mark.parametrize("text, verdict", [
    ("yes", True), ("Yes.", True), ("**YES** it does", True), ("  no", False), ("No, it is a lookup.", False),
    ("true", True), ("False", False), ("<think>\nhmm\n</think>\n\nyes", True),
    ("42", None), ("", None), ("maybe", None), ("yesterday nothing", None), ("<think>\nyes", None),
])
def test_parse_judge(text, verdict):
    assert curate.parse_judge(text) is verdict


def test_judge_path_yes_no_garbage(scorer):
    subj = [rec(i, objective=False, category="general", question=f"Describe picture {i}") for i in (1, 2, 3)]
    groups = [[comp("r1", "yes")], [comp("r2", "no")], [comp("r3", "blue 7")]]
    items, stats = _label(scorer, subj, groups)
    assert [it.label for it in items] == ["reasoning", "direct", "direct"]
    assert [it.judge for it in items] == [True, False, None]
    assert stats.judge["general"] == {"yes": 1, "no": 1, "unparsed": 1}
    assert "general" not in stats.pass_hist


def test_judge_prompt_is_no_think_and_contains_question():
    from r4b_core.models.chat import ChatFormat

    p = curate.judge_prompt(ChatFormat.of(None), "Why is the sky blue?", 1)
    assert p.endswith(modes.generation_prefix(Mode.NO_THINK))
    assert "Why is the sky blue?" in p and modes.IMAGE_TOKEN in p


def test_build_requests_objective_and_subjective():
    cfg = RunConfig().curate.model_copy(update={"num_samples": 8, "temperature": 0.7})
    items = [curate.Item(record=rec(1), where="f:1", raw=""),
             curate.Item(record=rec(2, objective=False), where="f:2", raw="")]
    from r4b_core.models.chat import ChatFormat

    reqs = curate.build_requests(items, [["img"], []], cfg, 5, ChatFormat.of(None))
    assert (reqs[0].n, reqs[0].temperature, reqs[0].mode, reqs[0].seed) == (8, 0.7, Mode.NO_THINK, 5)
    assert reqs[0].prompt == modes.chat_prompt("What is 1 + 1?", 1, mode=Mode.NO_THINK)
    assert (reqs[1].n, reqs[1].temperature) == (1, 0.0)
    assert curate.JUDGE_INSTRUCTION.split("?")[0] in reqs[1].prompt


def test_split_completions_checks_the_contract():
    reqs = [GenerationRequest(prompt="a", n=2, key="a"), GenerationRequest(prompt="b", n=1, key="b")]
    groups = curate.split_completions(reqs, [comp("a", "1"), comp("a", "2"), comp("b", "3")])
    assert [[c.text for c in g] for g in groups] == [["1", "2"], ["3"]]
    with pytest.raises(curate.CurateError, match="2 completions for 3"):
        curate.split_completions(reqs, [comp("a", "1"), comp("b", "3")])
    with pytest.raises(curate.CurateError, match="out of order"):
        curate.split_completions(reqs, [comp("a", "1"), comp("b", "2"), comp("a", "3")])


# --- consistency filter -------------------------------------------------------------------------
def test_consistency_check(scorer):
    r = rec(4)  # answer 8
    trace, why = curate.consistency_check("4 + 4 = 8\n</think>\n\n8", r, scorer)
    assert trace == "4 + 4 = 8" and why is None
    # The trace mentions the right number but the final answer is wrong: rejected.
    trace, why = curate.consistency_check("4 + 4 = 8\n8 + 1 = 9\n</think>\n\n9", r, scorer)
    assert trace is None and why.startswith("teacher_inconsistent") and "'9'" in why
    trace, why = curate.consistency_check("4 + 4 = 8", r, scorer)
    assert trace is None and why.startswith("teacher_truncated")
    trace, why = curate.consistency_check("</think>\n\n8", r, scorer)
    assert trace is None and why.startswith("teacher_empty_trace")


# --- dedup and keyword filter -------------------------------------------------------------------
def test_dedup_key_normalises_question_and_hashes_pixels(tmp_path):
    red = Image.new("RGB", (8, 8), (255, 0, 0))
    red.save(tmp_path / "a.png")
    red.save(tmp_path / "b.png", optimize=True, compress_level=1)   # same pixels, other bytes
    blue = Image.new("RGB", (8, 8), (0, 0, 255))
    da = curate.image_digest(Image.open(tmp_path / "a.png").convert("RGB"))
    db = curate.image_digest(Image.open(tmp_path / "b.png").convert("RGB"))
    assert da == db
    assert curate.dedup_key("What is  the FIRST number?", [da]) == curate.dedup_key("what is the first number", [db])
    assert curate.dedup_key("What is the first number?", [da]) != curate.dedup_key("What is the second number?", [da])
    assert curate.dedup_key("q", [da]) != curate.dedup_key("q", [curate.image_digest(blue)])


def test_find_banned():
    assert curate.find_banned(["As an AI language model, I"], ["as an ai", "sorry"]) == "as an ai"
    assert curate.find_banned(["fine", None], ["sorry"]) is None
    assert curate.find_banned(["SORRY"], ["", "sorry"]) == "sorry"


# --- reading raw input --------------------------------------------------------------------------
def test_read_raw_quarantines_bad_lines_with_file_line():
    lines = [
        json.dumps(rec(1).model_dump()),
        "{not json",
        "",
        json.dumps({"id": "x", "question": "q"}),            # answer missing
        json.dumps(rec(2).model_dump() | {"images": ["images/a.png"]}),
    ]
    items, rejects = curate.read_raw("\n".join(lines) + "\n", "/data/raw.jsonl")
    assert [it.record.id for it in items] == ["r1", "r2"]
    assert [it.where for it in items] == ["/data/raw.jsonl:1", "/data/raw.jsonl:5"]
    assert items[1].image_refs == ["/data/images/a.png"]
    assert [r["where"] for r in rejects] == ["/data/raw.jsonl:2", "/data/raw.jsonl:4"]
    assert rejects[0]["reason"].startswith("bad_line: (line): not valid JSON")
    assert rejects[1]["reason"] == "bad_line: answer: missing required field"
    assert rejects[0]["line"] == "{not json"


def test_resolve_ref():
    assert curate.resolve_ref("s3://b/run/data/train.jsonl", "images/x.png") == "s3://b/run/data/images/x.png"
    assert curate.resolve_ref("s3://b/run/data/train.jsonl", "/abs/x.png") == "/abs/x.png"
    assert curate.resolve_ref("/r/data/train.jsonl", "images/x.png") == "/r/data/images/x.png"


def test_stage_prefix():
    assert curate.stage_prefix("runs/t/curate/sft.jsonl") == ("runs/t/curate", "runs/t/curate/sft.jsonl")
    assert curate.stage_prefix("s3://b/t/curate/") == ("s3://b/t/curate", "s3://b/t/curate/sft.jsonl")


def test_stats_summary():
    s = curate.CurateStats(num_samples=2)
    for label, cat in (("reasoning", "math"), ("direct", "math"), ("direct", "perception")):
        s.add_kept(curate.Item(record=rec(1, category=cat), where="", raw="", label=label))
    s.add_passes("math", 0)
    s.add_passes("math", 2)
    s.add_reject("duplicate: same as f:1")
    s.add_reject("duplicate: same as f:2")
    s.add_reject("bad_line: x")
    d = s.to_dict()
    assert d["reasoning_ratio"] == pytest.approx(1 / 3)
    assert d["by_category"]["math"]["reasoning_ratio"] == 0.5
    assert d["by_category"]["perception"]["reasoning_ratio"] == 0.0
    assert d["pass_hist"] == [1, 0, 1] and d["pass_hist_bins"] == ["0/2", "1/2", "2/2"]
    assert d["rejected"] == {"bad_line": 1, "duplicate": 2} and d["rejected_total"] == 3


# --- the whole stage, with an engine that answers by rule ----------------------------------------
class RuleEngine:
    """A RolloutEngine that answers like a direct-answer annotator: perception right, math wrong,
    judge "yes" for questions containing "why", and (as teacher) a trace that is right only for
    even answers. It stands in for a model whose outputs we must know exactly; the real tiny
    model runs through the same code in tests/integration/test_curate_eval_run.py."""

    policy_version = 0

    def __init__(self, answers: dict[str, str]):
        from r4b_core.models.chat import ChatFormat

        self.answers = answers
        self.calls: list[list[GenerationRequest]] = []
        self.chat = ChatFormat.of(None)

    def generate(self, requests):
        self.calls.append(list(requests))
        out = []
        for r in requests:
            ans = self.answers[r.key]
            for s in range(r.n):
                if r.mode == Mode.THINK:
                    text = f"steps for {r.key}\n</think>\n\n" + (ans if int(ans) % 2 == 0 else str(int(ans) + 1))
                elif curate.JUDGE_INSTRUCTION[:20] in r.prompt:
                    text = "yes" if "why" in r.prompt.lower() else "no"
                elif r.key.startswith("m"):
                    text = str(int(ans) + 1 + s)        # every sample wrong
                else:
                    text = ans if s == 0 else "0"      # one sample right
                out.append(Completion(key=r.key, mode=r.mode, text=text, token_ids=[1] * (1 + len(text) // 2),
                                      logprobs=[0.0], finish_reason="stop"))
        return out

    def update_weights(self, model_or_path, version):
        raise NotImplementedError

    def close(self):
        pass


def test_run_curate_writes_sft_rejects_manifest(tmp_path):
    from r4b_core.storage import Store

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for name, color in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))):
        Image.new("RGB", (16, 16), color).save(data / "images" / f"{name}.png")
    rows = [
        dict(id="p1", images=["images/a.png"], question="What colour is it?", answer="5", category="perception"),
        dict(id="m1", images=["images/a.png"], question="Compute 3 + 4 x 5.", answer="23", reasoning="4 x 5 = 20\n3 + 20 = 23"),
        dict(id="m2", images=["images/b.png"], question="Compute 2 x 3 + 4.", answer="10"),          # no trace: teacher, even -> kept
        dict(id="m3", images=["images/c.png"], question="Compute 1 + 2 x 3.", answer="7"),           # no trace: teacher wrong -> rejected
        dict(id="p2", images=["images/a.png"], question="what colour is it", answer="5", category="perception"),  # duplicate of p1
        dict(id="m4", images=["images/missing.png"], question="Compute 1 + 1.", answer="2"),       # image missing
        dict(id="s1", images=["images/b.png"], question="Why is the sky blue?", answer="scattering", answer_type="text",
             objective=False, category="general", reasoning="Rayleigh scattering favours short wavelengths."),
        dict(id="s2", images=["images/c.png"], question="Name this colour.", answer="blue", answer_type="text",
             objective=False, category="general"),
        dict(id="m5", images=["images/c.png"], question="Compute 9 - 2 x 3.", answer="3", reasoning="As an AI, 2 x 3 = 6"),
    ]
    lines = [json.dumps({"answer_type": "integer", "category": "math", "difficulty": 2} | r) for r in rows]
    lines.insert(3, "{broken json")
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    cfg = RunConfig.model_validate({"storage": {"root": str(tmp_path / "runs")},
                                    "curate": {"num_samples": 3, "batch_size": 4, "banned_keywords": ["as an ai"]}})
    engine = RuleEngine({r["id"]: r["answer"] if r["answer"].isdigit() else "0" for r in rows})
    out = tmp_path / "runs" / "tiny" / "curate" / "sft.jsonl"
    manifest = curate.run_curate(cfg, str(data / "train.jsonl"), str(out), annotator=engine, teacher=engine)

    kept = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(kept) == {"p1", "m1", "m2", "s1", "s2"}
    assert kept["p1"]["label"] == "direct" and kept["s2"]["label"] == "direct"
    assert kept["m1"]["label"] == "reasoning" and kept["m1"]["reasoning"] == "4 x 5 = 20\n3 + 20 = 23"
    assert kept["m2"]["label"] == "reasoning" and kept["m2"]["reasoning"] == "steps for m2"
    assert kept["s1"]["label"] == "reasoning"
    assert kept["p1"]["images"] == [str(data / "images" / "a.png")]      # absolute: sft.jsonl lives elsewhere
    assert Record.model_validate(kept["m2"]).sft_target().startswith("<think>\nsteps for m2\n</think>")

    rejects = [json.loads(x) for x in (out.parent / "rejects.jsonl").read_text().splitlines()]
    by_reason = {r["reason"].split(":")[0]: r for r in rejects}
    assert set(by_reason) == {"bad_line", "duplicate", "image_missing", "teacher_inconsistent", "banned_keyword"}
    assert by_reason["bad_line"]["where"] == f"{data / 'train.jsonl'}:4"
    assert by_reason["bad_line"]["line"] == "{broken json"
    assert json.loads(by_reason["duplicate"]["line"])["id"] == "p2"
    assert by_reason["duplicate"]["reason"].endswith(f"{data / 'train.jsonl'}:1")
    assert "missing.png" in by_reason["image_missing"]["reason"]
    assert json.loads(by_reason["teacher_inconsistent"]["line"])["id"] == "m3"
    assert json.loads(by_reason["banned_keyword"]["line"])["id"] == "m5"

    # One generate call per batch for labelling (all N samples of all items), one for the teacher.
    label_calls = [c for c in engine.calls if c[0].mode == Mode.NO_THINK]
    assert [sum(r.n for r in c) for c in label_calls] == [3 + 3 + 3 + 3, 1 + 1 + 3]
    teacher_calls = [c for c in engine.calls if c[0].mode == Mode.THINK]
    assert [[r.key for r in c] for c in teacher_calls] == [["m2", "m3"]]

    st = manifest["stats"]
    assert manifest["counts"] == {"read": 10, "kept": 5, "rejected": 5}
    assert st["by_category"]["math"]["reasoning_ratio"] == 1.0
    assert st["by_category"]["perception"]["reasoning_ratio"] == 0.0
    assert st["by_category"]["general"]["judge"] == {"yes": 1, "no": 1}
    assert st["pass_hist"] == [4, 1, 0, 0]      # m1, m2, m3, m5 got 0/3; p1 got 1/3
    assert st["rejected"] == {"bad_line": 1, "banned_keyword": 1, "duplicate": 1, "image_missing": 1,
                              "teacher_inconsistent": 1}
    assert st["teacher"] == {"generated": 2, "kept": 1, "rejected": 1} and st["traces_from_record"] == 3
    assert manifest["throughput"]["items_per_s"] > 0 and manifest["throughput"]["tokens_per_s"] > 0
    assert Store.from_config(cfg.storage).is_complete(str(out.parent), manifest["config_hash"])

    # Engines passed in have no lineage to check, so a rerun recomputes (same result) instead of
    # trusting the old manifest; config-built annotators skip (tests/integration).
    assert manifest["config_hash"].startswith("unverified-")
    first = out.read_text()
    n_calls = len(engine.calls)
    again = curate.run_curate(cfg, str(data / "train.jsonl"), str(out), annotator=engine, teacher=engine)
    assert len(engine.calls) == 2 * n_calls and out.read_text() == first
    assert again["config_hash"] != manifest["config_hash"]


def test_curation_that_rejects_every_record_fails_with_the_reject_summary(tmp_path):
    """A reasoning item without trace or teacher is rejected; when that leaves nothing, the stage
    fails (no empty dataset committed), naming the reasons; the rejects are kept beside."""
    data = tmp_path / "d.jsonl"
    rows = [dict(id="m1", question="Compute 3 + 4 x 5.", answer="23", answer_type="integer"),
            dict(id="m2", question="Compute 5 + 4 x 5.", answer="25", answer_type="integer")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    cfg = RunConfig.model_validate({"storage": {"root": str(tmp_path)}, "curate": {"num_samples": 2}})
    with pytest.raises(curate.CurateError) as info:
        curate.run_curate(cfg, str(data), str(tmp_path / "c"), annotator=RuleEngine({"m1": "23", "m2": "25"}))
    msg = str(info.value)
    assert msg.startswith(f"{data}: every one of the 3 records was rejected (2 no_trace, 1 bad_line); first: ")
    assert msg.endswith(f"all in {tmp_path / 'c' / 'rejects.failed.jsonl'}") and "\n" not in msg
    rej = [json.loads(x) for x in (tmp_path / "c" / "rejects.failed.jsonl").read_text().splitlines()]
    assert any("no curate.teacher is configured" in r["reason"] and r["where"].endswith("d.jsonl:1") for r in rej)
    assert not (tmp_path / "c" / "manifest.json").exists() and not (tmp_path / "c" / "sft.jsonl").exists()


def test_rerun_that_fails_at_start_up_keeps_the_finished_output_and_its_manifest(tmp_path, repo_root):
    """A finished curation, then a rerun under another config whose annotator cannot be opened:
    the error, and the finished stage still complete for its own config, its files untouched."""
    from r4b_core.config import load_config
    from r4b_core.data.synthetic import generate_split
    from r4b_core.storage import Store

    sets = [f"storage.root={tmp_path}", "data.synthetic.train_size=8"]
    cfg = load_config(repo_root / "configs" / "repro.yaml", sets)
    raw = generate_split("train", 8, cfg.data.synthetic, tmp_path / "data")
    out = tmp_path / "curate" / "sft.jsonl"
    finished = curate.run_curate(cfg, str(raw), str(out))
    before = out.read_text()
    broken = load_config(repo_root / "configs" / "repro.yaml", sets + [f"curate.annotator={tmp_path / 'no-model'}",
                                                                      "curate.engine=hf"])
    with pytest.raises(R4BError):
        curate.run_curate(broken, str(raw), str(out))
    assert Store().is_complete(str(out.parent), finished["config_hash"])
    assert out.read_text() == before


def test_identity_tracks_raw_content_and_annotator_lineage(tmp_path):
    from r4b_core.identity import identity_hash
    from r4b_core.storage import Store

    cfg = RunConfig.model_validate({"storage": {"root": str(tmp_path)}})
    store = Store.from_config(cfg.storage)
    base = tmp_path / "tiny" / "base_model"
    base.mkdir(parents=True)
    store.commit(str(base), {"config_hash": "base-v1"})
    a = identity_hash(curate.curate_identity(cfg, store, "line\n", False, False))
    assert a == identity_hash(curate.curate_identity(cfg, store, "line\n", False, False))
    assert a != identity_hash(curate.curate_identity(cfg, store, "other line\n", False, False))
    # Annotator training settings and the base model's own identity are part of it.
    cfg2 = cfg.model_copy(update={"anneal": cfg.anneal.model_copy(update={"pack_length": 256})})
    assert a != identity_hash(curate.curate_identity(cfg2, store, "line\n", False, False))
    store.commit(str(base), {"config_hash": "base-v2"})
    assert a != identity_hash(curate.curate_identity(cfg, store, "line\n", False, False))
    # A model folder without a manifest, or an engine passed in: unknown -> never skipped.
    cfg3 = cfg.model_copy(update={"curate": cfg.curate.model_copy(update={"annotator": str(tmp_path / "m")})})
    assert identity_hash(curate.curate_identity(cfg3, store, "line\n", False, False)) is None
    assert identity_hash(curate.curate_identity(cfg, store, "line\n", True, False)) is None


# --- the simulated strong annotator (curate.annotator: simulated) --------------------------------
def _records():
    from r4b_core.data.schema import Record

    return [Record(id="p1", question="What colour is the first number?", answer="red", answer_type="text",
                   category="perception", difficulty=1),
            Record(id="m1", question="Compute A + B.", answer="7", category="math", difficulty=1,
                   answer_type="integer"),
            Record(id="m2", question="Compute A + B × C.", answer="43", category="math", difficulty=2,
                   answer_type="integer")]


def _answers(ann, rid, n=8, seed=0):
    from r4b_core.rollout.base import GenerationRequest

    return [c.text for c in ann.generate([GenerationRequest(prompt="?", key=rid, n=n, seed=seed)])]


def test_simulated_annotator_answers_with_its_per_cell_accuracy_and_is_seeded():
    ann = curate.SimulatedAnnotator(_records(), {"perception": 1.0, "math/1": 0.0, "math": 0.5}, seed=3)
    assert ann.p_correct(_records()[2]) == 0.5                 # no math/2 entry: the category's
    assert _answers(ann, "p1") == ["red"] * 8
    wrong = _answers(ann, "m1")
    assert all(w != "7" and w.lstrip("-").isdigit() for w in wrong)   # wrong, but a number like the answer
    many = [a == "43" for s in range(50) for a in _answers(ann, "m2", seed=s)]
    assert 0.4 < sum(many) / len(many) < 0.6
    assert _answers(ann, "m2", seed=7) == _answers(ann, "m2", seed=7)
    colour_wrong = _answers(curate.SimulatedAnnotator(_records(), {"perception": 0.0, "math": 0.0}, 0), "p1")
    assert all(c != "red" and c.isalpha() for c in colour_wrong)
    with pytest.raises(curate.CurateError, match="no entry for math/2"):
        curate.SimulatedAnnotator(_records(), {"perception": 1.0, "math/1": 1.0}, 0).p_correct(_records()[2])


def test_curation_with_the_simulated_annotator_labels_by_cell_and_skips_on_rerun(tmp_path, repo_root):
    from r4b_core.config import load_config
    from r4b_core.data.schema import read_jsonl
    from r4b_core.data.synthetic import generate_all

    acc = "curate.simulated_accuracy={perception: 1.0, math/1: 1.0, math/2: 0.0}"
    cfg = load_config(repo_root / "configs" / "repro.yaml", [
        f"storage.root={tmp_path}", "data.synthetic.train_size=60", "data.synthetic.rl_size=4",
        "data.synthetic.eval_size=4", "data.synthetic.difficulties=[1, 2]", acc])
    assert cfg.curate.annotator == "simulated"
    raw = generate_all(cfg.data.synthetic, tmp_path / "data")["train"]
    records = read_jsonl(raw).records
    out = str(tmp_path / "curate" / "sft.jsonl")
    manifest = curate.run_curate(cfg, str(raw), out)                            # built from the config
    labels = {r.id: r.label for r in read_jsonl(out).records}
    for r in records:
        assert labels[r.id] == ("reasoning" if (r.category, r.difficulty) == ("math", 2) else "direct"), r
    stamp = (tmp_path / "curate" / "manifest.json").stat().st_mtime_ns
    again = curate.run_curate(cfg, str(raw), out)                               # same annotator: skipped
    assert again["config_hash"] == manifest["config_hash"]
    assert (tmp_path / "curate" / "manifest.json").stat().st_mtime_ns == stamp
    stronger = load_config(repo_root / "configs" / "repro.yaml", [
        f"storage.root={tmp_path}", "data.synthetic.train_size=60", "data.synthetic.rl_size=4",
        "data.synthetic.eval_size=4", "data.synthetic.difficulties=[1, 2]",
        "curate.simulated_accuracy={perception: 1.0, math/1: 0.0, math/2: 0.0}"])
    redone = curate.run_curate(stronger, str(raw), out)                        # another annotator: redone
    assert redone["config_hash"] != manifest["config_hash"]
    assert sum(r.label == "reasoning" for r in read_jsonl(out).records) == sum(
        r.category == "math" for r in records)
    # an engine passed in that states its identity is skipped on it, like the configured one
    ann = curate.SimulatedAnnotator(records, {"perception": 1.0, "math": 0.0}, seed=0)
    first = curate.run_curate(cfg, str(raw), out, annotator=ann)
    assert curate.run_curate(cfg, str(raw), out, annotator=ann)["config_hash"] == first["config_hash"]


def test_item_whose_prompt_does_not_fit_the_annotator_is_rejected_not_fatal(tmp_path, tiny_model_dir):
    """The engine refuses a prompt longer than the model's positions before any prefill; curation
    rejects that item as prompt_too_long and labels the rest."""
    from r4b_core.models.loading import load_model
    from r4b_core.rollout.hf import HFEngine

    long_q = "What is " + " + ".join(str(i % 10) for i in range(1500)) + "?"
    rows = [dict(id="p1", question="What colour is it?", answer="5", category="perception"),
            dict(id="m1", question=long_q, answer="1", category="math"),
            dict(id="p2", question="How many squares?", answer="3", category="perception")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(dict(r, answer_type="integer", reasoning="look")) + "\n" for r in rows))
    cfg = RunConfig.model_validate({"storage": {"root": str(tmp_path)},
                                    "curate": {"num_samples": 2, "max_new_tokens": 4}})
    model, processor = load_model(str(tiny_model_dir))
    manifest = curate.run_curate(cfg, str(data), str(tmp_path / "c"), annotator=HFEngine(model, processor))
    assert manifest["counts"] == {"read": 3, "kept": 2, "rejected": 1}
    rej = json.loads((tmp_path / "c" / "rejects.jsonl").read_text())
    assert rej["where"].endswith("d.jsonl:2") and rej["reason"].startswith("prompt_too_long: request 'm1': a prompt of ")
