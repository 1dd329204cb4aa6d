"""Three-mode evaluation: one model, every benchmark item answered in auto, think and no-think mode.

    r4b eval --config configs/tiny.yaml --tag bpo [--compare runs/tiny/eval/anneal/report.json]
    from r4b_core.evaluate import run_eval          run_eval(cfg, model_uri, eval_uri, out_uri, tag)

For each item and each mode in `eval.modes` the prompt is the served model's chat format for the
question and its images, followed by the mode's forced prefix (`engine.chat.prompt`, models/chat.py:
auto ends in `<think>`, think in `<think>\\n`, no-think in `<think>\\n\\n</think>\\n\\n`),
decoded greedily up to `eval.max_new_tokens` through a RolloutEngine (`eval.engine`), all modes of
a batch in one `generate` call. The completion is split with `modes.parse_response`; the answer
after the think block is scored by `rewards.RewardScorer.score`, the function that gives BPO its
reward and curation its labels; a think block that never closed has no answer and scores 0.

Benchmarks: the run's eval split (our record schema) and, when `eval.external_uri` is set, an
external JSONL + images (MathVista-style) whose fields `eval.field_map` maps onto ours — see
`map_external`. Metrics (`compute_metrics`) per mode, per category and per difficulty: accuracy,
mean output tokens, think-rate, hybrid accuracy, oracle accuracy, mode selection (MCC, precision,
recall of "thought" against "thinking was needed"), tokens at matched accuracy; with `eval.pass_k`,
pass@k and maj@k per mode from sampled answers (`samples.jsonl`).

Thinking budgets (`eval.thinking_budgets`, `r4b eval --thinking-budget 0,16,64`): auto and think mode
are answered again under each budget as `r4b serve` runs it (the engines close the think block with
the serving rule, r4b_core/assets/r4b_thinking.py; budget 0 is the no-think prompt, as the server
renders it), and `budget_sweep` reports accuracy, tokens, reasoning tokens, think-rate and the
share cut per budget and mode (`budget_sweep.jsonl` holds the answers; a table and a plot in report.md).

Outputs under `out_uri` (`<run>/eval/<tag>/` by default): `report.json`, `predictions.jsonl`,
`report.md` with PNG plots (r4b_core/report.py), `manifest.json` last; all logged to MLflow.
`compare` (another report.json or its URI) puts two models side by side in one report.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

from r4b_core import modes
from r4b_core.assets.r4b_thinking import budget_replay
from r4b_core.config import RunConfig
from r4b_core.data.schema import Record, json_object, jsonl_lines, parse_jsonl
from r4b_core.errors import R4BError, shorten
from r4b_core.modes import Mode
from r4b_core.rollout.base import GenerationRequest, RolloutEngine

MODE_ORDER = ("auto", "think", "no_think")

# External answer_type values (MathVista and friends) -> ours.
ANSWER_TYPES = {
    "integer": "integer", "int": "integer",
    "float": "number", "number": "number", "numeric": "number",
    "choice": "choice", "multi_choice": "choice", "multiple_choice": "choice", "mcq": "choice",
    "text": "text", "free_form": "text", "string": "text", "list": "text",
}
# Our fields an external field_map may fill.
MAPPABLE = ("id", "question", "answer", "images", "answer_type", "category", "difficulty", "choices",
            "objective", "source")


class EvalError(R4BError):
    """An evaluation input or setting that cannot be used."""


# ---------------------------------------------------------------------------------------------
# Benchmarks
# ---------------------------------------------------------------------------------------------
def _get(obj: dict, path: str) -> Any:
    """A value by dotted path ("metadata.category"); KeyError when absent."""
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(path)
        cur = cur[part]
    return cur


def map_external(obj: dict, field_map: dict[str, str], where: str, name: str, lineno: int,
                 found: set[str] | None = None) -> Record:
    """One external JSONL object -> Record, with `field_map` = {our field: their field (dotted ok)}.

    Unmapped fields use their own name when present (so a file already in our schema needs no map).
    Conversions: a single image string becomes a list; numbers become strings; `answer_type`
    values are translated (MathVista `float` -> number, `multi_choice` -> choice, `list` -> text);
    no answer_type but choices -> choice; no id -> "<name>-<line>"; no category -> the benchmark
    name; no difficulty -> 0 (unknown). `question` and `answer` must be on every line; other
    mapped fields may be absent on some lines (`found` collects the ones seen, so the loader can
    reject a map entry that matches no line at all — a typo).
    """
    unknown = sorted(set(field_map) - set(MAPPABLE))
    if unknown:
        raise EvalError(f"eval.field_map: unknown target field(s) {unknown}; allowed: {', '.join(MAPPABLE)}")
    out: dict[str, Any] = {}
    for ours in MAPPABLE:
        theirs = field_map.get(ours, ours)
        try:
            out[ours] = _get(obj, theirs)
        except KeyError:
            if ours in ("question", "answer"):
                hint = f"set eval.field_map.{ours} to the field holding it" if ours not in field_map \
                    else f"eval.field_map.{ours} = {theirs!r} is not in this line; fix the map"
                raise EvalError(f"{where}:{lineno}: {theirs}: missing field for our {ours!r}; {hint} "
                                f"(fields here: {', '.join(sorted(obj))})") from None
        else:
            if found is not None:
                found.add(ours)
    if out.get("images") is None:
        out["images"] = []
    elif isinstance(out["images"], str):
        out["images"] = [out["images"]]
    for key in ("id", "answer"):
        if out.get(key) is not None and not isinstance(out[key], str):
            out[key] = json.dumps(out[key]) if isinstance(out[key], (list, dict)) else str(out[key])
    out.setdefault("id", None)
    if out["id"] is None:
        out["id"] = f"{name}-{lineno}"
    if out.get("answer_type") is not None:
        at = str(out["answer_type"]).strip().lower()
        if at not in ANSWER_TYPES:
            raise EvalError(f"{where}:{lineno}: {field_map.get('answer_type', 'answer_type')}: unknown answer "
                            f"type {out['answer_type']!r}; known: {', '.join(sorted(ANSWER_TYPES))} "
                            f"(or drop answer_type from eval.field_map)")
        out["answer_type"] = ANSWER_TYPES[at]
    if out.get("choices") and out.get("answer_type") in (None, "text"):
        out["answer_type"] = "choice"
    if out.get("answer_type") is None:
        out.pop("answer_type", None)
    if out.get("category") is None:
        out["category"] = name
    if out.get("difficulty") is None:
        out["difficulty"] = 0
    out.setdefault("source", name)
    if out.get("source") is None:
        out["source"] = name
    for k in ("choices", "objective"):
        if out.get(k) is None:
            out.pop(k, None)
    try:
        return Record.model_validate(out)
    except Exception as exc:  # pydantic ValidationError: name the first field
        errs = getattr(exc, "errors", lambda: [])()
        if errs:
            e = errs[0]
            fld = ".".join(str(p) for p in e["loc"])
            raise EvalError(f"{where}:{lineno}: {field_map.get(fld, fld)}: {e['msg']} (got {shorten(e.get('input'))}); "
                            f"fix the line or eval.field_map.{fld}") from None
        raise


def load_benchmark(text: str | bytes, uri: str, field_map: dict[str, str] | None = None, name: str | None = None,
                   limit: int = 0, max_question_chars: int = 0) -> list[Record]:
    """Benchmark items from JSONL text; image references made absolute against `uri`.

    field_map None: our own schema, validated strictly (any bad line is an error with file:line).
    A question longer than `max_question_chars` (data.max_question_chars; 0 = no limit) is an error.
    """
    from r4b_core.curate import resolve_ref

    name = name or Path(uri.rsplit("/", 1)[-1]).stem
    if field_map is None:
        records = parse_jsonl(text, uri, on_error="raise", max_question_chars=max_question_chars).records
    else:
        records, seen, found = [], set(), set()
        for lineno, raw in jsonl_lines(text, uri):
            obj = json_object(raw)
            if isinstance(obj, str):
                raise EvalError(f"{uri}:{lineno}: {obj}; fix or drop the line")
            rec = map_external(obj, field_map, uri, name, lineno, found)
            if max_question_chars and len(rec.question) > max_question_chars:
                raise EvalError(f"{uri}:{lineno}: {field_map.get('question', 'question')}: {len(rec.question)} "
                                f"characters, more than data.max_question_chars={max_question_chars}; shorten it "
                                "or raise the limit")
            if rec.id in seen:
                raise EvalError(f"{uri}:{lineno}: id: duplicate id {rec.id!r}; map eval.field_map.id to a unique field")
            seen.add(rec.id)
            records.append(rec)
        never = sorted(set(field_map) - found)
        if records and never:
            raise EvalError(f"{uri}: eval.field_map entries match no line: "
                            + ", ".join(f"{k} -> {field_map[k]!r}" for k in never) + "; fix or drop them")
    if limit:
        records = records[:limit]
    return [r.model_copy(update={"images": [resolve_ref(uri, im) for im in r.images]}) for r in records]


# ---------------------------------------------------------------------------------------------
# Predictions and metrics (pure)
# ---------------------------------------------------------------------------------------------
def prediction_row(text: str, mode: str, record: Record, token_count: int, finish_reason: str,
                   correct: bool, benchmark: str) -> dict:
    """One prediction row: what the model said in `mode` and whether it was right."""
    parsed = modes.parse_response(text, prefix_mode=Mode.parse(mode))
    return {
        "benchmark": benchmark, "id": record.id, "category": record.category,
        "difficulty": record.difficulty, "mode": mode, "prediction": parsed.answer,
        "reference": record.answer, "correct": bool(correct), "tokens": token_count,
        "thought": parsed.mode == Mode.THINK, "closed": parsed.closed,
        "finish_reason": finish_reason, "text": text,
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def compute_metrics(predictions: Iterable[dict], mode_names: Iterable[str] = MODE_ORDER) -> dict:
    """Metrics of one set of predictions (rows of `score_completion`).

    Per mode: `accuracy` (share correct), `mean_tokens` (generated tokens, the forced prefix not
    counted), `think_rate` (share of outputs whose think block is non-empty: in auto mode the
    model's own choice to reason; in think mode the share that really reasoned; 0 in no-think).

    Over items answered in all three modes:
      `hybrid_accuracy` = |{i : auto correct on i} ∩ S| / |S| with S = {i : think correct on i or
        no-think correct on i}. It asks: where some mode could solve the item, did auto mode's own
        choice solve it? 1.0 = auto always picked a mode that works; None when S is empty.
      `oracle_accuracy` = |S| / items (the best a perfect per-item mode choice could score).
      `mode_selection` = auto's choice to think as a classifier of "thinking was needed" (forced
        think right, forced no-think wrong): MCC, precision, recall and the confusion counts.
    `tokens_at_matched_accuracy` = auto's mean tokens against the cheapest forced mode whose accuracy
      reaches auto's (`matched_accuracy_tokens`).
    `tokens_where_all_correct` = mean tokens per mode over the items EVERY evaluated mode got right,
      with their count: each mode's price on the same, solved items.
    """
    mode_names = [m for m in MODE_ORDER if m in set(mode_names)]
    by_item: dict[tuple, dict[str, dict]] = defaultdict(dict)
    per_mode: dict[str, list[dict]] = defaultdict(list)
    for p in predictions:
        per_mode[p["mode"]].append(p)
        by_item[(p.get("benchmark"), p["id"])][p["mode"]] = p
    out: dict[str, Any] = {"n_items": len(by_item), "modes": {}}
    for m in mode_names:
        rows = per_mode.get(m, [])
        out["modes"][m] = {
            "n": len(rows),
            "accuracy": _mean([float(r["correct"]) for r in rows]),
            "mean_tokens": _mean([float(r["tokens"]) for r in rows]),
            "think_rate": _mean([float(r["thought"]) for r in rows]),
        }
    full = [v for v in by_item.values() if all(m in v for m in ("auto", "think", "no_think"))]
    solvable = [v for v in full if v["think"]["correct"] or v["no_think"]["correct"]]
    out["hybrid_items"] = len(solvable)
    out["hybrid_accuracy"] = _mean([float(v["auto"]["correct"]) for v in solvable])
    out["oracle_accuracy"] = (len(solvable) / len(full)) if full else None
    out["mode_selection"] = mode_selection(full)
    out["tokens_at_matched_accuracy"] = matched_accuracy_tokens(out["modes"])
    common = [v for v in by_item.values() if mode_names and all(m in v and v[m]["correct"] for m in mode_names)]
    out["tokens_where_all_correct"] = {"items": len(common),
                                       **{m: _mean([float(v[m]["tokens"]) for v in common]) for m in mode_names}}
    return out


def mode_selection(items: list[dict[str, dict]]) -> dict:
    """Auto mode's choice to think, scored as a classifier of "thinking was needed".

    Over items answered in all three modes: needed = forced think right and forced no-think wrong;
    predicted = auto mode thought. MCC = (tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)),
    precision = tp / (tp+fp) (of the items auto thought on, the share that needed it), recall =
    tp / (tp+fn) (of the items that needed thinking, the share auto thought on). Each is None
    where its denominator is 0 (MCC: no item needed thinking, or auto always / never thought).
    """
    tp = fp = fn = tn = 0
    for v in items:
        needed = bool(v["think"]["correct"]) and not v["no_think"]["correct"]
        thought = bool(v["auto"]["thought"])
        tp += needed and thought
        fp += thought and not needed
        fn += needed and not thought
        tn += not needed and not thought
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {"items": len(items), "needed": tp + fn, "thought": tp + fp, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "mcc": (tp * tn - fp * fn) / denom if denom else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None}


def matched_accuracy_tokens(per_mode: dict[str, dict]) -> dict:
    """Auto mode's tokens against the cheapest forced mode that is at least as accurate as auto.

    `mode` is None when no forced mode reaches auto's accuracy (auto beats both); then there is no
    matched price and `auto_over_mode` is None. Below 1: auto reaches that accuracy for fewer tokens.
    """
    auto = per_mode.get("auto") or {}
    if auto.get("accuracy") is None:
        return {}
    reach = [m for m in ("think", "no_think") if (per_mode.get(m) or {}).get("accuracy") is not None
             and per_mode[m]["accuracy"] >= auto["accuracy"] - 1e-9]
    best = min(reach, key=lambda m: per_mode[m]["mean_tokens"]) if reach else None
    mode_tokens = per_mode[best]["mean_tokens"] if best else None
    return {"auto_accuracy": auto["accuracy"], "auto_tokens": auto["mean_tokens"], "mode": best,
            "mode_accuracy": per_mode[best]["accuracy"] if best else None, "mode_tokens": mode_tokens,
            "auto_over_mode": auto["mean_tokens"] / mode_tokens if mode_tokens else None}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021):
    1 − C(n−c, k) / C(n, k), the chance that k samples drawn without replacement hold a correct one."""
    if k > n:
        raise EvalError(f"pass@{k} needs at least {k} samples per item, got {n}")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _vote_key(answer: str) -> str:
    return " ".join(answer.casefold().split())


