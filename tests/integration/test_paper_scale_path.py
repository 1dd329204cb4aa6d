"""The paper-scale composition, end to end on CPU: configs/r4b-4b.yaml as it is (a base composed
from `model.vision_tower` + `model.language_model` in R-4B's layout, user JSONL data, an external
annotator, DeepSpeed and PyTorchJob settings), with the towers replaced by tiny random models of the
same classes (SigLIP, Qwen3) saved locally and what needs a cluster turned local: prepare -> curate
-> anneal -> BPO on the vLLM sidecar (as the config asks: vLLM's R-4B model serves the composed
layout, every weight push verified) -> eval -> register -> `r4b serve` of the champion answering one image request per thinking mode
through the openai client, with the composed LM's own chat template (a Qwen3-style one, text only)
and `thinking_mode` added; each stage on its defaults (layout), as `r4b <stage>` runs them one by
one. Two vLLM starts (the sidecar, the served model; ~1-2 min each on 2 cores).

The break this guards: `layout.base_model_dir` named `<run>/base_model` for every non-tiny base, a
folder prepare never wrote, so anneal could not start at paper scale.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from servers import ask_each_thinking_mode, r4b_serve, serve_config

REPO = Path(__file__).resolve().parents[2]

# What a CPU without a cluster changes; every other value is configs/r4b-4b.yaml's.
LOCAL = [
    "launcher.kind=local", "tracking.uri=null", "model.dtype=float32",
    "curate.engine=hf", "curate.num_samples=2", "curate.max_new_tokens=4", "curate.batch_size=16",
    "anneal.steps=2", "anneal.pack_length=256", "anneal.grad_accum=1", "anneal.micro_batch_size=2",
    "anneal.optim.warmup_steps=1", "anneal.checkpoint_every=1", "anneal.compliance_samples=0",
    "anneal.distributed.deepspeed=none", "anneal.distributed.nproc_per_node=1", "anneal.distributed.nnodes=1",
    "anneal.distributed.backend=auto",
    "bpo.steps=1", "bpo.prompts_per_step=2", "bpo.group_size=2", "bpo.micro_batch_size=8",
    "bpo.max_new_tokens_think=6", "bpo.max_new_tokens_no_think=4", "bpo.probe_size=2", "bpo.sync_tolerance=1e-4",
    # a random model's rewards are all 0: keep its groups and let weight decay move every weight, so
    # the step's update is pushed and verified
    "bpo.drop_zero_variance=false", "bpo.optim.lr=0.1", "bpo.optim.weight_decay=1.0",
    "bpo.distributed.deepspeed=none", "bpo.distributed.nproc_per_node=1", "bpo.distributed.nnodes=1",
    "bpo.distributed.backend=auto",
    "eval.engine=hf", "eval.max_new_tokens=6", "eval.limit=4", "eval.batch_size=8",
    # the sidecar of this checkout on CPU (the config's are a GPU image's)
    "vllm.python=.venv-vllm/bin/python", "vllm.enforce_eager=true", "vllm.kv_cache_gib=1",
    "vllm.startup_timeout_s=240", "vllm.max_num_batched_tokens=65536",
]


@pytest.fixture(scope="module")
def towers(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny SigLIP vision tower and a tiny Qwen3 LM with a ChatML + think-tag tokenizer and a
    Qwen3-style chat template, saved like hub checkpoints (the classes of
    google/siglip2-so400m-patch14-384 and Qwen/Qwen3-4B)."""
    import torch
    from families import QWEN3_TEXT_TEMPLATE
    from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from r4b_core.config import SyntheticDataConfig
    from r4b_core.data.synthetic import draw_split, tokenizer_corpus
    from r4b_core.models.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8)
                      ).save_pretrained(root / "vision")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "vision")
    items = draw_split("train", 200, SyntheticDataConfig())
    tok = train_tokenizer(tokenizer_corpus([{"question": i.question, "answer": i.answer, "reasoning": i.reasoning}
                                            for i in items]), 400)
    tok.chat_template = QWEN3_TEXT_TEMPLATE
    Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                 max_position_embeddings=2048)).save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return root / "vision", root / "lm"


