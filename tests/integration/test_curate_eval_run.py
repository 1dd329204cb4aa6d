"""Curation and three-mode evaluation on the real tiny model, in-process HF engine, local storage
and a SQLite MLflow: the tiny annotator is trained (direct-only SFT through the annealing stage),
labels a synthetic train split with injected faults, and is then evaluated in auto / think /
no-think mode, once on its own and once compared against the untrained base model.

Prints the throughput and the report's headline numbers (pytest -s shows them)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from r4b_core import layout, modes
from r4b_core.config import load_config
from r4b_core.data.schema import Record

pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def run(tmp_path_factory, repo_root):
    from r4b_core.prepare import run_prepare

    root = tmp_path_factory.mktemp("curate_eval")
    cfg = load_config(repo_root / "configs" / "tiny.yaml", [
        f"storage.root={root}/runs", "tracking.uri=null",
        "data.synthetic.train_size=64", "data.synthetic.rl_size=4", "data.synthetic.eval_size=24",
        "curate.annotator=base", "curate.num_samples=4", "curate.annotator_train_steps=20", "curate.batch_size=32",
        "curate.max_new_tokens=16", "anneal.micro_batch_size=4", "anneal.optim.warmup_steps=5",
        "eval.max_new_tokens=24", "eval.batch_size=24", "model.pretrain.steps=0",
    ])
    uris = run_prepare(cfg)
    return cfg, uris


def _faulty_copy(train_uri: str) -> tuple[str, dict[str, int]]:
    """The train split plus a subjective item (judge path), a malformed line, a record with a
    missing image and a duplicate."""
    from pathlib import Path

    src = Path(train_uri)
    lines = src.read_text().splitlines()
    first = json.loads(lines[0])
    dup = dict(first, id="dup-of-first", question=first["question"].upper() + "  ")
    missing = dict(first, id="no-image", images=["images/does-not-exist.png"])
    subjective = dict(first, id="subjective-1", question="Describe the picture in one sentence.",
                      answer="numbers in colours", answer_type="text", objective=False, category="general")
    lines += [json.dumps(subjective), '{"id": "broken", "question": ', json.dumps(missing), json.dumps(dup)]
    out = src.with_name("train_with_faults.jsonl")
    out.write_text("\n".join(lines) + "\n")
    n = len(lines)
    return str(out), {"bad_line": n - 2, "image_missing": n - 1, "duplicate": n}


def test_curate_then_eval_on_the_tiny_model(run):
    from r4b_core.curate import run_curate
    from r4b_core.evaluate import format_headline, run_eval
    from r4b_core.storage import Store
    from r4b_core.tracking import Tracker

    cfg, uris = run
    store = Store.from_config(cfg.storage)
    raw_uri, fault_lines = _faulty_copy(uris["train"])
    out_uri = layout.curated_uri(cfg)
    tracker = Tracker(cfg)

    # ---- curation ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    manifest = run_curate(cfg, raw_uri, out_uri, tracker=tracker)
    curate_s = time.perf_counter() - t0
    prefix = layout.stage_dir(cfg, "curate")
    stats, tp = manifest["stats"], manifest["throughput"]

    assert manifest["counts"] == {"read": 68, "kept": 65, "rejected": 3}
    rejects = [json.loads(x) for x in store.read_text(prefix + "/rejects.jsonl").splitlines()]
    got = {r["reason"].split(":")[0]: int(r["where"].rsplit(":", 1)[1]) for r in rejects}
    assert got == fault_lines
    assert all(r["where"].startswith(raw_uri + ":") for r in rejects)

    rows = [json.loads(x) for x in store.read_text(out_uri).splitlines()]
    assert len(rows) == 65 and all(r["label"] in ("reasoning", "direct") for r in rows)
    # Labels follow the pass counts (objective items with 0 of N correct are reasoning items) and
    # the judge (the subjective item: the real annotator's reply, parsed or counted as unparsed).
    judge = stats["by_category"]["general"]["judge"]
    assert sum(judge.values()) == 1
    assert sum(r["label"] == "reasoning" for r in rows) == stats["pass_hist"][0] + judge.get("yes", 0) == stats["reasoning"]
    assert sum(stats["pass_hist"]) == 64
    for r in rows:
        rec = Record.model_validate(r)
        target = rec.sft_target()
        if rec.label == "reasoning":
            assert target.startswith(modes.GENERATION_PREFIX[modes.Mode.THINK]) and rec.reasoning
        else:
            assert target.startswith(modes.GENERATION_PREFIX[modes.Mode.NO_THINK])
        assert all(im.startswith("/") for im in rec.images)          # absolute: readable from curate/
    # The annotator is a real model trained by the annealing stage, then served by the HF engine.
    assert store.is_complete(prefix + "/annotator/model", store.read_manifest(prefix + "/annotator/model")["config_hash"])
    assert manifest["scoring"]["items"] == 64 * 4
    assert tp["items_per_s"] > 0 and tp["tokens_per_s"] > 0 and tp["generated_tokens"] > 0
    assert store.is_complete(prefix, manifest["config_hash"])

    # Same config: skipped in seconds, same manifest.
    t1 = time.perf_counter()
    again = run_curate(cfg, raw_uri, out_uri)
    assert again["config_hash"] == manifest["config_hash"] and time.perf_counter() - t1 < 10

    # ---- evaluation: the annotator, then the base model compared against it -----------------------
    annot = prefix + "/annotator/model"
    t2 = time.perf_counter()
    rep = run_eval(cfg, annot, uris["eval"], layout.eval_dir(cfg, "annotator"), "annotator", tracker=tracker)
    eval_s = time.perf_counter() - t2
    out = layout.eval_dir(cfg, "annotator")
    assert rep["n_items"] == 24
    for m in ("auto", "think", "no_think"):
        d = rep["modes"][m]
        assert d["n"] == 24 and 0.0 <= d["accuracy"] <= 1.0 and d["mean_tokens"] > 0 and 0.0 <= d["think_rate"] <= 1.0
    assert set(rep["by_category"]) == {"math", "perception"}
    assert set(rep["by_difficulty"]) == {"1", "2", "3"}
    assert "hybrid_accuracy" in rep and rep["hybrid_items"] <= 24
    preds = [json.loads(x) for x in store.read_text(out + "/predictions.jsonl").splitlines()]
    assert len(preds) == 72
    # Every row's correctness agrees with recomputing accuracy from the file.
    assert rep["modes"]["no_think"]["accuracy"] == pytest.approx(
        np.mean([p["correct"] for p in preds if p["mode"] == "no_think"]))
    assert json.loads(store.read_text(out + "/report.json"))["modes"] == rep["modes"]
    for png in ("accuracy_tokens.png", "think_rate_by_difficulty.png", "auto_vs_forced.png"):
        from pathlib import Path

        p = Path(out) / png
        assert p.stat().st_size > 5_000 and np.asarray(Image.open(p).convert("L"), dtype=float).std() > 5
    assert store.is_complete(out, store.read_manifest(out)["config_hash"])
    t3 = time.perf_counter()
    assert run_eval(cfg, annot, uris["eval"], out, "annotator")["modes"] == rep["modes"]
    assert time.perf_counter() - t3 < 10                                  # skipped: same model, data, config

    base = run_eval(cfg, uris["base_model"], uris["eval"], layout.eval_dir(cfg, "base"), "base", tracker=tracker,
                    compare=out + "/report.json")
    md = store.read_text(layout.eval_dir(cfg, "base") + "/report.md")
    assert "# Three-mode evaluation: base vs annotator" in md
    assert base["compare"]["tag"] == "annotator" and base["compare"]["modes"] == rep["modes"]
    tracker.close()

    # ---- MLflow got the stage runs with their metrics and the report ------------------------------
    import mlflow

    client = mlflow.MlflowClient(tracker.uri)
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])}
    assert {"curate", "eval-annotator", "eval-base"} <= set(runs)
    cm = runs["curate"].data.metrics
    assert cm["curate/kept"] == 65 and cm["curate/rejected"] == 3 and cm["curate/items_per_s"] > 0
    em = runs["eval-annotator"].data.metrics
    assert em["eval/auto/accuracy"] == pytest.approx(rep["modes"]["auto"]["accuracy"])
    arts = [a.path for a in client.list_artifacts(runs["eval-annotator"].info.run_id, "eval/annotator")]
    assert {"eval/annotator/report.json", "eval/annotator/report.md", "eval/annotator/auto_vs_forced.png"} <= set(arts)

    print(f"\ncurate: {curate_s:.1f}s total (annotator training included), labelling "
          f"{tp['items_per_s']:.2f} items/s, {tp['tokens_per_s']:.1f} tokens/s; reasoning ratio "
          f"{stats['reasoning_ratio']:.3f} (math {stats['by_category']['math']['reasoning_ratio']:.3f}, "
          f"perception {stats['by_category']['perception']['reasoning_ratio']:.3f}); pass hist {stats['pass_hist']}; "
          f"rejected {stats['rejected']}")
    print(f"eval annotator: {eval_s:.1f}s, {rep['throughput']['eval']['items_per_s']:.2f} items/s; {format_headline(rep)}")
    print(f"eval base:      {format_headline(base)}")


@pytest.mark.vllm
def test_eval_through_vllm_matches_hf(vllm_server, tiny_model_dir, tmp_path):
    """The RolloutEngine swap: the same three-mode eval through the vLLM sidecar and in-process HF
    gives the same greedy predictions (fp32), hence the same report; the thinking-budget sweep too
    (the shared server runs the budget's logits processor, HF its own decode loop)."""
    from r4b_core.config import RunConfig, SyntheticDataConfig
    from r4b_core.data.synthetic import generate_split
    from r4b_core.evaluate import run_eval
    from r4b_core.models.loading import load_model
    from r4b_core.rollout.hf import HFEngine
    from r4b_core.rollout.vllm import VLLMEngine

    eval_uri = str(generate_split("eval", 12, SyntheticDataConfig(seed=3), tmp_path / "data"))
    cfg = RunConfig.model_validate({"storage": {"root": str(tmp_path / "runs")},
                                    "eval": {"max_new_tokens": 12, "batch_size": 12, "thinking_budgets": [0, 4]}})
    model, processor = load_model(str(tiny_model_dir), cfg.model)
    reports = {}
    for name, engine in (("hf", HFEngine(model, processor)), ("vllm", VLLMEngine(vllm_server, processor))):
        try:
            reports[name] = run_eval(cfg, str(tiny_model_dir), eval_uri, str(tmp_path / name), name, engine=engine)
        finally:
            engine.close()
    preds = {n: [json.loads(x) for x in (tmp_path / n / "predictions.jsonl").read_text().splitlines()] for n in reports}
    assert len(preds["hf"]) == 36
    assert [(p["id"], p["mode"], p["text"], p["tokens"]) for p in preds["vllm"]] == \
        [(p["id"], p["mode"], p["text"], p["tokens"]) for p in preds["hf"]]
    assert reports["vllm"]["modes"] == reports["hf"]["modes"]
    assert reports["vllm"]["settings"]["engine"] == "VLLMEngine"
    swept = {n: [json.loads(x) for x in (tmp_path / n / "budget_sweep.jsonl").read_text().splitlines()] for n in reports}
    assert len(swept["hf"]) == 12 * 2 * 2 and swept["vllm"] == swept["hf"]       # items x budgets x (auto, think)
    assert reports["vllm"]["budget_sweep"] == reports["hf"]["budget_sweep"]


def test_eval_with_an_external_mathvista_style_benchmark(tiny_model_dir, tmp_path):
    """eval.external_uri + field_map: a benchmark in someone else's field names, images next to it,
    evaluated next to the eval split and reported per benchmark."""
    from r4b_core.config import RunConfig, SyntheticDataConfig
    from r4b_core.data.synthetic import generate_split
    from r4b_core.evaluate import run_eval

    ours = generate_split("eval", 6, SyntheticDataConfig(seed=5), tmp_path / "data")
    ext_dir = tmp_path / "mathvista"
    (ext_dir / "img").mkdir(parents=True)
    lines = []
    for i, r in enumerate(map(json.loads, ours.read_text().splitlines())):
        src = ours.parent / r["images"][0]
        (ext_dir / "img" / f"{i}.png").write_bytes(src.read_bytes())
        lines.append(json.dumps({"pid": i, "query": r["question"], "image": f"img/{i}.png",
                                 "answer": int(r["answer"]) if r["answer"].isdigit() else r["answer"],
                                 "metadata": {"task": r["category"], "grade": r["difficulty"]}}))
    (ext_dir / "testmini.jsonl").write_text("\n".join(lines) + "\n")
    cfg = RunConfig.model_validate({
        "storage": {"root": str(tmp_path / "runs")},
        "eval": {"max_new_tokens": 8, "external_uri": str(ext_dir / "testmini.jsonl"),
                 "field_map": {"id": "pid", "question": "query", "images": "image",
                               "category": "metadata.task", "difficulty": "metadata.grade"}}})
    rep = run_eval(cfg, str(tiny_model_dir), str(ours), str(tmp_path / "out"), "tiny")
    assert set(rep["benchmarks"]) == {"eval", "testmini"}
    assert rep["benchmarks"]["testmini"]["n_items"] == 6 and rep["n_items"] == 6
    assert rep["primary_benchmark"] == "eval"
    preds = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert sum(p["benchmark"] == "testmini" for p in preds) == 18
    # Same images and questions, mapped fields: the greedy outputs of both benchmarks agree row by row.
    ev = [p for p in preds if p["benchmark"] == "eval"]
    ext = [p for p in preds if p["benchmark"] == "testmini"]
    assert [(p["mode"], p["text"], p["category"], p["difficulty"], p["reference"]) for p in ext] == \
        [(p["mode"], p["text"], p["category"], p["difficulty"], p["reference"]) for p in ev]
    assert "## By benchmark" in (tmp_path / "out" / "report.md").read_text()
    # A rerun under another config that fails before evaluating (a bad line in the new external
    # benchmark) leaves the finished report complete for its own config.
    from r4b_core.evaluate import EvalError
    from r4b_core.storage import Store

    finished = Store().read_manifest(str(tmp_path / "out"))
    (ext_dir / "broken.jsonl").write_text(lines[0] + "\n{oops\n")
    broken = cfg.model_copy(deep=True)
    broken.eval.external_uri = str(ext_dir / "broken.jsonl")
    with pytest.raises(EvalError, match=r"broken\.jsonl:2: not valid JSON"):
        run_eval(broken, str(tiny_model_dir), str(ours), str(tmp_path / "out"), "tiny")
    assert Store().is_complete(str(tmp_path / "out"), finished["config_hash"])


def test_eval_thinking_budget_sweep_from_the_command_line(tiny_model_dir, tmp_path, repo_root):
    """`r4b eval --thinking-budget 0,4,16` on the tiny model, as a user runs it: auto and think mode
    answered again under each budget; report.json's budget_sweep agrees with the rows in
    budget_sweep.jsonl, report.md has the table and the plot, the manifest's identity holds the
    budgets, and MLflow has accuracy vs budget as a stepped series per mode."""
    import os
    import subprocess
    import sys

    import mlflow
    import yaml

    from r4b_core.config import SyntheticDataConfig
    from r4b_core.data.synthetic import generate_split
    from r4b_core.evaluate import budget_sweep

    eval_uri = generate_split("eval", 10, SyntheticDataConfig(seed=3), tmp_path / "data")
    db = tmp_path / "mlflow.db"
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"name": "sweep", "storage": {"root": str(tmp_path / "runs")},
                                      "tracking": {"uri": f"sqlite:///{db}"},
                                      "eval": {"max_new_tokens": 24, "batch_size": 10}}))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "r4b_core.cli", "eval", "--config", str(config), "--tag", "tiny",
                           "--model", str(tiny_model_dir), "--data", str(eval_uri), "--out", str(out),
                           "--thinking-budget", "16,0,4"], capture_output=True, text=True, timeout=600, cwd=repo_root,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    sweep = rep["budget_sweep"]
    assert sweep["budgets"] == [0, 4, 16] and sweep["modes"] == ["auto", "think"]
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in (out / "budget_sweep.jsonl").read_text().splitlines()]
    assert len(rows) == 10 * 3 * 2 and {r["budget"] for r in rows} == {0, 4, 16}
    assert sweep == budget_sweep(preds, rows, [0, 4, 16])
    # budget 0 is the no-think prompt: auto and think answer exactly as no-think mode does
    no_think = {p["id"]: p["text"] for p in preds if p["mode"] == "no_think"}
    assert all(r["text"] == no_think[r["id"]] and r["reasoning_tokens"] == 0 for r in rows if r["budget"] == 0)
    assert all(r["reasoning_tokens"] <= r["budget"] for r in rows)
    assert sweep["by_budget"]["4"]["think"]["closed_by_budget"] > 0.5           # the random model reasons on
    assert sweep["unbudgeted"]["think"]["mean_reasoning_tokens"] > sweep["by_budget"]["16"]["think"]["mean_reasoning_tokens"]
    md = (out / "report.md").read_text()
    assert "## Thinking budget" in md and "![accuracy_budget](accuracy_budget.png)" in md
    assert (out / "accuracy_budget.png").stat().st_size > 5_000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["identity"]["eval"]["thinking_budgets"] == [0, 4, 16]
    assert manifest["outputs"]["budget_sweep"].endswith("budget_sweep.jsonl")
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    run = client.search_runs([client.get_experiment_by_name("r4b").experiment_id], "attributes.run_name = 'eval-tiny'")[0]
    series = client.get_metric_history(run.info.run_id, "eval/budget_sweep/think/accuracy")
    assert [(m.step, m.value) for m in series] == [(b, sweep["by_budget"][str(b)]["think"]["accuracy"]) for b in (0, 4, 16)]
    assert run.data.metrics["eval/auto/budget_16/accuracy"] == sweep["by_budget"]["16"]["auto"]["accuracy"]
