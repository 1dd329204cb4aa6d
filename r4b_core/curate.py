"""Bi-mode data curation: raw records in, the labelled bi-mode SFT dataset out.

    r4b curate --config configs/tiny.yaml                  data/train.jsonl -> curate/sft.jsonl
    from r4b_core.curate import run_curate                 run_curate(cfg, raw_uri, out_uri)

The recipe (RECIPE.md, "Bi-mode data curation"), one batch of `curate.batch_size` records at a time:

1. Read the raw JSONL. Lines that do not parse or validate, and records whose images cannot be
   loaded, are quarantined to `rejects.jsonl` with `file:line` and the reason; the run goes on.
2. Dedup (normalised question + image content hashes) and the keyword filter
   (`curate.banned_keywords`, matched case-insensitively in question, answer and kept trace).
3. Label with the annotator, through a RolloutEngine, in ONE `generate` call per batch:
   - objective items: `num_samples` answers in no-think mode; at most `max_correct_for_reasoning`
     correct -> "reasoning" (paper: all 8 wrong), else "direct";
   - subjective items (`objective: false`): a judge prompt asking whether the question needs
     non-trivial reasoning; "yes" -> reasoning, "no" -> direct, anything else -> direct (counted).
4. Reasoning traces: a trace the record already has is kept. A reasoning item without one gets a
   trace from the reasoning teacher (think mode, greedy), kept only if the teacher's own final
   answer is correct (consistency check); otherwise the item is rejected with the reason.
5. Write `sft.jsonl` (records with `label`, image references made absolute so the file can live
   anywhere), `rejects.jsonl` (`{"where", "reason", "line"}`), and commit `manifest.json` with the
   stats per category (reasoning ratio, pass-rate histogram over k/N, rejected counts by reason),
   items/s and tokens/s; the same numbers go to MLflow. A manifest with the same config hash
   means the work is done: the stage returns it without recomputing.

With `curate.annotator: base` in a tiny run the annotator is the run's base model after
`curate.annotator_train_steps` steps of direct-answer SFT (`train_annotator`, which calls the
annealing stage on direct-only targets): it learns to read numbers but not to do multi-step
arithmetic in one go, so it labels most math items reasoning. `curate.annotator: simulated`
(configs/tiny.yaml, configs/repro.yaml) stands in for the paper's much stronger annotator instead
(`SimulatedAnnotator`): the labelling rule is the same, only the annotator's answers are simulated.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r4b_core import modes
from r4b_core.config import RunConfig
from r4b_core.data.schema import Label, Record, parse_jsonl
from r4b_core.errors import R4BError, clip
from r4b_core.identity import identity_hash, model_lineage, stage_identity
from r4b_core.modes import Mode
from r4b_core.rollout.base import Completion, GenerationRequest, PromptTooLong, RolloutEngine


# The judge question sent to the annotator for subjective items (no-think mode, greedy).
JUDGE_INSTRUCTION = (
    "Does answering the question below need non-trivial step-by-step reasoning, "
    "or can it be answered directly? Reply with one word: yes (needs reasoning) or no.\n"
    "Question: "
)

_YES_NO = re.compile(r"\b(yes|no|true|false|y|n)\b")


class CurateError(R4BError):
    """A curation input or setting that cannot be used (message names the URI/field and the fix)."""


# ---------------------------------------------------------------------------------------------
# Pure decisions (unit-tested on hand-made completions)
# ---------------------------------------------------------------------------------------------
def label_for_passes(num_correct: int, max_correct_for_reasoning: int = 0) -> Label:
    """Objective items: the annotator got it right at most `max_correct` times -> reasoning."""
    return "reasoning" if num_correct <= max_correct_for_reasoning else "direct"


def judge_prompt(chat, question: str, num_images: int) -> str:
    """The subjective-item judge prompt in the annotator's chat format (`chat`), no-think mode (the
    answer is one word)."""
    return chat.prompt(JUDGE_INSTRUCTION + question.strip(), num_images, mode=Mode.NO_THINK)


def parse_judge(text: str) -> bool | None:
    """Judge reply -> True (needs reasoning), False (direct), None (unparseable).

    The first yes/no-like word after any think block decides ("Yes.", "no, it is a lookup",
    "**Yes**"); a reply with neither word, or a truncated think block, is unparseable.
    """
    parsed = modes.parse_response(text)
    if not parsed.closed:
        return None
    answer = unicodedata.normalize("NFKC", parsed.answer).lower()
    m = _YES_NO.search(answer)
    if m is None:
        return None
    return m.group(1) in ("yes", "true", "y")


def normalize_question(question: str) -> str:
    """Case, unicode form, whitespace and punctuation folded: what dedup compares."""
    q = unicodedata.normalize("NFKC", question).casefold()
    q = re.sub(r"[^\w\s]", " ", q)
    return " ".join(q.split())


def image_digest(image: Any) -> str:
    """Content hash of a PIL image (pixels + size + mode), independent of the file encoding."""
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def dedup_key(question: str, image_digests: list[str]) -> str:
    return hashlib.sha256(json.dumps([normalize_question(question), image_digests]).encode()).hexdigest()


def find_banned(texts: list[str | None], keywords: list[str]) -> str | None:
    """The first banned keyword found (case-insensitive) in any of the texts, or None."""
    for kw in keywords:
        needle = kw.casefold()
        if needle and any(t and needle in t.casefold() for t in texts):
            return kw
    return None


def answer_after(text: str, mode: Mode) -> modes.ParsedResponse:
    """Parse a completion generated after the forced prefix of `mode`."""
    return modes.parse_response(text, prefix_mode=mode)


def consistency_check(teacher_text: str, record: Record, scorer) -> tuple[str | None, str | None]:
    """A teacher completion (think mode) -> (trace, None) when usable, else (None, reason).

    Usable = the think block closed, the trace is non-empty, and the teacher's final answer is
    correct for the record (a trace that reaches a wrong answer teaches wrong steps).
    """
    parsed = answer_after(teacher_text, Mode.THINK)
    if not parsed.closed:
        return None, "teacher_truncated: the think block never closed (raise curate.teacher_max_new_tokens)"
    if not parsed.reasoning:
        return None, "teacher_empty_trace: the teacher did not reason"
    if scorer.score([teacher_text], [record], prefix_modes=[Mode.THINK]) != [1.0]:
        return None, f"teacher_inconsistent: teacher answered {parsed.answer[:60]!r}, reference {record.answer!r}"
    return parsed.reasoning, None


@dataclass
class Item:
    """A raw record on its way through curation, with where it came from."""

    record: Record
    where: str                      # "file:line"
    raw: str                        # the original line, for rejects.jsonl
    image_refs: list[str] = field(default_factory=list)   # absolute paths / URIs
    num_correct: int | None = None  # objective items: correct samples out of N
    judge: bool | None = None       # subjective items: the judge's verdict (None = unparsed)
    label: Label | None = None
    reject: str | None = None


@dataclass
class CurateStats:
    num_samples: int
    items: Counter = field(default_factory=Counter)            # category -> kept items
    reasoning: Counter = field(default_factory=Counter)        # category -> reasoning items
    pass_hist: dict = field(default_factory=dict)              # category -> [count of k correct]
    judge: dict = field(default_factory=lambda: defaultdict(Counter))   # category -> yes/no/unparsed
    rejected: Counter = field(default_factory=Counter)         # reason code -> count
    teacher: Counter = field(default_factory=Counter)          # generated / kept / rejected
    traces_from_record: int = 0
    generated_tokens: int = 0
    generate_seconds: float = 0.0
    annotated_items: int = 0

    def add_kept(self, item: Item) -> None:
        cat = item.record.category
        self.items[cat] += 1
        self.reasoning[cat] += item.label == "reasoning"

    def add_passes(self, category: str, k: int) -> None:
        hist = self.pass_hist.setdefault(category, [0] * (self.num_samples + 1))
        hist[k] += 1

    def add_reject(self, reason: str) -> None:
        self.rejected[reason.split(":", 1)[0]] += 1

    def to_dict(self) -> dict:
        cats = sorted(set(self.items) | set(self.pass_hist) | set(self.judge))
        by_cat = {}
        for c in cats:
            n = self.items[c]
            by_cat[c] = {
                "items": n,
                "reasoning": self.reasoning[c],
                "direct": n - self.reasoning[c],
                "reasoning_ratio": (self.reasoning[c] / n) if n else None,
                "pass_hist": self.pass_hist.get(c, [0] * (self.num_samples + 1)),
                "judge": dict(self.judge.get(c, {})),
            }
        total = sum(self.items.values())
        hist_all = [sum(h[k] for h in self.pass_hist.values()) for k in range(self.num_samples + 1)]
        return {
            "kept": total,
            "reasoning": sum(self.reasoning.values()),
            "direct": total - sum(self.reasoning.values()),
            "reasoning_ratio": (sum(self.reasoning.values()) / total) if total else None,
            "pass_hist": hist_all,
            "pass_hist_bins": [f"{k}/{self.num_samples}" for k in range(self.num_samples + 1)],
            "by_category": by_cat,
            "rejected": dict(sorted(self.rejected.items())),
            "rejected_total": sum(self.rejected.values()),
            "teacher": dict(self.teacher),
            "traces_from_record": self.traces_from_record,
        }


def build_requests(items: list[Item], images: list[list[Any]], cfg_curate, seed: int, chat) -> list[GenerationRequest]:
    """One request per item: N sampled no-think answers (objective) or one greedy judge reply, in
    the annotator's chat format (`chat`: the engine's)."""
    reqs = []
    for i, (item, imgs) in enumerate(zip(items, images)):
        r = item.record
        if r.objective:
            reqs.append(GenerationRequest(
                prompt=chat.prompt(r.question, len(imgs), mode=Mode.NO_THINK), images=imgs,
                mode=Mode.NO_THINK, max_new_tokens=cfg_curate.max_new_tokens,
                temperature=cfg_curate.temperature, n=cfg_curate.num_samples, seed=seed + i, key=r.id))
        else:
            reqs.append(GenerationRequest(
                prompt=judge_prompt(chat, r.question, len(imgs)), images=imgs, mode=Mode.NO_THINK,
                max_new_tokens=cfg_curate.max_new_tokens, temperature=0.0, n=1, key=r.id))
    return reqs


def split_completions(requests: list[GenerationRequest], completions: list[Completion]) -> list[list[Completion]]:
    """Regroup a flat completion list (request i's n samples consecutive) per request."""
    expected = sum(r.n for r in requests)
    if len(completions) != expected:
        raise CurateError(f"rollout engine returned {len(completions)} completions for {expected} "
                          f"requested samples; the engine breaks the RolloutEngine contract")
    out, pos = [], 0
    for r in requests:
        group = completions[pos:pos + r.n]
        if any(c.key != r.key for c in group):
            raise CurateError(f"rollout engine returned completions out of order (expected key {r.key!r}, "
                              f"got {[c.key for c in group]})")
        out.append(group)
        pos += r.n
    return out


def apply_labels(items: list[Item], groups: list[list[Completion]], cfg_curate, scorer,
                 stats: CurateStats) -> None:
    """Label each item from its completions (objective: pass count; subjective: judge)."""
    texts, recs, owner = [], [], []
    for j, (item, group) in enumerate(zip(items, groups)):
        if item.record.objective:
            texts += [c.text for c in group]
            recs += [item.record] * len(group)
            owner += [j] * len(group)
    passes = Counter()
    for j, reward in zip(owner, scorer.score(texts, recs, prefix_modes=[Mode.NO_THINK] * len(texts))):
        passes[j] += reward == 1.0
    for j, (item, group) in enumerate(zip(items, groups)):
        r = item.record
        if r.objective:
            k = passes[j]
            item.num_correct = k
            item.label = label_for_passes(k, cfg_curate.max_correct_for_reasoning)
            stats.add_passes(r.category, k)
        else:
            verdict = parse_judge(modes.generation_prefix(Mode.NO_THINK) + group[0].text)
            item.judge = verdict
            stats.judge[r.category]["yes" if verdict else "no" if verdict is False else "unparsed"] += 1
            # An unparseable judge reply defaults to direct: a wrong "direct" costs less than
            # training a thinking target on a question nobody showed needs it.
            item.label = "reasoning" if verdict else "direct"


# ---------------------------------------------------------------------------------------------
# Reading raw input
# ---------------------------------------------------------------------------------------------
def resolve_ref(jsonl_uri: str, image: str) -> str:
    """An image reference made absolute: relative paths are relative to the JSONL's folder."""
    if "://" in image or Path(image).is_absolute():
        return image
    if "://" in jsonl_uri:
        return jsonl_uri.rsplit("/", 1)[0] + "/" + image
    return str((Path(jsonl_uri).parent / image).resolve())


def read_raw(text: str | bytes, uri: str, max_question_chars: int = 0) -> tuple[list[Item], list[dict]]:
    """Parse raw JSONL into items (with file:line) and reject rows for bad lines."""
    result = parse_jsonl(text, uri, on_error="collect", max_question_chars=max_question_chars)
    rejects = [{"where": f"{b.path}:{b.line}", "reason": f"bad_line: {b.field}: {b.message}", "line": b.raw}
               for b in result.bad]
    items = [Item(record=rec, where=f"{uri}:{ln}", raw=raw, image_refs=[resolve_ref(uri, im) for im in rec.images])
             for rec, (ln, raw) in zip(result.records, result.rows)]
    return items, rejects


def _load_images(item: Item, store) -> list[Any]:
    from r4b_core.data.images import load_image

    return [load_image(ref, store=store) for ref in item.image_refs]


class SimulatedAnnotator:
    """`curate.annotator: simulated`: a RolloutEngine standing in for a strong annotator (the paper's
    Qwen2.5-VL-32B) on data whose answers are known, for toy runs.

    A tiny annotator (a ~1M model answering directly) fails nearly every multi-digit item, so it
    labels most items reasoning and the annealed model thinks on everything (docs/reproduction.md).
    The paper's annotator answers many hard items directly, so those land in both label classes.
    This engine reproduces exactly that statistic and nothing else: each no-think try on a record is
    right with probability `accuracy[category/difficulty]` (else a wrong answer of the same kind),
    seeded per (seed, record, request seed, try). The labelling rule (N tries, all wrong ->
    reasoning) runs unchanged in `run_curate`.
    """

    policy_version = 0

    def __init__(self, records, accuracy: dict[str, float], seed: int):
        from r4b_core.models.chat import ChatFormat

        self.chat = ChatFormat.of(None)        # prompts are never read: r4b's own format will do
        self.records = {r.id: r for r in records}
        self.accuracy = dict(accuracy)
        self.seed = seed
        # what the stage's skip check identifies this annotator by
        self.identity = {"kind": "simulated", "accuracy": dict(sorted(self.accuracy.items())), "seed": seed}

    def p_correct(self, record) -> float:
        for key in (f"{record.category}/{record.difficulty}", record.category):
            if key in self.accuracy:
                return self.accuracy[key]
        raise CurateError(f"curate.simulated_accuracy has no entry for {record.category}/{record.difficulty} "
                          f"(keys: {sorted(self.accuracy)}); add '{record.category}' or "
                          f"'{record.category}/{record.difficulty}'")

    def _wrong(self, record, rng) -> str:
        from r4b_core.data.synthetic import PALETTE

        answer = record.answer.strip()
        if answer.lstrip("-").isdigit():
            value = int(answer)
            offset = rng.randint(1, max(9, abs(value) // 2))
            return str(value + offset if value - offset < 0 or rng.random() < 0.5 else value - offset)
        return rng.choice(sorted(c for c in PALETTE if c != answer.lower()) or ["none"])

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        import random

        out = []
        for req in requests:
            rec = self.records.get(req.key)
            if rec is None:
                raise CurateError(f"simulated annotator: no record with id {req.key!r} among the items it was given")
            p = self.p_correct(rec)
            for i in range(req.n):
                rng = random.Random(f"{self.seed}:{rec.id}:{req.seed}:{i}")
                text = rec.answer if rng.random() < p else self._wrong(rec, rng)
                out.append(Completion(key=req.key, mode=req.mode, text=text, token_ids=[], logprobs=[],
                                      finish_reason="stop"))
        return out

    def update_weights(self, model_or_path, version: int) -> None:
        raise CurateError("the simulated annotator has no weights to update")

    def close(self) -> None:
        pass


def train_annotator(cfg: RunConfig, items: list[Item], base_model_uri: str, stage_uri: str, store) -> str:
    """The tiny annotator: the base model after `annotator_train_steps` steps of direct-answer SFT.

    Every valid raw record becomes a direct target (empty think block), so the annotator learns to
    answer at once and never to reason. Runs through the annealing stage, which skips itself when
    its manifest matches. Returns the annotator's model URI.
    """
    from r4b_core.anneal import run_anneal

    steps = cfg.curate.annotator_train_steps
    out_model = store.join(stage_uri, "annotator", "model")
    train_uri = store.join(stage_uri, "annotator", "train.jsonl")
    rows = [it.record.model_copy(update={"images": it.image_refs, "label": "direct", "reasoning": None})
            for it in items]
    store.write_text(train_uri, "".join(json.dumps(r.model_dump(exclude_none=True), ensure_ascii=False) + "\n"
                                        for r in rows))
    anneal = cfg.anneal.model_copy(update={
        "steps": steps, "compliance_samples": 0,
        "checkpoint_every": max(steps, 1), "keep_checkpoints": 1})
    acfg = cfg.model_copy(update={"anneal": anneal})
    # Not logged as a stage of its own: "anneal" in MLflow is the real annealing run.
    run_anneal(acfg, train_uri, base_model_uri, out_model, tracker=None)
    return out_model


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def stage_prefix(out_uri: str) -> tuple[str, str]:
    """`out_uri` is the SFT JSONL (…/sft.jsonl) or its folder -> (folder, jsonl URI)."""
    if out_uri.endswith(".jsonl"):
        return out_uri.rsplit("/", 1)[0] if "/" in out_uri else ".", out_uri
    return out_uri.rstrip("/"), out_uri.rstrip("/") + "/sft.jsonl"


def curate_identity(cfg: RunConfig, store, raw_text: str, annotator_given: bool, teacher_given: bool,
                    base_model_uri: str | None = None) -> dict:
    """Everything the curated output depends on: config, raw content, annotator and teacher weights
    (`curate.annotator: base` is the base model at `base_model_uri`, default layout.base_model_dir)."""
    c = cfg.curate
    inputs: dict[str, Any] = {"raw": hashlib.sha256(raw_text.encode()).hexdigest()}
    if annotator_given:
        inputs["annotator"] = None          # an engine we cannot identify: always recompute
    elif c.annotator == "simulated":
        inputs["annotator"] = {"kind": "simulated", "seed": cfg.seed}    # its accuracies are in curate.*
    elif c.annotator == "base":
        from r4b_core import layout

        inputs["annotator"] = model_lineage(store, base_model_uri or layout.base_model_dir(cfg))
        if c.annotator_train_steps > 0 and cfg.model.base == "tiny":
            inputs["annotator_training"] = cfg.anneal.model_dump(mode="json")
    else:
        inputs["annotator"] = model_lineage(store, c.annotator)
    if teacher_given:
        inputs["teacher"] = None
    elif c.teacher:
        inputs["teacher"] = model_lineage(store, c.teacher)
    return stage_identity(cfg, "curate", inputs)


def run_curate(cfg: RunConfig, raw_uri: str, out_uri: str, annotator: RolloutEngine | None = None,
               tracker=None, teacher: RolloutEngine | None = None, base_model_uri: str | None = None) -> dict:
    """Curate `raw_uri` (JSONL + images) into the bi-mode SFT set at `out_uri`; return the manifest.

    `annotator` / `teacher`: RolloutEngines to use; when None they are built from the config
    (`curate.annotator`, `curate.teacher`, `curate.engine`) and closed at the end.
    `base_model_uri`: the run's base model (`curate.annotator: base`); default layout.base_model_dir.
    """
    from r4b_core import layout, storage

    c = cfg.curate
    store = storage.Store.from_config(cfg.storage)
    prefix, sft_uri = stage_prefix(out_uri)
    annotator_name = "given" if annotator is not None else c.annotator
    t0 = time.perf_counter()
    if not store.exists(raw_uri):
        raise CurateError(f"{raw_uri}: raw data not found; generate it (r4b data generate) or pass --input URI")
    raw_text = store.read_text(raw_uri)
    ident = curate_identity(cfg, store, raw_text, annotator is not None, teacher is not None, base_model_uri)
    if annotator is not None and getattr(annotator, "identity", None):
        # an engine that states what it is (a SimulatedAnnotator passed in) can be skipped on that
        ident["inputs"]["annotator"] = annotator.identity
    chash = identity_hash(ident)
    if chash is not None and store.is_complete(prefix, chash):
        manifest = store.read_manifest(prefix)
        print(f"curate: {prefix} is complete for config {chash}; skipping")
        return manifest
    if chash is None:
        # Unknown lineage (engines passed in, a model folder without manifest): never skipped later.
        chash = "unverified-" + hashlib.sha256(f"{time.time_ns()}".encode()).hexdigest()[:8]

    items, rejects = read_raw(raw_text, raw_uri, cfg.data.max_question_chars)
    stats = CurateStats(num_samples=c.num_samples)
    for rj in rejects:
        stats.add_reject(rj["reason"])
    n_read = len(items) + len(rejects)

    # Images, dedup, keyword filter on the question and answer (before spending compute on them).
    seen: dict[str, str] = {}
    kept: list[Item] = []
    for item in items:
        try:
            digests = [image_digest(im) for im in _load_images(item, store)]
        except R4BError as exc:
            item.reject = f"image_missing: {exc}"
        except OSError as exc:
            item.reject = f"image_missing: {item.image_refs}: {exc}"
        else:
            key = dedup_key(item.record.question, digests)
            kw = find_banned([item.record.question, item.record.answer], c.banned_keywords)
            if c.dedup and key in seen:
                item.reject = f"duplicate: same question and images as {seen[key]}"
            elif kw is not None:
                item.reject = f"banned_keyword: {kw!r} in question/answer"
            else:
                seen.setdefault(key, item.where)
        if item.reject:
            rejects.append({"where": item.where, "reason": item.reject, "line": item.raw})
            stats.add_reject(item.reject)
        else:
            kept.append(item)

    from r4b_core.rewards import RewardScorer
    from r4b_core.rollout import open_engine

    with contextlib.ExitStack() as stack:
        scorer = stack.enter_context(RewardScorer())
        if annotator is None and c.annotator == "simulated":
            annotator = SimulatedAnnotator([it.record for it in kept], c.simulated_accuracy, cfg.seed)
        elif annotator is None:
            model_uri = c.annotator
            if c.annotator == "base":
                model_uri = base_model_uri or layout.base_model_dir(cfg)
                if c.annotator_train_steps > 0 and cfg.model.base == "tiny":
                    model_uri = train_annotator(cfg, kept, model_uri, prefix, store)
            annotator = stack.enter_context(open_engine(cfg, c.engine, model_uri, label="curate"))
        if teacher is None and c.teacher:
            teacher = stack.enter_context(open_engine(cfg, c.engine, c.teacher, label="curate"))

        t_label = time.perf_counter()
        for start in range(0, len(kept), c.batch_size):
            batch = kept[start:start + c.batch_size]
            images = [_load_images(it, store) for it in batch]
            reqs = build_requests(batch, images, c, cfg.seed * 1_000_003 + start, annotator.chat)
            tg = time.perf_counter()
            reqs, completions = _generate_fitting(annotator, reqs, batch)
            images = [imgs for it, imgs in zip(batch, images) if it.reject is None]
            batch = [it for it in batch if it.reject is None]
            stats.generate_seconds += time.perf_counter() - tg
            stats.generated_tokens += sum(len(x.token_ids) for x in completions)
            apply_labels(batch, split_completions(reqs, completions), c, scorer, stats)
            stats.annotated_items += len(batch)
            _attach_traces(batch, images, teacher, c, scorer, stats)
            done = start + len(batch)
            print(f"curate: {done}/{len(kept)} items labelled "
                  f"({done / max(time.perf_counter() - t_label, 1e-9):.1f} items/s)", flush=True)
        label_seconds = time.perf_counter() - t_label
        scoring = scorer.counters

    out_rows = []
    for item in kept:
        if item.reject is None and item.label == "reasoning":
            kw = find_banned([item.record.reasoning], c.banned_keywords)
            if kw is not None:
                item.reject = f"banned_keyword: {kw!r} in reasoning trace"
        if item.reject:
            rejects.append({"where": item.where, "reason": item.reject, "line": item.raw})
            stats.add_reject(item.reject)
            continue
        stats.add_kept(item)
        rec = item.record.model_copy(update={"images": item.image_refs, "label": item.label})
        out_rows.append(rec.model_dump(exclude_none=True))

    rejects_text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
    if not out_rows:
        # Nothing to train on: fail, leaving a finished earlier output (and its manifest) as it was;
        # the rejects go next to it, in a file no manifest lists.
        failed_uri = store.join(prefix, "rejects.failed.jsonl")
        store.write_text(failed_uri, rejects_text)
        reasons = ", ".join(f"{n} {reason}" for reason, n in stats.rejected.most_common())
        first = rejects[0] if rejects else {"where": raw_uri, "reason": "no records"}
        raise CurateError(f"{raw_uri}: every one of the {n_read} records was rejected ({reasons or 'no records'}); "
                          f"first: {first['where']}: {clip(first['reason'], 160)}; all in {failed_uri}")
    # Only now, with the new outputs ready: an earlier attempt's manifest must not vouch for them.
    store.invalidate(prefix)
    rejects_uri = store.join(prefix, "rejects.jsonl")
    store.write_text(sft_uri, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out_rows))
    store.write_text(rejects_uri, rejects_text)

    wall = time.perf_counter() - t0
    summary = stats.to_dict()
    throughput = {
        "items_per_s": stats.annotated_items / label_seconds if label_seconds > 0 else None,
        "tokens_per_s": stats.generated_tokens / stats.generate_seconds if stats.generate_seconds > 0 else None,
        "generated_tokens": stats.generated_tokens,
        "generate_seconds": round(stats.generate_seconds, 3),
        "label_seconds": round(label_seconds, 3),
        "wall_seconds": round(wall, 3),
    }
    manifest = {
        "stage": "curate",
        "config_hash": chash,
        "identity": ident,
        "inputs": {"raw": raw_uri, "annotator": annotator_name,
                   "teacher": c.teacher or ("given" if teacher is not None else None)},
        "outputs": {"sft": sft_uri, "rejects": rejects_uri},
        "counts": {"read": n_read, "kept": len(out_rows), "rejected": len(rejects)},
        "stats": summary,
        # Flat headline numbers (what the KFP component and dashboards show).
        "metrics": {"kept": len(out_rows), "rejected": len(rejects), "reasoning_ratio": summary["reasoning_ratio"],
                    "items_per_s": throughput["items_per_s"], "tokens_per_s": throughput["tokens_per_s"]},
        "throughput": throughput,
        "scoring": scoring,
        "config": cfg.curate.model_dump(mode="json"),
    }
    _log(tracker, manifest, rejects)
    store.commit(prefix, manifest)
    print(f"curate: {n_read} read, {len(out_rows)} kept ({summary['reasoning']} reasoning, "
          f"ratio {_fmt(summary['reasoning_ratio'])}), {len(rejects)} rejected "
          f"{summary['rejected']}; {_fmt(throughput['items_per_s'])} items/s, "
          f"{_fmt(throughput['tokens_per_s'])} tokens/s")
    return manifest


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _attach_traces(batch: list[Item], images: list[list[Any]], teacher: RolloutEngine | None, c,
                   scorer, stats: CurateStats) -> None:
    """Reasoning items keep their own trace; the rest ask the teacher (one batched call)."""
    need = []
    for item, imgs in zip(batch, images):
        if item.label != "reasoning":
            continue
        if item.record.reasoning and item.record.reasoning.strip():
            stats.traces_from_record += 1
        elif teacher is None:
            item.reject = ("no_trace: labelled reasoning but the record has no trace and no "
                           "curate.teacher is configured to write one")
        else:
            need.append((item, imgs))
    if not need:
        return
    reqs = [GenerationRequest(prompt=teacher.chat.prompt(it.record.question, len(imgs), mode=Mode.THINK),
                              images=imgs, mode=Mode.THINK, max_new_tokens=c.teacher_max_new_tokens,
                              temperature=0.0, n=1, key=it.record.id) for it, imgs in need]
    tg = time.perf_counter()
    reqs, completions = _generate_fitting(teacher, reqs, [it for it, _ in need])
    need = [(it, imgs) for it, imgs in need if it.reject is None]
    stats.generate_seconds += time.perf_counter() - tg
    stats.generated_tokens += sum(len(x.token_ids) for x in completions)
    for (item, _), group in zip(need, split_completions(reqs, completions)):
        stats.teacher["generated"] += 1
        trace, reason = consistency_check(group[0].text, item.record, scorer)
        if trace is None:
            item.reject = reason
            stats.teacher["rejected"] += 1
        else:
            item.record = item.record.model_copy(update={"reasoning": trace})
            stats.teacher["kept"] += 1


def _generate_fitting(engine: RolloutEngine, reqs: list[GenerationRequest],
                      items: list[Item]) -> tuple[list[GenerationRequest], list[Completion]]:
    """engine.generate(reqs), leaving out the requests the engine refuses as too long for the
    model (their items are rejected as prompt_too_long); returns the requests that ran and their
    completions."""
    while reqs:
        try:
            return reqs, engine.generate(reqs)
        except PromptTooLong as exc:
            gone = set(exc.keys)
            for item in items:
                if item.record.id in gone and item.reject is None:
                    item.reject = f"prompt_too_long: {exc}"
            reqs = [r for r in reqs if r.key not in gone]
    return [], []


def _log(tracker, manifest: dict, rejects: list[dict]) -> None:
    if tracker is None:
        return
    s, t = manifest["stats"], manifest["throughput"]
    metrics = {"curate/kept": manifest["counts"]["kept"], "curate/rejected": manifest["counts"]["rejected"],
               "curate/reasoning_ratio": s["reasoning_ratio"] or 0.0}
    for k in ("items_per_s", "tokens_per_s"):
        if t[k] is not None:
            metrics[f"curate/{k}"] = t[k]
    for cat, d in s["by_category"].items():
        metrics[f"curate/{cat}/reasoning_ratio"] = d["reasoning_ratio"] or 0.0
        metrics[f"curate/{cat}/items"] = d["items"]
    for reason, n in s["rejected"].items():
        metrics[f"curate/rejected/{reason}"] = n
    for k, n in enumerate(s["pass_hist"]):
        metrics[f"curate/pass_hist/{k}"] = n
    with tracker.stage("curate"):
        tracker.log_params({"curate": manifest["config"], "curate_inputs": manifest["inputs"]})
        tracker.log_metrics(metrics)
        tracker.log_dict(manifest, "curate/manifest.json")
        if rejects:
            # The first rejects with their reasons, so a bad input is visible from the MLflow UI.
            tracker.log_dict({"total": len(rejects), "first": rejects[:200]}, "curate/rejects_sample.json")