@pytest.mark.vllm
def test_composed_base_runs_every_stage_and_is_served(towers, tmp_path, one_torch_thread, capsys):
    from families import QWEN3_TEXT_TEMPLATE
    from transformers import AutoProcessor

    from r4b_core import layout
    from r4b_core.anneal import run_anneal
    from r4b_core.bpo import run_bpo
    from r4b_core.config import SyntheticDataConfig, load_config
    from r4b_core.curate import run_curate
    from r4b_core.data.schema import read_jsonl
    from r4b_core.data.synthetic import generate_all
    from r4b_core.evaluate import run_eval
    from r4b_core.models.tokenizer import THINKING_BASE_OPEN, served_chat_template
    from r4b_core.prepare import run_prepare
    from r4b_core.promote import register_and_gate
    from r4b_core.storage import Store
    from r4b_core.tracking import tracking_uri

    vision, lm = towers
    splits = generate_all(SyntheticDataConfig(train_size=12, rl_size=4, eval_size=4, difficulties=[1]),
                          tmp_path / "data", image_size=64, patch_size=16)
    paper = load_config(REPO / "configs" / "r4b-4b.yaml")
    assert paper.model.base == "llava-onevision" and paper.data.source == "jsonl"
    cfg = load_config(REPO / "configs" / "r4b-4b.yaml", [
        *LOCAL, f"storage.root={tmp_path / 'runs'}", f"model.vision_tower={vision}", f"model.language_model={lm}",
        f"data.train_uri={splits['train']}", f"data.rl_uri={splits['rl']}", f"data.eval_uri={splits['eval']}",
        "curate.annotator=base"])
    store = Store.from_config(cfg.storage)

    out = run_prepare(cfg)
    base = layout.base_model_dir(cfg)
    assert out["base_model"] == base == layout.init_model_dir(cfg)
    assert store.read_manifest(base)["kind"] == "composed"            # composed once, saved once
    assert store.exists(base + "/model.safetensors")

    curated = run_curate(cfg, layout.split_uri(cfg, "train"), layout.curated_uri(cfg))
    assert curated["counts"]["kept"] > 0
    annealed = run_anneal(cfg)                                          # every input from the layout
    assert annealed["inputs"]["base_model"] == base and annealed["steps"] == 2
    init = layout.model_dir(cfg, "anneal")
    trained = run_bpo(cfg, layout.split_uri(cfg, "rl"), init, layout.model_dir(cfg, "bpo"))
    assert trained["counts"]["steps"] == 1
    # the composed checkpoint is served by vLLM's R-4B model; the initial push and the step's push
    # were verified: the sidecar's probe logprobs within 1e-4 of the trainer's
    out = capsys.readouterr().out
    sidecar = re.search(r"vLLM sidecar pid \d+ at \S+ \(up in \d+ s, log (\S+)\)", out)
    assert sidecar, "BPO did not start its vLLM sidecar"
    assert re.search(r"serves policy version 0 \(full push .*, reload in place\)", out), out
    assert "Resolved architecture: RForConditionalGeneration" in Path(sidecar.group(1)).read_text(errors="replace")
    assert trained["verified_versions"] == [0, 1]
    bpo_dir = layout.model_dir(cfg, "bpo")
    report = run_eval(cfg, bpo_dir, layout.split_uri(cfg, "eval"), layout.eval_dir(cfg, "bpo"), "bpo")
    assert set(report["modes"]) == {"auto", "think", "no_think"}

    # register, then `r4b serve` of the champion: the LM's own template with thinking_mode added
    decision = register_and_gate(cfg, bpo_dir, layout.eval_dir(cfg, "bpo") + "/report.json")
    assert decision["promoted"], decision
    assert THINKING_BASE_OPEN + AutoProcessor.from_pretrained(bpo_dir).chat_template in served_chat_template(bpo_dir)
    assert QWEN3_TEXT_TEMPLATE in served_chat_template(bpo_dir)
    record = read_jsonl(Path(splits["eval"])).records[0]
    serving = serve_config(tmp_path, tmp_path / "runs", tracking_uri(cfg), cfg.tracking.registered_model)
    with r4b_serve(serving, f"models:/{cfg.tracking.registered_model}@champion", tmp_path / "serve.log") as (_, url, _):
        assert "Resolved architecture: RForConditionalGeneration" in (tmp_path / "serve.log").read_text(errors="replace")
        answers = ask_each_thinking_mode(url, bpo_dir, Path(splits["eval"]).parent / record.images[0], record.question)
    for mode, data in answers.items():
        message, usage = data["choices"][0]["message"], data["usage"]
        print(f"served {mode}: reasoning {message.get('reasoning_content')!r}, answer {message.get('content')!r}, "
              f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens")
    # a rerun of prepare finds the composed base done (its manifest matches) and keeps it
    committed = store.read_manifest(base)["committed_at"]
    run_prepare(cfg)
    assert store.read_manifest(base)["committed_at"] == committed
