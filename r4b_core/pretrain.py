"""Stage 0b — pretrain the tiny base so that it starts where R-4B's base starts: able to read,
compute and reason.

    model:
      base: tiny
      pretrain: {steps: 3000, tasks: [read, arithmetic, think, direct], direct_items: 2000}   # configs/repro.yaml

R-4B anneals a pretrained VLM (SigLIP2 + Qwen3-4B) that already reads text in images, does
arithmetic and, Qwen3 being a hybrid thinking model, either reasons in <think> blocks or answers
directly. Our tiny base is random, and learning all that from the bi-mode mix alone is slow: with
few reasoning traces it barely reads after 1,600 steps (perception accuracy 0.2-0.5), and with the
reasoning traces a strong annotator leaves (4 % of the items) forced thinking stays useless
(docs/reproduction.md). This stage gives it
the skills first, on the train split only (no eval or RL item is ever seen):

* read       one example per training image: "Read the numbers from top to bottom." ->
             "A = 37 red\\nB = 4 blue\\n...": every number with its colour, in order (an OCR task
             written as math traces start; the images are the train split's, the questions are not).
* arithmetic text only: "Compute 37 + 25." -> "37 + 25 = 50 + 12 = 62", one operation written
             as the synthetic traces write it, on random operands drawn from an RNG of its own.
* think      the first `question_items` training questions with their own trace, in the thinking
             format (`<think>\\n{trace}\\n</think>\\n\\n{answer}`), every category and level;
* direct     the first `direct_items` of them answered directly (`<think>\\n\\n</think>\\n\\n{answer}`).

Think examples train with the thinking template, the others with the direct one: with both `think`
and `direct` the base is a hybrid like Qwen3-4B, able to reason or to answer directly; curation and
annealing decide when it thinks. A few direct answers are enough, and they matter: a think-only
base has never answered directly, so annealing's direct targets (first loss 6.0) overwrite forced
thinking on perception, which annealing never shows with a trace; 2,000 direct answers keep it (first
loss 0.83), while 16,000 dilute thinking on hard math (docs/reproduction.md, e10, e14, e15).

Training is the annealing loop (`run_anneal`: packing, optimizer, checkpoints, resume, skip when
done) with `model.pretrain.steps` steps; the model lands in `<run>/pretrain/model`, which
`layout.base_model_dir` then names as the base for every later stage. Needs the synthetic data
source (it must know every number drawn).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

from r4b_core import layout
from r4b_core.config import RunConfig
from r4b_core.errors import R4BError

READ_QUESTION = "Read the numbers from top to bottom."


class PretrainError(R4BError):
    """The pretraining cannot run as configured; the message names the setting and the fix."""


def reading_records(cfg: RunConfig, train_records: list) -> list:
    """One transcription example per training image (same image references as the split)."""
    from r4b_core.data.synthetic import describe, draw_split

    items = draw_split("train", len(train_records), cfg.data.synthetic)   # deterministic: the same draw
    out = []
    for rec, item in zip(train_records, items):
        if rec.question != item.question or rec.answer != item.answer:
            raise PretrainError(f"train split record {rec.id} does not match the synthetic generator's item "
                                f"(was the data generated with another data.synthetic config?); delete "
                                f"{layout.data_dir(cfg)} and rerun r4b prepare")
        answer = "\n".join(describe(item.numbers, item.colours))
        out.append(rec.model_copy(update={
            "id": f"{rec.id}-read", "question": READ_QUESTION, "answer": answer, "answer_type": "text",
            "category": "perception", "difficulty": 1, "reasoning": None, "label": "direct",
            "source": f"{rec.source}/pretrain"}))
    return out


def arithmetic_records(cfg: RunConfig) -> list:
    """Single operations as trace lines, on operands from the math templates' ranges."""
    from r4b_core.data.schema import Record
    from r4b_core.data.synthetic import draw_item, levels_of

    syn = cfg.data.synthetic
    rng = random.Random(f"r4b-pretrain-arithmetic/{cfg.seed}")
    out = []
    for i in range(cfg.model.pretrain.arithmetic_items):
        item = draw_item(rng, "math", rng.choice(levels_of("math", syn.difficulties)), syn.trace_style)
        steps = item.reasoning.splitlines()[len(item.numbers):]    # skip the "A = 37 red" description lines
        line = rng.choice(steps)
        out.append(Record(id=f"arithmetic-{i:05d}", question=f"Compute {line.split(' = ')[0]}.", answer=line,
                          answer_type="text", category="math", difficulty=1, source="synthetic-pretrain",
                          label="direct"))
    return out


def question_records(cfg: RunConfig, train_records: list, label: str) -> list:
    """The first training questions answered in one mode: "reasoning" (the thinking format with the
    item's trace; `question_items` of them) or "direct" (an empty think block, then the answer;
    `direct_items`). Both together make a hybrid base that can do either; annealing teaches when to
    think."""
    p = cfg.model.pretrain
    out = []
    for rec in train_records[:p.question_items if label == "reasoning" else p.direct_items]:
        if label == "reasoning" and not (rec.reasoning or "").strip():
            raise PretrainError(f"train split record {rec.id} has no reasoning trace for the think task; the "
                                f"synthetic generator writes one for every item (was {layout.data_dir(cfg)} "
                                f"generated by another version?)")
        out.append(rec.model_copy(update={"id": f"{rec.id}-{'think' if label == 'reasoning' else 'direct'}",
                                          "label": label, "source": f"{rec.source}/pretrain"}))
    return out


def run_pretrain(cfg: RunConfig, store, train_uri: str, init_uri: str) -> str:
    """Pretrain the model at `init_uri`; returns the pretrained model's URI (skips when done)."""
    from r4b_core.anneal import run_anneal
    from r4b_core.data.schema import parse_jsonl, write_jsonl

    p = cfg.model.pretrain
    if cfg.data.source != "synthetic":
        raise PretrainError(f"model.pretrain.steps={p.steps} needs data.source: synthetic (the read task "
                            f"transcribes the generated images); set model.pretrain.steps: 0 for your own data")
    out_uri = layout.base_model_dir(cfg)
    records = []
    train = parse_jsonl(store.read_bytes(train_uri), train_uri).records if set(p.tasks) - {"arithmetic"} else []
    if "read" in p.tasks:
        records += reading_records(cfg, train)
    if "arithmetic" in p.tasks:
        records += arithmetic_records(cfg)
    if "think" in p.tasks:
        records += question_records(cfg, train, "reasoning")
    if "direct" in p.tasks:
        records += question_records(cfg, train, "direct")
    # Next to train.jsonl, so that the read examples' relative image references resolve (local or S3).
    data_uri = train_uri.rsplit("/", 1)[0] + "/pretrain.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "pretrain.jsonl"
        write_jsonl(local, records)
        store.write_text(data_uri, local.read_text(encoding="utf-8"))

    pcfg = cfg.model_copy(deep=True)
    pcfg.anneal.steps = p.steps
    pcfg.anneal.compliance_samples = 0      # no think/no-think targets yet: nothing to check
    pcfg.anneal.optim = p.optim.model_copy(update={"warmup_steps": min(p.optim.warmup_steps, max(1, p.steps // 10))})
    manifest = run_anneal(pcfg, data_uri, init_uri, out_uri)
    loss = (manifest.get("metrics") or {}).get("loss")
    print(f"pretrain: base model {out_uri} ({', '.join(p.tasks)}; {p.steps} steps, final loss {loss})"
          + (" [skipped: done]" if manifest.get("skipped") else ""), flush=True)
    return out_uri
