"""The annealing stage on the real tiny VLM and real synthetic data: LR schedule and parameter
groups, bad-input accounting, a short run whose loss falls and whose saved folder reloads and
passes the mode-compliance check, and the skip on rerun.

`make_run` / `sft_records` are reused by tests/integration/test_anneal_distributed.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from r4b_core.config import RunConfig, SyntheticDataConfig, TinyModelConfig


def sft_records(out_dir: Path, n: int, seed: int = 0, both_modes: bool = True) -> Path:
    """A curated bi-mode JSONL built from `n` synthetic items (every item has a trace).

    both_modes: each item appears twice, with its thinking and with its direct target, so the
    forced prefix and not the question decides the mode (what the compliance check measures on an
    overfit set). Otherwise items alternate thinking / direct.
    """
    from r4b_core.data.schema import read_jsonl, write_jsonl
    from r4b_core.data.synthetic import generate_split

    raw = generate_split("train", n, SyntheticDataConfig(seed=seed), out_dir)
    out = []
    for i, r in enumerate(read_jsonl(raw).records):
        if both_modes:
            out.append(r.model_copy(update={"id": r.id + "-t", "label": "reasoning"}))
            out.append(r.model_copy(update={"id": r.id + "-d", "label": "direct"}))
        else:
            out.append(r.model_copy(update={"label": "reasoning" if i % 2 == 0 else "direct"}))
    path = out_dir / "sft.jsonl"
    write_jsonl(path, out)
    return path


def tiny_model(out_dir: Path, data: Path) -> Path:
    from r4b_core.data.schema import read_jsonl
    from r4b_core.models.tiny import build_tiny_vlm

    recs = read_jsonl(data).records
    texts = [r.question for r in recs] + [r.reasoning or "" for r in recs] + [r.answer for r in recs]
    return build_tiny_vlm(TinyModelConfig(), texts, out_dir, seed=0)


def make_run(root: Path, n_records: int = 24, **anneal) -> tuple[RunConfig, Path, Path, Path]:
    """(cfg, train JSONL, base model folder, output URI) for a tiny anneal under `root`."""
    data = sft_records(root / "data", n_records)
    base = root / "base"
    if not base.exists():
        tiny_model(base, data)
    overrides = {"steps": 30, "pack_length": 256, "micro_batch_size": 2, "log_every": 1,
                 "checkpoint_every": 1000, "compliance_samples": 0,
                 "optim": {"lr": 3e-3, "min_lr": 3e-4, "vision_lr": 3e-3, "projector_lr": 3e-3, "warmup_steps": 3}}
    for k, v in anneal.items():
        if isinstance(v, dict):
            overrides.setdefault(k, {}).update(v)
        else:
            overrides[k] = v
    cfg = RunConfig.model_validate({"name": "t", "storage": {"root": str(root / "runs")}, "anneal": overrides})
    return cfg, data, base, root / "runs" / "t" / "anneal" / "model"


# -- LR schedule and parameter groups ---------------------------------------------------------
def test_cosine_schedule_values():
    from r4b_core.training.optim import cosine_lr

    lr = [cosine_lr(s, 110, 10, 4e-5, 4e-6) for s in range(110)]
    assert lr[0] == pytest.approx(4e-6) and lr[4] == pytest.approx(2e-5)   # linear warm-up
    assert lr[9] == pytest.approx(4e-5)                                     # peak at the last warm-up step
    assert lr[10] == pytest.approx(4e-5)                                    # cosine starts at the peak
    assert lr[-1] == pytest.approx(4e-6)                                    # ... and ends at the floor
    mid = 10 + (110 - 10 - 1) / 2
    assert cosine_lr(mid, 110, 10, 4e-5, 4e-6) == pytest.approx((4e-5 + 4e-6) / 2)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))                   # monotone decay
    assert cosine_lr(500, 110, 10, 4e-5, 4e-6) == pytest.approx(4e-6)      # past the end: floor
    assert cosine_lr(0, 5, 0, 1.0, 0.0) == pytest.approx(1.0)              # no warm-up


def test_param_groups_give_vision_projector_llm_their_own_lr(tmp_path):
    import torch

    from r4b_core.config import OptimConfig
    from r4b_core.models.loading import load_model
    from r4b_core.training.optim import cosine_lr, cosine_scheduler, lr_by_group, param_groups

    data = sft_records(tmp_path / "data", 2, both_modes=False)
    model, _ = load_model(tiny_model(tmp_path / "base", data))
    # the paper's numbers: LLM 4e-5 -> 4e-6, vision tower and projector 4e-6
    ocfg = OptimConfig(lr=4e-5, min_lr=4e-6, vision_lr=4e-6, projector_lr=4e-6, warmup_steps=2, weight_decay=0.1)
    groups = param_groups(model, ocfg)
    names = [g["name"] for g in groups]
    assert names == ["vision", "vision_no_decay", "projector", "projector_no_decay", "llm", "llm_no_decay"]
    by_id = {id(p): g["name"] for g in groups for p in g["params"]}
    assert len(by_id) == sum(1 for _ in model.parameters())                  # every parameter exactly once
    for name, p in model.named_parameters():
        comp = by_id[id(p)].removesuffix("_no_decay")
        expected = ("vision" if "vision_tower" in name else "projector" if "multi_modal_projector" in name else "llm")
        assert comp == expected, name
        assert by_id[id(p)].endswith("_no_decay") == (p.ndim < 2), name
    assert {g["name"]: g["weight_decay"] for g in groups}["llm"] == 0.1
    assert {g["name"]: g["weight_decay"] for g in groups}["llm_no_decay"] == 0.0
    opt = torch.optim.AdamW(groups)
    sched = cosine_scheduler(opt, total_steps=10, warmup_steps=2)
    seen = []
    for step in range(10):
        seen.append(lr_by_group(opt))
        opt.step()
        sched.step()
    for step, lrs in enumerate(seen):
        assert lrs["llm"] == pytest.approx(cosine_lr(step, 10, 2, 4e-5, 4e-6))
        assert lrs["vision"] == pytest.approx(cosine_lr(step, 10, 2, 4e-6, 4e-6))
        assert lrs["projector"] == lrs["vision"]
    assert seen[5]["vision"] == pytest.approx(4e-6)   # floor = min(min_lr, peak): constant after warm-up
    assert seen[-1]["llm"] == pytest.approx(4e-6)
    # vision_lr None = same as the LLM
    same = param_groups(model, OptimConfig(lr=1e-3, min_lr=1e-4, vision_lr=None, projector_lr=None))
    assert {g["lr"] for g in same} == {1e-3}


# -- a short real run ------------------------------------------------------------------------
def test_tiny_anneal_learns_reloads_passes_compliance_and_skips_on_rerun(tmp_path, one_torch_thread, capsys):
    import time

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from r4b_core.anneal import run_anneal

    cfg, data, base, out = make_run(tmp_path, steps=160, log_every=20, compliance_samples=32,
                                    compliance_from="train")
    manifest = run_anneal(cfg, str(data), str(base), str(out))
    curve = [h["loss"] for h in manifest["loss_curve"]]
    assert len(curve) == 160
    assert sum(curve[-10:]) / 10 < 0.3 * sum(curve[:5]) / 5, curve[::20]
    assert manifest["metrics"]["loss_think"] < 1.0 and manifest["metrics"]["loss_direct"] < 1.0
    assert manifest["data"]["think"] == manifest["data"]["direct"] == 24
    assert manifest["data"]["reasoning_ratio"] == 0.5
    # the published folder reloads with plain transformers
    model = LlavaForConditionalGeneration.from_pretrained(out)
    AutoProcessor.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) > 100_000
    # forced think / no-think prefixes give well-formed outputs on the overfit set
    comp = manifest["compliance"]
    assert comp["samples"] == 24
    assert comp["think"] >= 0.95 and comp["no_think"] >= 0.95, comp
    printed = capsys.readouterr().out
    assert "step 160/160" in printed and "mode compliance: think" in printed
    assert manifest["metrics"]["segment_attention"] is True and "time split (s): data" in printed
    assert "r4b_segments" not in (out / "config.json").read_text()  # a training-time setting only
    assert json.loads((out / "manifest.json").read_text())["config_hash"] == manifest["config_hash"]
    # rerun with the same config: skipped in seconds from the manifest
    t0 = time.time()
    again = run_anneal(cfg, str(data), str(base), str(out))
    assert again["skipped"] is True and again["config_hash"] == manifest["config_hash"]
    assert time.time() - t0 < 5


def test_attention_path_and_row_padding_leave_the_loss_curve_unchanged(tmp_path, one_torch_thread, capsys):
    """Segment attention + rows padded to the longest (the default) trains exactly what the 4D mask
    + rows of pack_length did; the manifest says where the time went."""
    from r4b_core.anneal import PHASES, run_anneal

    runs = {}
    for name, extra in (("auto", {}), ("mask", {"attention": "mask", "pad_to": "pack_length"})):
        cfg, data, base, _ = make_run(tmp_path, steps=6, **extra)
        runs[name] = run_anneal(cfg, str(data), str(base), str(tmp_path / name / "model"))
    printed = capsys.readouterr().out
    assert "attention: per-sample SDPA (token losses within" in printed and "3 samples in 2 rows" in printed
    assert "attention: 4D block mask (anneal.attention=mask)" in printed
    auto, mask = runs["auto"], runs["mask"]
    assert auto["metrics"]["segment_attention"] is True and mask["metrics"]["segment_attention"] is False
    assert (auto["metrics"]["attention"], mask["metrics"]["attention"]) == ("r4b_segments", "mask")  # CPU: per-sample SDPA
    assert auto["config_hash"] == mask["config_hash"]  # neither knob changes what is trained
    for a, b in zip(auto["loss_curve"], mask["loss_curve"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a, b)
    assert auto["metrics"]["padding_waste"] == 0 < mask["metrics"]["padding_waste"]  # packed rows end to end, no pad
    for m in (auto, mask):
        met = m["metrics"]
        for key in ("time_split_s", "time_split_cpu_s"):
            assert list(met[key]) == list(PHASES) and min(met[key].values()) >= 0
            assert met[key]["forward"] > 0 and met[key]["backward"] > 0
        assert sum(met["time_split_s"].values()) <= met["train_s"] + 0.05
        assert sum(met["time_split_cpu_s"].values()) <= met["train_cpu_s"] + 0.05


def test_anneal_step_alone_is_the_token_mean_loss_and_accumulation_changes_nothing(tmp_path, one_torch_thread):
    """One SFT step without the stage around it: its loss is the token mean of the cross entropy
    over every target token of the step's rows (computed here with the 4D mask, before the update),
    and the same rows as two accumulated micro-batches give the same loss, gradient and weights."""
    import torch

    from r4b_core.anneal import _Console, anneal_step, prepare_data, setup_trainer, token_losses
    from r4b_core.models.loading import load_model
    from r4b_core.storage import Store
    from r4b_core.training.distributed import DistEnv
    from r4b_core.training.packing import collate

    after = {}
    for accum, micro in ((1, 4), (2, 2)):
        cfg, data, base, _ = make_run(tmp_path, steps=2, grad_accum=accum, micro_batch_size=micro, attention="mask")
        torch.manual_seed(0)
        model, processor = load_model(str(base), cfg.model, dtype=torch.float32)
        model.train()
        samples, _, _ = prepare_data(cfg, Store.from_config(cfg.storage), str(data), model, processor, tmp_path / "cache")
        trainer, _ = setup_trainer(cfg.anneal, model, samples, processor.tokenizer.pad_token_id,
                                   DistEnv(device=torch.device("cpu")), _Console(False))
        rows = [[0, 1], [2], [3, 4], [5]]
        with torch.no_grad():
            ce, mask, _ = token_losses(model, collate([[samples[i] for i in r] for r in rows], trainer.pad_id),
                                       trainer.device)
        metrics, totals = anneal_step(trainer, rows)
        assert metrics["loss"] == pytest.approx(float((ce * mask).sum() / mask.sum()), rel=1e-5)
        assert totals.n_think + totals.n_direct == sum(samples[i].n_target for r in rows for i in r)
        assert metrics["grad_norm"] > 0 and 0 <= metrics["padding_waste"] < 1
        after[accum] = (metrics["loss"], metrics["grad_norm"], [p.detach().clone() for p in model.parameters()])
    assert after[1][0] == pytest.approx(after[2][0], rel=1e-6)
    assert after[1][1] == pytest.approx(after[2][1], rel=1e-4)  # the gradient, before Adam normalizes it
    for one, two in zip(after[1][2], after[2][2], strict=True):
        # within 1 % of Adam's first step (about lr = 1e-3 an element): where a gradient element is
        # near Adam's eps, its normalized update magnifies float rounding of the summation order
        torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-5)


def _write_bad_data(path: Path, good: Path) -> None:
    """The good records plus: a broken JSON line, an empty answer, a missing image, an overlong trace."""
    lines = good.read_text().splitlines()
    first = json.loads(lines[0])
    lines.append("{not json")
    lines.append(json.dumps({**first, "id": "empty", "answer": "  "}))
    lines.append(json.dumps({**first, "id": "noimg", "images": ["images/does-not-exist.png"]}))
    lines.append(json.dumps({**first, "id": "long", "label": "reasoning", "reasoning": "1 + 1 = 2\n" * 80}))
    path.write_text("\n".join(lines) + "\n")


def test_bad_records_are_counted_and_skipped_never_crash_the_loop(tmp_path, one_torch_thread, capsys):
    from r4b_core.anneal import run_anneal

    cfg, data, base, out = make_run(tmp_path, n_records=4, steps=3)
    bad = data.parent / "bad.jsonl"
    _write_bad_data(bad, data)
    manifest = run_anneal(cfg, str(bad), str(base), str(out))
    d = manifest["data"]
    assert (d["records"], d["bad_lines"], d["empty_answers"], d["missing_images"], d["overlong_skipped"]) == (12, 1, 1, 1, 1)
    assert d["used"] == 8 and d["skipped"] == 4 and d["overlong_truncated"] == 0
    problems = "\n".join(d["problems"])
    assert "bad.jsonl:9: (line): not valid JSON" in problems
    assert "bad.jsonl:10: answer: answer is empty" in problems
    assert "record noimg" in problems and "does-not-exist.png" in problems
    assert "record long" in problems and "> anneal.pack_length 256" in problems
    assert manifest["steps"] == 3 and len(manifest["loss_curve"]) == 3
    assert "record long" in capsys.readouterr().out  # the log says it too


def test_overlong_truncate_keeps_the_record_and_counts_it(tmp_path):
    from r4b_core.anneal import prepare_data
    from r4b_core.models.loading import load_model
    from r4b_core.storage import Store

    cfg, data, base, _ = make_run(tmp_path, n_records=2, overlong="truncate")
    bad = data.parent / "bad.jsonl"
    _write_bad_data(bad, data)
    model, processor = load_model(base)
    samples, _, report = prepare_data(cfg, Store.from_config(cfg.storage), str(bad), model, processor, tmp_path / "cache")
    assert report.overlong_truncated == 1 and report.overlong_skipped == 0 and report.used == 5
    long = next(s for s in samples if s.meta["id"] == "long")
    assert len(long) == cfg.anneal.pack_length and long.meta["truncated"]


def test_only_bad_records_is_one_clear_error(tmp_path):
    from r4b_core.anneal import AnnealError, run_anneal

    cfg, data, base, out = make_run(tmp_path, n_records=2)
    bad = data.parent / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(AnnealError, match=r"bad.jsonl: no usable training records \(1 skipped: .*bad.jsonl:1"):
        run_anneal(cfg, str(bad), str(base), str(out))
    with pytest.raises(AnnealError, match="training data not found; run `r4b curate` first"):
        run_anneal(cfg, str(data.parent / "nope.jsonl"), str(base), str(out))


def test_checkpoint_from_another_config_is_refused_naming_the_values(tmp_path, one_torch_thread):
    from r4b_core.anneal import AnnealError, run_anneal

    cfg, data, base, out = make_run(tmp_path, n_records=4, steps=4, checkpoint_every=2)
    first = run_anneal(cfg, str(data), str(base), str(out))
    ckpts = out.parent / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000002"]
    assert (ckpts / "step-000002" / "_COMPLETE").exists()
    changed = cfg.model_copy(deep=True)
    changed.anneal.optim.lr = 1e-3
    changed.anneal.steps = 6
    with pytest.raises(AnnealError, match=r"anneal\.optim\.lr: 0\.003 \(checkpoint\) -> 0\.001 \(now\).*anneal\.resume=force"):
        run_anneal(changed, str(data), str(base), str(out))
    changed.anneal.resume = "force"
    resumed = run_anneal(changed, str(data), str(base), str(out))
    assert resumed["resumed_from_step"] == 2 and resumed["steps_this_run"] == 4
    # steps 1-2 come from the checkpoint's history, identical to the first run's
    assert resumed["loss_curve"][:2] == first["loss_curve"][:2]


def test_damaged_latest_checkpoint_is_set_aside_and_the_rerun_resumes_from_the_one_before(tmp_path, one_torch_thread,
                                                                                          capsys):
    """A run that died after its step-3 checkpoint, whose step-3 model.safetensors came out empty:
    the rerun says so in one line, keeps the folder aside and ends as the uninterrupted run did."""
    from r4b_core.anneal import run_anneal

    cfg, data, base, out = make_run(tmp_path, n_records=4, steps=4, checkpoint_every=1, keep_checkpoints=3)
    first = run_anneal(cfg, str(data), str(base), str(out))
    ckpts = out.parent / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-000001", "step-000002", "step-000003"]
    (out / "manifest.json").unlink()          # died before committing
    (ckpts / "step-000003" / "model.safetensors").write_bytes(b"")
    capsys.readouterr()
    again = run_anneal(cfg, str(data), str(base), str(out))
    said = [line for line in capsys.readouterr().out.splitlines() if "unreadable" in line]
    assert len(said) == 1 and f"checkpoint {ckpts}/step-000003 is unreadable (model.safetensors: " in said[0]
    assert again["resumed_from_step"] == 2 and again["steps_this_run"] == 2
    assert [h["loss"] for h in again["loss_curve"]] == pytest.approx([h["loss"] for h in first["loss_curve"]],
                                                                      rel=1e-4)
    assert any(p.name.startswith("step-000003.unreadable-") for p in ckpts.iterdir())


def test_rerun_that_fails_at_start_up_keeps_the_finished_model_and_its_manifest(tmp_path, one_torch_thread):
    """A finished anneal, then a rerun under another config that fails before training (every
    record longer than the new pack_length): the finished stage is still complete for its config."""
    from r4b_core.anneal import AnnealError, run_anneal
    from r4b_core.storage import Store

    cfg, data, base, out = make_run(tmp_path, n_records=4, steps=2)
    finished = run_anneal(cfg, str(data), str(base), str(out))
    weights = (out / "model.safetensors").read_bytes()
    broken = cfg.model_copy(deep=True)
    broken.anneal.pack_length = 32
    with pytest.raises(AnnealError, match="no usable training records"):
        run_anneal(broken, str(data), str(base), str(out))
    assert Store().is_complete(str(out), finished["config_hash"])
    assert (out / "model.safetensors").read_bytes() == weights
