"""Every VLM family (tests/families.py: tiny random Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, R-4B's layout,
SmolVLM, Gemma3) through the platform's model code: parameter roles for learning-rate groups, save in
transformers' layout and load back with the same outputs, `<think>` / `</think>` added where the
vocabulary lacks them, prompts in the family's own chat format, and HF rollouts whose logprobs
equal a teacher-forced forward (M-RoPE positions included) while batching leaves greedy output alone."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from families import FAMILIES, build_family, build_family_model
from r4b_core import modes
from r4b_core.modes import Mode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory, one_torch_thread):
    """(name, saved folder, loaded model, processor) of one family."""
    from r4b_core.models.loading import load_model

    path = build_family(request.param, tmp_path_factory.mktemp(request.param) / "model")
    model, processor = load_model(str(path))
    return request.param, path, model, processor


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    colours = [(200, 30, 30), (10, 200, 10), (0, 0, 250), (240, 240, 0)]
    return [Image.new("RGB", (64, 64), colours[(seed + i) % len(colours)]) for i in range(n)]


def test_parameter_roles_cover_vision_projector_and_language_model():
    from r4b_core.training.optim import component_of

    expected_projector = {"qwen2_5_vl": ("visual.merger.",), "smolvlm": ("connector.",),
                          "qwen3_vl": ("visual.merger.", "visual.deepstack_merger_list."),
                          "llava_onevision": ("multi_modal_projector.", "image_newline"),
                          "rvl": ("multi_modal_projector.", "image_newline"),
                          "gemma3": ("multi_modal_projector.",)}
    for name in FAMILIES:
        model, _ = build_family_model(name)
        roles: dict[str, list[str]] = {}
        for param_name, _ in model.named_parameters():
            roles.setdefault(component_of(param_name), []).append(param_name)
        assert set(roles) == {"vision", "projector", "llm"}, (name, set(roles))
        assert all(any(m in p for m in expected_projector[name]) for p in roles["projector"]), name
        assert not any("merger" in p or "connector" in p for p in roles["vision"]), name
        assert not any("visual" in p or "vision" in p for p in roles["llm"]), name


def test_save_load_round_trip_and_think_tokens(family):
    from r4b_core.models.loading import saved_state_dict

    name, path, model, processor = family
    fresh, _ = build_family_model(name)               # the same seed: the weights that were saved
    assert type(model) is type(fresh)                  # the class the saved config names (rvl: r4b's own)
    tok = processor.tokenizer
    think_ids = tok.convert_tokens_to_ids([modes.THINK_OPEN, modes.THINK_CLOSE])
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in (modes.THINK_OPEN, modes.THINK_CLOSE))
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] >= len(tok)
    if name not in ("qwen3_vl", "rvl"):                # added here: rows start at the mean of the old ones
        assert torch.allclose(emb[think_ids[0]], emb[:min(think_ids)].mean(0), atol=1e-6)
    fresh_state = fresh.state_dict()
    for key, value in model.state_dict().items():
        if value.shape == fresh_state[key].shape:
            assert torch.equal(value, fresh_state[key]), (name, key)
    # the saved layout is what save_pretrained writes, and it loads back without missing keys
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        on_disk = set(f.keys())
    assert on_disk == set(saved_state_dict(fresh))


def test_prompt_in_the_family_chat_format(family):
    from r4b_core.models.chat import ChatFormat

    name, _, model, processor = family
    fmt = ChatFormat.of(processor, model.generation_config)
    prompt = fmt.prompt("What is 7 + 5?", num_images=2, mode=Mode.NO_THINK)
    assert prompt.endswith(modes.generation_prefix(Mode.NO_THINK))
    assert fmt.count_images(prompt) == 2
    assert fmt.prompt("q", 0, mode=None) + "x" + fmt.end_of_turn in processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "q"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "x"}]}], tokenize=False)
    eos = model.generation_config.eos_token_id
    assert processor.tokenizer.convert_tokens_to_ids(fmt.end_of_turn) in (eos if isinstance(eos, list) else [eos])
    expected_turn_end = {"smolvlm": "<end_of_utterance>", "gemma3": "<end_of_turn>"}.get(name, "<|im_end|>")
    assert fmt.end_of_turn == expected_turn_end


def test_hf_rollouts_match_teacher_forcing(family):
    """Sampled rollouts of prompts with 0, 1 and 2 images in one batch: each logprob equals the
    teacher-forced forward within 1e-4, and greedy output does not depend on the batch."""
    from r4b_core.models.chat import ChatFormat
    from r4b_core.rollout.base import GenerationRequest
    from r4b_core.rollout.hf import HFEngine, teacher_forced_logprobs

    name, _, model, processor = family
    fmt = ChatFormat.of(processor, model.generation_config)
    specs = [("What is 12 + 30?", 1, Mode.THINK), ("Which colour is larger?", 2, Mode.NO_THINK),
             ("Add 3 and 4", 0 if name != "gemma3" else 1, Mode.AUTO)]
    reqs = [GenerationRequest(prompt=fmt.prompt(q, n, m), images=_images(n, i), mode=m, n=2, temperature=1.0,
                              max_new_tokens=6, seed=i, key=f"r{i}") for i, (q, n, m) in enumerate(specs)]
    engine = HFEngine(model, processor)
    outs = engine.generate(reqs)
    assert len(outs) == 6
    for out in outs:
        req = reqs[int(out.key[1:])]
        assert not set(out.token_ids) & set(engine.suppress_ids)
        tf = teacher_forced_logprobs(model, processor, req.prompt, req.images, out.token_ids)
        assert max(abs(a - b) for a, b in zip(tf, out.logprobs)) < 1e-4, (name, out.key)
    greedy = [GenerationRequest(prompt=r.prompt, images=r.images, mode=r.mode, max_new_tokens=6, key=r.key)
              for r in reqs]
    together = engine.generate(greedy)
    alone = [engine.generate([r])[0] for r in greedy]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_served_template_is_the_family_template_with_thinking_mode(family):
    """`r4b serve` and the sidecar serve the model's own template with `thinking_mode` added: each
    serving mode renders exactly the training prompt of its mode, and a folder saved with the
    served template still yields the same prompts (the base is read back out)."""
    from r4b_core.models.chat import ChatFormat
    from r4b_core.models.tokenizer import served_chat_template

    name, path, model, processor = family
    fmt = ChatFormat.of(processor, model.generation_config)
    served = served_chat_template(path)
    assert served != fmt.template and fmt.template in served
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is 7 + 5?"}]}]
    for serving_name, mode in modes.SERVING_MODE_NAMES.items():
        text = processor.tokenizer.apply_chat_template(messages, chat_template=served, tokenize=False,
                                                       add_generation_prompt=True, thinking_mode=serving_name)
        assert text == fmt.prompt("What is 7 + 5?", 1, mode), (name, serving_name)
    with pytest.raises(Exception, match="unknown thinking_mode"):
        processor.tokenizer.apply_chat_template(messages, chat_template=served, tokenize=False,
                                                add_generation_prompt=True, thinking_mode="medium")
    import copy

    wrapped = copy.copy(processor)
    wrapped.chat_template = served
    assert ChatFormat.of(wrapped, model.generation_config) == fmt


# The real-scale configs and the class their hub model's config.json names.
REAL_SCALE = [("qwen2.5-vl-3b.yaml", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
              ("qwen2.5-vl-7b.yaml", "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
              ("qwen3-vl-4b.yaml", "qwen3_vl", "Qwen3VLForConditionalGeneration")]


@pytest.mark.parametrize("config_name, family, architecture", REAL_SCALE)
def test_real_scale_config_loads_a_tiny_instance_of_its_class(config_name, family, architecture, repo_root,
                                                              tmp_path, monkeypatch):
    """Offline, a real-scale config validates, its hub id fails in one line naming it, and the same
    load path (the config's model section, bfloat16, no composition) takes a tiny instance of the
    class the hub model's config names."""
    import re

    from r4b_core import layout
    from r4b_core.config import load_config
    from r4b_core.models.loading import ModelLoadError, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    path = repo_root / "configs" / config_name
    assert path.read_text().startswith(f"# r4b pipeline submit --config configs/{config_name}")
    cfg = load_config(path)
    with pytest.raises(ModelLoadError, match=re.escape(cfg.model.base) + ".*hub is unreachable"):
        load_model(cfg.model.base, cfg.model)
    folder = build_family(family, tmp_path / "model")
    local = load_config(path, [f"model.base={folder}"])
    assert layout.base_model_dir(local) == str(folder)            # read where it is, never composed
    model, processor = load_model(local.model.base, local.model)
    assert type(model).__name__ == architecture and model.dtype == torch.bfloat16
    tok = processor.tokenizer
    assert all(len(tok.encode(t, add_special_tokens=False)) == 1 for t in (modes.THINK_OPEN, modes.THINK_CLOSE))


# -- the training stages' pieces, per family ---------------------------------------------------------
def _records(n: int):
    """Records with 1, 2 and 0 images (Gemma3's processor needs an image per prompt: 1, 2, 1)."""
    from r4b_core.data.schema import Record

    out = []
    for i in range(n):
        k = [1, 2, 0][i % 3]
        out.append(Record(id=f"r{i}", question=f"What is {i} + 5?", answer=str(i + 5),
                          images=[f"img{j}.png" for j in range(k)], label="reasoning" if i % 2 else "direct",
                          reasoning="Step 1: read the numbers.\n7 * 5 = 35" if i % 2 else None))
    return out


def _family_images(name: str, record, i: int) -> list[Image.Image]:
    n = len(record.images) or (1 if name == "gemma3" else 0)
    return [Image.new("RGB", (64, 64 + 32 * j), ((60 * i) % 255, 200, 40 * j)) for j in range(n)]


def test_packed_samples_train_as_each_alone_with_every_processor_tensor(family):
    """SFT samples with 0-2 images carry the processor's tensors (image_grid_thw, image_sizes,
    pixel_attention_mask, token_type_ids, ...) and, for M-RoPE families, the model's own 3-D
    positions; packed rows give each sample's token losses as that sample alone. Gemma3's image
    tokens attend both ways and its layers have sliding windows, so it trains one sample per row."""
    from r4b_core.anneal import choose_attention, encode, token_losses
    from r4b_core.training.packing import collate

    name, _, model, processor = family
    samples = []
    for i, rec in enumerate(_records(6)):
        rec = rec.model_copy(update={"images": [f"img{j}.png" for j in range(len(_family_images(name, rec, i)))]})
        samples.append(encode(rec, _family_images(name, rec, i), model, processor, 256, "skip"))
    with_images = [s for s in samples if s.has_images]
    assert any("pixel_values" in s.media for s in with_images)
    expected = {"qwen2_5_vl": {"image_grid_thw"}, "qwen3_vl": {"image_grid_thw"}, "smolvlm": {"pixel_attention_mask"},
                "llava_onevision": {"image_sizes"}, "rvl": {"image_sizes"}, "gemma3": set()}[name]
    assert expected <= set(with_images[0].media), (name, list(with_images[0].media))
    mrope = name.startswith("qwen")
    assert all((s.positions is not None) == mrope for s in samples)
    if mrope:      # the rope index, not 0..n-1: image tokens share positions, text continues after their largest
        s = with_images[0]
        assert s.positions.shape == (3, len(s)) and int(s.positions.max()) < len(s) - 1
    attention, impl, line = choose_attention(model, samples, processor.tokenizer.pad_token_id, 256, "cpu")
    assert attention == ("padding" if name == "gemma3" else "varlen"), line
    assert "each sample alone" in line
    rows = [[samples[0], samples[1]], [samples[2], samples[3]]]
    alone = torch.cat([token_losses(model, collate([[s]], 0, attention="padding"), "cpu")[0][0][
        torch.tensor(s.labels[1:]) != -100] for row in rows for s in row])
    from r4b_core.training.packing import use_segment_attention

    try:
        use_segment_attention(model, impl or False)
        batch = collate(rows if attention != "padding" else [[s] for r in rows for s in r],
                        processor.tokenizer.pad_token_id, attention=attention)
        with torch.no_grad():
            ce, mask, _ = token_losses(model, batch, "cpu")
    finally:
        use_segment_attention(model, False)
    assert torch.allclose(ce[mask], alone, atol=1e-4), (name, float((ce[mask] - alone).abs().max()))


def test_bpo_trainer_logprobs_equal_the_engines(family, monkeypatch):
    """BPO's trainer scores the HF engine's rollouts (prompts with 0-2 images, both forced modes)
    within 1e-4 of the engine's logprobs: prompts in the family's format through the shared-prefix
    KV cache, every processor tensor, M-RoPE positions from the model's rope index continued past
    the prefix. The check has teeth: 1-D positions (what BPO used before) miss beyond it on M-RoPE."""
    from r4b_core import bpo
    from r4b_core.config import BPOConfig
    from r4b_core.rollout import hf
    from r4b_core.rollout.hf import HFEngine

    name, _, model, processor = family
    prompts = [bpo.Prompt(r, _family_images(name, r, i)) for i, r in enumerate(_records(3))]
    prompts = [bpo.Prompt(p.record.model_copy(update={"images": [f"i{j}" for j in range(len(p.images))]}), p.images)
               for p in prompts]
    encoder = bpo.PromptEncoder(processor)
    engine = HFEngine(model, processor)
    b = BPOConfig(group_size=2, max_new_tokens_think=10, max_new_tokens_no_think=6)
    completions = engine.generate(bpo.plan_rollouts(prompts, b, 0, 0, encoder.chat))
    items = []
    for j, c in enumerate(completions):
        enc = encoder.encode(prompts[j // 4], c.mode)
        assert c.prompt_token_ids == enc.ids
        items.append(bpo.TrainItem(enc, list(c.token_ids), list(c.logprobs), 1.0, c.mode == Mode.THINK))
    mb = bpo.collate(items, list(range(len(items))), encoder.pad_id, True)

    def gap() -> float:
        with torch.no_grad():
            logp, _ = bpo.sequence_logprobs(model, mb, b.temperature, encoder.suppress)
        return float((logp - mb.rollout_logp).abs()[mb.generated_mask].max())

    assert gap() < 1e-4, name
    if name.startswith("qwen"):
        monkeypatch.setattr(hf, "rope_positions", lambda model, enc: None)
        assert gap() > 3e-4, name            # beyond the tolerance


def test_freeze_leaves_vision_and_projector_as_they_are(family):
    """`optim.freeze: [vision, projector]` (anneal and BPO): those parameters get no gradient and no
    optimizer group and keep their values through an update; the language model trains."""
    from r4b_core.config import OptimConfig
    from r4b_core.training.optim import component_of, freeze_components, param_groups

    name, _, model, _ = family
    model = __import__("copy").deepcopy(model)
    assert freeze_components(model, OptimConfig(freeze=["vision", "projector"]).freeze) > 0
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if component_of(n) in ("vision", "projector")}
    groups = param_groups(model, OptimConfig(freeze=["vision", "projector"]))
    assert {g["name"].removesuffix("_no_decay") for g in groups} == {"llm"}
    with pytest.raises(ValueError, match="nothing would be trained"):
        OptimConfig(freeze=["vision", "projector", "llm"])


def test_pixel_budget_reaches_the_processor_or_is_refused(family, tmp_path):
    """`model.min_pixels` / `model.max_pixels` resize images of dynamic-resolution processors (fewer
    image tokens for a smaller budget) and are saved with the model; a processor without a pixel
    budget refuses them in one line."""
    from r4b_core.config import ModelConfig
    from r4b_core.models.loading import ModelLoadError, load_model, save_model
    from r4b_core.models.chat import ChatFormat

    name, path, _, processor = family
    budget = ModelConfig(min_pixels=32 * 32, max_pixels=32 * 32)
    if not name.startswith("qwen"):
        with pytest.raises(ModelLoadError, match="takes no pixel budget"):
            load_model(str(path), budget)
        return
    small_model, small = load_model(str(path), budget)
    image = [Image.new("RGB", (128, 128), (200, 30, 30))]
    prompt = ChatFormat.of(processor).prompt("q", 1, Mode.THINK)

    def image_tokens(proc) -> int:
        return int((proc(text=[prompt], images=[image], return_tensors="pt")["input_ids"] == proc.image_token_id).sum())

    assert image_tokens(small) < image_tokens(processor)
    saved = save_model(small_model, small, tmp_path / "budget")
    _, reloaded = load_model(str(saved))
    assert image_tokens(reloaded) == image_tokens(small)
