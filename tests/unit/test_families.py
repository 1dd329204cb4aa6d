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