def majority_correct(samples: list[dict], k: int) -> bool:
    """maj@k of one item: the most frequent answer among its first k samples (by sample index) is
    correct. Answers are compared after folding case and whitespace; a sample without an answer
    (think block never closed) does not vote; a tie goes to the answer that appeared first."""
    votes: dict[str, list] = {}
    for s in sorted(samples, key=lambda s: s["sample"])[:k]:
        key = _vote_key(s.get("prediction") or "")
        if key:
            votes.setdefault(key, [0, bool(s["correct"])])[0] += 1
    if not votes:
        return False
    return max(votes.values(), key=lambda v: v[0])[1]     # max keeps the first of equal counts


def sampling_metrics(samples: Iterable[dict], ks: Iterable[int], mode_names: Iterable[str] = MODE_ORDER) -> dict:
    """pass@k and maj@k per mode from sampled rows (prediction rows with a `sample` index):
    means over items; also the sampled think-rate and mean tokens."""
    per_item: dict[str, dict[tuple, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for s in samples:
        per_item[s["mode"]][(s.get("benchmark"), s["id"])].append(s)
    out: dict[str, dict] = {}
    for m in [m for m in MODE_ORDER if m in set(mode_names) and m in per_item]:
        groups = list(per_item[m].values())
        n = min(len(g) for g in groups)
        block: dict[str, Any] = {"items": len(groups), "samples_per_item": n}
        for k in sorted(set(ks)):
            block[f"pass@{k}"] = _mean([pass_at_k(len(g), sum(bool(s["correct"]) for s in g), k) for g in groups])
            block[f"maj@{k}"] = _mean([float(majority_correct(g, k)) for g in groups])
        rows = [s for g in groups for s in g]
        block["think_rate"] = _mean([float(s["thought"]) for s in rows])
        block["mean_tokens"] = _mean([float(s["tokens"]) for s in rows])
        out[m] = block
    return out


def sampling_report(samples: list[dict], e, seed: int) -> dict:
    """The `sampling` block of a report: pass@k / maj@k per mode, overall and per category."""
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for r in samples:
        by_cat[str(r["category"])].append(r)
    return {"k": sorted(set(e.pass_k)), "samples_per_item": max(e.pass_k), "temperature": e.sample_temperature,
            "seed": seed, "modes": sampling_metrics(samples, e.pass_k, e.modes),
            "by_category": {c: sampling_metrics(rows, e.pass_k, e.modes) for c, rows in sorted(by_cat.items())}}


BUDGETED_MODES = ("auto", "think")   # the modes a thinking budget applies to (no-think has no block)


def _budget_block(rows: list[dict]) -> dict:
    return {"n": len(rows),
            "accuracy": _mean([float(r["correct"]) for r in rows]),
            "mean_tokens": _mean([float(r["tokens"]) for r in rows]),
            "mean_reasoning_tokens": _mean([float(r["reasoning_tokens"]) for r in rows]),
            "think_rate": _mean([float(r["thought"]) for r in rows]),
            "closed_by_budget": _mean([float(r.get("budget_closed", False)) for r in rows])}


def budget_sweep(unbudgeted: Iterable[dict], budgeted: Iterable[dict], budgets: Iterable[int]) -> dict:
    """The report's `budget_sweep`: per budget and mode (auto, think) over the rows answered under
    that budget, and `unbudgeted` over the plain rows of the same modes: `accuracy`, `mean_tokens`
    (all generated tokens), `mean_reasoning_tokens` (the tokens a budget limits:
    ThinkTokens.reasoning_count), `think_rate` (share with a non-empty think block) and
    `closed_by_budget` (share whose think block the budget closed). A budget of 0 is the no-think
    prompt, as the server renders it. Rows need `reasoning_tokens`; budgeted rows `budget`."""
    budgets = sorted(set(budgets))
    plain: dict[str, list[dict]] = defaultdict(list)
    for r in unbudgeted:
        plain[r["mode"]].append(r)
    swept: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for r in budgeted:
        swept[(r["budget"], r["mode"])].append(r)
    mode_names = [m for m in BUDGETED_MODES if plain.get(m) or any(m == k[1] for k in swept)]
    return {"budgets": budgets, "modes": mode_names,
            "unbudgeted": {m: _budget_block(plain.get(m, [])) for m in mode_names},
            "by_budget": {str(b): {m: _budget_block(swept.get((b, m), [])) for m in mode_names} for b in budgets}}


def build_report(predictions: list[dict], mode_names: Iterable[str] = MODE_ORDER) -> dict:
    """The report body: overall metrics plus per category, per difficulty and per benchmark."""
    mode_names = list(mode_names)
    report = compute_metrics(predictions, mode_names)
    for key, name in (("category", "by_category"), ("difficulty", "by_difficulty"), ("benchmark", "by_benchmark")):
        groups: dict[str, list[dict]] = defaultdict(list)
        for p in predictions:
            groups[str(p[key])].append(p)
        report[name] = {g: compute_metrics(rows, mode_names) for g, rows in sorted(groups.items())}
    # (category, difficulty) cells: the points of the auto-vs-forced scatter.
    cells: dict[str, list[dict]] = defaultdict(list)
    for p in predictions:
        cells[f"{p['category']}/{p['difficulty']}"].append(p)
    report["cells"] = {k: compute_metrics(rows, mode_names) for k, rows in sorted(cells.items())}
    return report


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def sample_seed(run_seed: int, benchmark: str, item_id: str, mode: str) -> int:
    """The seed of one item's samples in one mode: a rerun draws the same samples."""
    h = hashlib.sha256(f"{run_seed}:{benchmark}:{item_id}:{mode}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def predict(engine: RolloutEngine, items: list[Record], mode_names: list[str], max_new_tokens: int,
            batch_size: int, scorer, benchmark: str,
            load_images: Callable[[Record], list[Any]], samples: int = 1, temperature: float = 0.0,
            seed: int | None = None, thinking_budget: int | None = None, think_tokens=None) -> tuple[list[dict], dict]:
    """Answers of every item in every mode; one `generate` call per batch of items.

    Greedy by default. With `samples` > 1 (pass@k / maj@k) each item is answered `samples` times
    per mode at `temperature`, seeded per (seed, benchmark, item, mode), and each row carries its
    `sample` index. `scorer`: a `rewards.RewardScorer`, used exactly as the BPO reward uses it.
    `thinking_budget`: as `r4b serve` runs it (budget 0 = the no-think prompt, as the server renders
    it); rows carry `budget` and `budget_closed` (the budget closed the think block).
    `think_tokens` (the engine tokenizer's ThinkTokens): rows carry `reasoning_tokens`."""
    rows: list[dict] = []
    t0, gen_s, n_tokens = time.perf_counter(), 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        reqs = []
        for rec in batch:
            imgs = load_images(rec)
            for m in mode_names:
                prompt_mode = Mode.NO_THINK if thinking_budget == 0 else Mode.parse(m)
                reqs.append(GenerationRequest(
                    prompt=engine.chat.prompt(rec.question, len(imgs), mode=prompt_mode), images=imgs,
                    mode=prompt_mode, max_new_tokens=max_new_tokens, temperature=temperature, n=samples,
                    seed=None if seed is None else sample_seed(seed, benchmark, rec.id, m),
                    key=f"{rec.id}\x1f{m}", thinking_budget=thinking_budget or None))
        tg = time.perf_counter()
        completions = engine.generate(reqs)
        gen_s += time.perf_counter() - tg
        if len(completions) != len(reqs) * samples:
            raise EvalError(f"rollout engine returned {len(completions)} completions for {len(reqs)} requests "
                            f"x {samples} samples")
        by_id = {r.id: r for r in batch}
        per_comp = [req for req in reqs for _ in range(samples)]
        recs = [by_id[req.key.partition("\x1f")[0]] for req in per_comp]
        rewards = scorer.score(completions, recs, prefix_modes=[r.mode for r in per_comp])
        for j, (req, comp, rec, reward) in enumerate(zip(per_comp, completions, recs, rewards)):
            n_tokens += len(comp.token_ids)
            row = prediction_row(comp.text, req.mode.value, rec, len(comp.token_ids), comp.finish_reason,
                                 reward == 1.0, benchmark)
            row["mode"] = req.key.partition("\x1f")[2]      # the mode asked for (budget 0: no-think prompt)
            if samples > 1:
                row["sample"] = j % samples
            if think_tokens is not None:
                opened = think_tokens.open_at_end(comp.prompt_token_ids)
                row["reasoning_tokens"] = think_tokens.reasoning_count(comp.token_ids, opened)
            if thinking_budget is not None:
                row["budget"] = thinking_budget
                row["budget_closed"] = bool(req.thinking_budget) and budget_replay(
                    req.thinking_budget, comp.prompt_token_ids, comp.token_ids, think_tokens) == "closed"
            rows.append(row)
        done = start + len(batch)
        print(f"eval[{benchmark}]: {done}/{len(items)} items x {len(mode_names)} modes"
              + (f" x {samples} samples" if samples > 1 else "")
              + f" ({done / max(time.perf_counter() - t0, 1e-9):.2f} items/s)", flush=True)
    wall = time.perf_counter() - t0
    return rows, {"items": len(items), "seconds": round(wall, 3),
                  "items_per_s": len(items) / wall if wall > 0 else None,
                  "tokens_per_s": n_tokens / gen_s if gen_s > 0 else None, "generated_tokens": n_tokens}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def eval_identity(cfg: RunConfig, store, model_uri: str, texts: dict[str, str], tag: str,
                  compare: str | None, engine_given: bool) -> dict:
    """What a report depends on: eval config, the model's weights (its manifest's config hash),
    the benchmark contents, tag and comparison. An unknown model lineage means: never skip."""
    from r4b_core.identity import model_lineage, stage_identity

    model = None if engine_given else model_lineage(store, model_uri)
    return stage_identity(cfg, "eval", {
        "model": model, "model_uri": model_uri, "tag": tag, "compare": compare or "",
        **{f"data_{k}": hashlib.sha256(v.encode()).hexdigest() for k, v in texts.items()}})


def _think_tokens(engine):
    """The think-tag ids of the engine's tokenizer, which a budget sweep counts reasoning with."""
    from r4b_core.assets.r4b_thinking import ThinkTokens

    tokenizer = getattr(engine, "tokenizer", None)
    if tokenizer is None:
        raise EvalError(f"eval.thinking_budgets: the rollout engine {type(engine).__name__} has no `tokenizer`; "
                        "a budget sweep counts reasoning tokens with it")
    try:
        return ThinkTokens.of(tokenizer)
    except ValueError as exc:
        raise EvalError(f"eval.thinking_budgets: {exc}") from None


def load_report(source: str | dict, store=None) -> dict:
    """A report.json given as a dict, a URI of the file, or the URI of its eval folder."""
    if isinstance(source, dict):
        return source
    uri = source if source.endswith(".json") else source.rstrip("/") + "/report.json"
    try:
        text = store.read_text(uri) if store is not None else Path(uri).read_text()
    except (OSError, R4BError) as exc:
        raise EvalError(f"{uri}: cannot read the report to compare against ({exc}); run `r4b eval` "
                        "for that model first or fix --compare") from None
    try:
        rep = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EvalError(f"{uri}:{exc.lineno}: not valid JSON ({exc.msg}); is it a report.json?") from None
    if "modes" not in rep:
        raise EvalError(f"{uri}: not an r4b eval report (no 'modes' key); point --compare at eval/<tag>/report.json")
    return rep


def run_eval(cfg: RunConfig, model_uri: str, eval_uri: str | None, out_uri: str, tag: str, tracker=None,
             compare: str | dict | None = None, engine: RolloutEngine | None = None) -> dict:
    """Evaluate `model_uri` on `eval_uri` (+ `eval.external_uri`) in every mode; return the report.

    `engine`: an already open RolloutEngine serving the model (e.g. BPO's); None = open one.
    """
    from r4b_core import storage
    from r4b_core.identity import identity_hash, is_storage_uri
    from r4b_core.rollout import open_engine
    from r4b_core.data.images import load_image
    from r4b_core.rewards import RewardScorer

    started = time.time()
    e = cfg.eval
    store = storage.Store.from_config(cfg.storage)
    prefix = out_uri.rstrip("/")
    if isinstance(compare, dict):
        compare_key = f"{compare.get('tag')}@{compare.get('model')}"
    else:
        compare_key = compare
    if engine is None and is_storage_uri(model_uri) and not store.exists(model_uri):
        raise EvalError(f"{model_uri}: no model there; train it first (r4b anneal / r4b bpo) or pass --model URI")
    texts: dict[str, str] = {}
    if eval_uri:
        if not store.exists(eval_uri):
            raise EvalError(f"{eval_uri}: eval data not found; generate it (r4b data generate) or set data.eval_uri")
        texts["eval"] = store.read_text(eval_uri)
    if e.external_uri:
        if not store.exists(e.external_uri):
            raise EvalError(f"{e.external_uri}: external benchmark not found; fix eval.external_uri")
        texts["external"] = store.read_text(e.external_uri)
    if not texts:
        raise EvalError("nothing to evaluate: no eval split and no eval.external_uri; set one")

    ident = eval_identity(cfg, store, model_uri, texts, tag, compare_key, engine is not None)
    chash = identity_hash(ident)
    if chash is not None and store.is_complete(prefix, chash):
        print(f"eval: {prefix} is complete for config {chash}; skipping")
        return json.loads(store.read_text(store.join(prefix, "report.json")))
    if chash is None:
        chash = "unverified-" + hashlib.sha256(f"{time.time_ns()}".encode()).hexdigest()[:8]
    other = load_report(compare, store) if compare is not None else None

    benchmarks: list[tuple[str, str, list[Record]]] = []
    if eval_uri:
        benchmarks.append(("eval", eval_uri, load_benchmark(texts["eval"], eval_uri, None, "eval", e.limit,
                                                                  cfg.data.max_question_chars)))
    if e.external_uri:
        name = Path(e.external_uri.rsplit("/", 1)[-1]).stem
        benchmarks.append((name, e.external_uri, load_benchmark(texts["external"], e.external_uri,
                                                                e.field_map, name, e.limit,
                                                                cfg.data.max_question_chars)))

    def images_of(rec: Record) -> list[Any]:
        return [load_image(ref, store=store) for ref in rec.images]

    predictions: list[dict] = []
    samples: list[dict] = []
    swept: list[dict] = []
    throughput: dict[str, dict] = {}
    engine_name = e.engine if engine is None else type(engine).__name__
    with contextlib.ExitStack() as stack:
        scorer = stack.enter_context(RewardScorer())
        if engine is None:
            engine = stack.enter_context(open_engine(cfg, e.engine, model_uri, label="eval",
                                                     thinking_budgets=bool(e.thinking_budgets)))
        think_tokens = _think_tokens(engine) if e.thinking_budgets else None
        for name, _, items in benchmarks:
            rows, tp = predict(engine, items, list(e.modes), e.max_new_tokens, e.batch_size, scorer,
                               name, images_of, think_tokens=think_tokens)
            predictions.extend(rows)
            throughput[name] = tp
            for budget in e.thinking_budgets:
                rows, tp = predict(engine, items, [m for m in e.modes if m in BUDGETED_MODES], e.max_new_tokens,
                                   e.batch_size, scorer, name, images_of, thinking_budget=budget,
                                   think_tokens=think_tokens)
                swept.extend(rows)
                throughput[f"{name}/budget_{budget}"] = tp
            if e.pass_k:
                rows, tp = predict(engine, items, list(e.modes), e.max_new_tokens, e.batch_size, scorer, name,
                                   images_of, samples=max(e.pass_k), temperature=e.sample_temperature, seed=cfg.seed)
                samples.extend(rows)
                throughput[f"{name}/sampled"] = tp
        scoring = scorer.counters

    primary = benchmarks[0][0]
    report = build_report([p for p in predictions if p["benchmark"] == primary], e.modes)
    report["benchmarks"] = {name: build_report([p for p in predictions if p["benchmark"] == name], e.modes)
                            for name, _, _ in benchmarks}
    report["tag"] = tag
    report["model"] = model_uri
    report["primary_benchmark"] = primary
    report["data"] = {name: uri for name, uri, _ in benchmarks}
    report["settings"] = {"modes": list(e.modes), "max_new_tokens": e.max_new_tokens, "greedy": True,
                          "engine": engine_name, "thinking_budgets": list(e.thinking_budgets)}
    if e.thinking_budgets:
        for name, block in [(primary, report), *report["benchmarks"].items()]:
            block["budget_sweep"] = budget_sweep([p for p in predictions if p["benchmark"] == name],
                                                 [r for r in swept if r["benchmark"] == name], e.thinking_budgets)
    if samples:
        report["sampling"] = sampling_report([r for r in samples if r["benchmark"] == primary], e, cfg.seed)
    report["throughput"] = throughput
    report["scoring"] = scoring
    if other is not None:
        report["compare"] = {"tag": other.get("tag", "other"), "model": other.get("model"),
                             **{k: other[k] for k in ("modes", "by_category", "by_difficulty", "cells",
                                                      "hybrid_accuracy", "hybrid_items", "oracle_accuracy",
                                                      "mode_selection", "tokens_at_matched_accuracy",
                                                      "tokens_where_all_correct", "sampling", "budget_sweep",
                                                      "n_items")
                                if k in other}}

    # Only now, with the new outputs ready: an earlier attempt's manifest must not vouch for them.
    store.invalidate(prefix)
    _write_outputs(store, prefix, report, predictions, samples, swept)
    manifest = {"stage": "eval", "tag": tag, "config_hash": chash, "identity": ident,
                "inputs": {"model": model_uri, "data": report["data"], "compare": compare_key},
                "outputs": {"report": store.join(prefix, "report.json"),
                            "predictions": store.join(prefix, "predictions.jsonl"),
                            "report_md": store.join(prefix, "report.md"),
                            **({"samples": store.join(prefix, "samples.jsonl")} if samples else {}),
                            **({"budget_sweep": store.join(prefix, "budget_sweep.jsonl")} if swept else {})},
                "counts": {"items": report["n_items"], "predictions": len(predictions)},
                "metrics": headline(report), "throughput": throughput,
                "wall_time_s": round(time.time() - started, 2)}
    _log(tracker, report, prefix, tag)
    store.commit(prefix, manifest)
    print(f"eval[{tag}]: {format_headline(report)}")
    return report


def headline(report: dict) -> dict[str, float]:
    """Flat metric dict (MLflow names are sanitised by the tracker)."""
    out: dict[str, float] = {}
    for m, d in report["modes"].items():
        for k in ("accuracy", "mean_tokens", "think_rate"):
            if d.get(k) is not None:
                out[f"{m}/{k}"] = d[k]
    for k in ("hybrid_accuracy", "oracle_accuracy"):
        if report.get(k) is not None:
            out[k] = report[k]
    sel = report.get("mode_selection") or {}
    for k in ("mcc", "precision", "recall"):
        if sel.get(k) is not None:
            out[f"auto/think_{k}"] = sel[k]
    ratio = (report.get("tokens_at_matched_accuracy") or {}).get("auto_over_mode")
    if ratio is not None:
        out["auto/tokens_over_matched_mode"] = ratio
    for m, d in ((report.get("sampling") or {}).get("modes") or {}).items():
        for k, v in d.items():
            if k.startswith(("pass@", "maj@")) and v is not None:
                out[f"{m}/{k}"] = v
    for budget, block in ((report.get("budget_sweep") or {}).get("by_budget") or {}).items():
        for m, d in block.items():
            for k in ("accuracy", "mean_reasoning_tokens"):
                if d.get(k) is not None:
                    out[f"{m}/budget_{budget}/{k}"] = d[k]
    for cat, block in report.get("by_category", {}).items():
        for m, d in block["modes"].items():
            if d.get("accuracy") is not None:
                out[f"{m}/{cat}/accuracy"] = d["accuracy"]
            if m == "auto" and d.get("think_rate") is not None:
                out[f"auto/{cat}/think_rate"] = d["think_rate"]
    for diff, block in report.get("by_difficulty", {}).items():
        d = block["modes"].get("auto")
        if d and d.get("think_rate") is not None:
            out[f"auto/difficulty_{diff}/think_rate"] = d["think_rate"]
    return out


def format_headline(report: dict) -> str:
    parts = []
    for m, d in report["modes"].items():
        acc, tok, tr = d.get("accuracy"), d.get("mean_tokens"), d.get("think_rate")
        parts.append(f"{m} acc {acc:.3f} tokens {tok:.1f} think-rate {tr:.2f}" if acc is not None else f"{m} n/a")
    h = report.get("hybrid_accuracy")
    parts.append(f"hybrid {h:.3f} over {report.get('hybrid_items')} items" if h is not None else "hybrid n/a")
    mcc = (report.get("mode_selection") or {}).get("mcc")
    parts.append(f"think-when-needed MCC {mcc:.3f}" if mcc is not None else "think-when-needed MCC n/a")
    return "; ".join(parts)


def _write_outputs(store, prefix: str, report: dict, predictions: list[dict], samples: list[dict],
                   swept: list[dict]) -> None:
    """report.json, predictions.jsonl (+ samples.jsonl, budget_sweep.jsonl), report.md + plots:
    rendered locally, then stored."""
    import tempfile

    from r4b_core.report import write_report

    for name, rows in (("predictions.jsonl", predictions), ("samples.jsonl", samples), ("budget_sweep.jsonl", swept)):
        if rows or name == "predictions.jsonl":
            store.write_text(store.join(prefix, name), "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in rows))
    store.write_text(store.join(prefix, "report.json"), json.dumps(report, indent=2, sort_keys=False))
    with tempfile.TemporaryDirectory() as tmp:
        files = write_report(report, Path(tmp))
        for f in files:
            data = f.read_bytes()
            store.write_bytes(store.join(prefix, f.name), data)


def _log(tracker, report: dict, prefix: str, tag: str) -> None:
    if tracker is None:
        return
    with tracker.stage(f"eval-{tag}"):
        tracker.log_params({"eval": report["settings"], "eval_model": report["model"], "eval_tag": tag})
        tracker.log_metrics({f"eval/{k}": v for k, v in headline(report).items()})
        # accuracy vs budget as one series per mode (MLflow's step axis = the budget)
        for budget, block in ((report.get("budget_sweep") or {}).get("by_budget") or {}).items():
            tracker.log_metrics({f"eval/budget_sweep/{m}/{k}": d[k] for m, d in block.items()
                                 for k in ("accuracy", "mean_reasoning_tokens") if d.get(k) is not None},
                                step=int(budget))
        tracker.log_dict(report, f"eval/{tag}/report.json")
        import tempfile

        from r4b_core.report import write_report

        with tempfile.TemporaryDirectory() as tmp:
            for f in write_report(report, Path(tmp)):
                tracker.log_artifact(str(f), f"eval/{tag}")
