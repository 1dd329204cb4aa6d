"""The tiny VLM factory, saving (safetensors, vLLM key layout, atomic) and loading: local folders,
file:// URIs, offline Hugging Face ids, and the paper-scale composition of a vision tower + LM pair
(tested with two locally saved tiny stand-ins)."""

import json

import pytest
import torch
from PIL import Image

from r4b_core import modes
from r4b_core.config import ModelConfig, TinyModelConfig
from r4b_core.modes import Mode
from r4b_core.models.tokenizer import chat_template

TEXTS = ["What is 12 + 30?", "12 + 30 = 42", "The answer is 42", "What colour is the square?", "red"] * 20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from r4b_core.models.tiny import build_tiny_vlm

    return build_tiny_vlm(TinyModelConfig(), TEXTS, tmp_path_factory.mktemp("tiny") / "model", seed=0)


def _inputs(processor, mode=Mode.THINK, colour=(200, 30, 30)):
    img = Image.new("RGB", (80, 50), colour)
    return processor(text=[modes.chat_prompt("What is 12 + 30?", 1, mode)], images=[img], return_tensors="pt")


def test_folder_is_safetensors_in_vllm_layout(tiny_dir):
    from safetensors import safe_open

    names = sorted(p.name for p in tiny_dir.iterdir())
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt")) for n in names)
    assert {"config.json", "tokenizer.json", "chat_template.jinja", "processor_config.json"} <= set(names)
    assert not list(tiny_dir.parent.glob(".model.tmp-*"))
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert all(k.startswith(("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
                             "language_model.lm_head.")) for k in keys)
    assert "language_model.lm_head.weight" in keys           # untied: the head is its own tensor
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_feature_select_strategy"] == "full" and config["image_seq_length"] == 16
    assert config["text_config"]["tie_word_embeddings"] is False
    assert (tiny_dir / "chat_template.jinja").read_text().strip() == chat_template().strip()


def test_reload_matches_saved_tensors_and_runs_an_image(tiny_dir):
    from safetensors.torch import load_file

    from r4b_core.models.loading import load_model

    model, processor = load_model(str(tiny_dir), ModelConfig())
    saved = load_file(str(tiny_dir / "model.safetensors"))
    assert torch.equal(saved["vision_tower.vision_model.embeddings.patch_embedding.weight"],
                       model.model.vision_tower.embeddings.patch_embedding.weight)
    assert torch.equal(saved["language_model.lm_head.weight"], model.lm_head.weight)
    assert torch.equal(saved["multi_modal_projector.linear_2.bias"], model.model.multi_modal_projector.linear_2.bias)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    n_params = sum(p.numel() for p in model.parameters())
    assert 300_000 < n_params < 3_000_000
    assert type(processor.image_processor).__name__ == "SiglipImageProcessor"
    enc = _inputs(processor)
    image_id = model.config.image_token_index
    assert int((enc["input_ids"] == image_id).sum()) == 16
    with torch.no_grad():
        a = model(**enc).logits
        b = model(**_inputs(processor, colour=(10, 10, 240))).logits
    assert a.shape[-1] == model.config.text_config.vocab_size
    assert not torch.allclose(a[0, -1], b[0, -1])    # the image reaches the logits


def test_seeded_build_is_reproducible(tiny_dir, tmp_path):
    from safetensors.torch import load_file

    from r4b_core.models.tiny import build_tiny_vlm

    same = build_tiny_vlm(TinyModelConfig(), TEXTS, tmp_path / "same", seed=0)
    other = build_tiny_vlm(TinyModelConfig(), TEXTS, tmp_path / "other", seed=1)
    a, b, c = (load_file(str(p / "model.safetensors")) for p in (tiny_dir, same, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["language_model.lm_head.weight"], c["language_model.lm_head.weight"])
    assert (tiny_dir / "tokenizer.json").read_text() == (same / "tokenizer.json").read_text()


def test_save_model_is_atomic(tiny_dir, tmp_path):
    from r4b_core.models.loading import load_model, save_model

    model, processor = load_model(str(tiny_dir))
    out = tmp_path / "out"
    save_model(model, processor, out)
    before = (out / "model.safetensors").read_bytes()

    class Boom:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, Boom(), out)
    assert (out / "model.safetensors").read_bytes() == before     # the finished folder is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]    # no temp folder left behind
    save_model(model, processor, out)                               # a successful save replaces it
    assert (out / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_sharded_write_round_trips(tiny_dir, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from r4b_core.models.loading import load_model, saved_state_dict, write_safetensors

    model, _ = load_model(str(tiny_dir))
    for f in ("config.json",):
        (tmp_path / f).write_text((tiny_dir / f).read_text())
    paths = write_safetensors(saved_state_dict(model), tmp_path, max_shard_bytes=400_000)
    assert len(paths) > 1 and (tmp_path / "model.safetensors.index.json").exists()
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path)
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k


def test_file_uri_and_errors(tiny_dir, tmp_path, monkeypatch):
    from r4b_core.models.loading import ModelLoadError, load_model

    model, _ = load_model(f"file://{tiny_dir}")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="r4b model init"):
        load_model("tiny")
    with pytest.raises(ModelLoadError, match="set model.vision_tower and model.language_model"):
        load_model("llava-onevision", ModelConfig(base="llava-onevision"))
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model(str(tiny_dir), dtype="int3")


def test_hub_id_offline_is_one_clear_line(monkeypatch, tmp_path):
    from r4b_core.models.loading import ModelLoadError, load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as exc:
        load_model("r4b-test-org/definitely-not-cached", ModelConfig())
    msg = str(exc.value)
    assert "\n" not in msg and "hub is unreachable" in msg and "--local-dir" in msg
    assert "r4b-test-org/definitely-not-cached" in msg


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A tiny SigLIP vision tower and a tiny tied Qwen3 LM, each saved like a hub checkpoint."""
    from families import QWEN3_TEXT_TEMPLATE
    from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from r4b_core.models.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("pair")
    torch.manual_seed(3)
    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, image_size=32, patch_size=8))
    vision.save_pretrained(root / "vision")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "vision")
    tok = train_tokenizer(TEXTS, 400)
    tok.chat_template = QWEN3_TEXT_TEMPLATE
    # A Qwen3-like tokenizer and chat template: no <image> token yet (composition must add it).
    lm = Qwen3ForCausalLM(Qwen3Config(vocab_size=420, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                      tie_word_embeddings=True))
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    return root / "vision", root / "lm", vision, lm


def test_compose_vision_tower_and_language_model(stand_ins, tmp_path):
    """The paper-scale composition builds R-4B's layout (models/rvl.py) around the pretrained towers:
    OneVision's AnyRes tiles and image_newline, a fresh projector starting with a LayerNorm, the
    tower's pooling head dropped, the LM's tied head kept tied; saved and loaded back as that class."""
    from r4b_core.models.loading import load_model, save_model
    from r4b_core.models.rvl import ARCHITECTURE, RForConditionalGeneration

    vdir, ldir, vision, lm = stand_ins
    cfg = ModelConfig(base="llava-onevision", vision_tower=str(vdir), language_model=str(ldir))
    model, processor = load_model(cfg.base, cfg)
    assert type(model) is RForConditionalGeneration and model.config.architectures == [ARCHITECTURE]
    assert isinstance(model.model.multi_modal_projector.pre_norm, torch.nn.LayerNorm)
    tower = model.model.vision_tower
    assert torch.equal(tower.embeddings.patch_embedding.weight, vision.embeddings.patch_embedding.weight)
    assert not hasattr(tower, "head") and not model.config.vision_config.vision_use_head
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.weight, lm.model.layers[0].mlp.up_proj.weight)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()   # stays tied
    assert processor.tokenizer.convert_tokens_to_ids(modes.IMAGE_TOKEN) == model.config.image_token_id
    assert max(h * w for h, w in model.config.image_grid_pinpoints) == 9 * 32 * 32     # tiles of the tower's size
    enc = processor(text=[modes.chat_prompt("What is 12 + 30?", 1, Mode.AUTO)],
                    images=[[Image.new("RGB", (40, 64), (1, 2, 3))]], return_tensors="pt")
    assert enc["pixel_values"].shape[1] > 1                   # the base tile + AnyRes tiles
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) > (32 // 8) ** 2
    with torch.no_grad():
        logits = model(**enc).logits
    # Save (tied head written once) and reload through the ordinary folder path: same outputs.
    out = save_model(model, processor, tmp_path / "composed")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "language_model.lm_head.weight" not in keys and "image_newline" in keys
    assert {"multi_modal_projector.pre_norm.weight", "multi_modal_projector.pre_norm.bias"} <= keys
    assert any(k.startswith("vision_tower.vision_model.") for k in keys) and not any(".head." in k for k in keys)
    again, proc2 = load_model(str(out), cfg)
    assert type(again) is RForConditionalGeneration
    with torch.no_grad():
        assert torch.allclose(again(**enc).logits, logits, atol=1e-5)
    assert again.lm_head.weight.data_ptr() == again.get_input_embeddings().weight.data_ptr()
    assert proc2.chat_template == processor.chat_template


def test_composed_chat_template_is_the_lms_own_with_thinking_mode(stand_ins, tmp_path):
    """The composed model's chat template is its LM's own (Qwen3's, which takes text only), each
    turn's images rendered as `<image>` lines before its text; served, `thinking_mode` (and Qwen3's
    `enable_thinking`, its alias) adds the mode's prefix once: exactly the stages' prompt."""
    from families import QWEN3_TEXT_TEMPLATE

    from r4b_core.models.chat import ChatFormat
    from r4b_core.models.loading import load_model, save_model
    from r4b_core.models.tokenizer import served_chat_template

    vdir, ldir, _, _ = stand_ins
    cfg = ModelConfig(base="llava-onevision", vision_tower=str(vdir), language_model=str(ldir))
    model, processor = load_model(cfg.base, cfg)
    assert QWEN3_TEXT_TEMPLATE in processor.chat_template
    fmt = ChatFormat.of(processor, model.generation_config)
    assert (fmt.image_placeholder, fmt.end_of_turn) == (modes.IMAGE_TOKEN, modes.IM_END)
    assert fmt.prompt("What is 7 + 5?", 2, Mode.THINK, system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<image>\n<image>\nWhat is 7 + 5?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")
    served = served_chat_template(save_model(model, processor, tmp_path / "composed"))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                             {"type": "text", "text": "What is 7 + 5?"}]}]

    def render(**kwargs) -> str:
        return processor.tokenizer.apply_chat_template(messages, chat_template=served, tokenize=False,
                                                       add_generation_prompt=True, **kwargs)

    for name, mode in modes.SERVING_MODE_NAMES.items():
        assert render(thinking_mode=name) == fmt.prompt("What is 7 + 5?", 1, mode), name
    assert render(enable_thinking=True) == fmt.prompt("What is 7 + 5?", 1, Mode.THINK)
    assert render(enable_thinking=False) == fmt.prompt("What is 7 + 5?", 1, Mode.NO_THINK)   # not twice


def test_compose_offline_hub_ids_fail_clearly(monkeypatch, tmp_path):
    from r4b_core.models.loading import ModelLoadError, load_model

    monkeypatch.chdir(tmp_path)
    cfg = ModelConfig(base="llava-onevision", vision_tower="google/siglip2-so400m-patch14-384",
                      language_model="Qwen/Qwen3-4B", dtype="bfloat16")
    with pytest.raises(ModelLoadError, match="google/siglip2-so400m-patch14-384.*hub is unreachable"):
        load_model(cfg.base, cfg)


def test_cli_model_init(tmp_path, repo_root, capsys):
    from r4b_core.cli import main
    from r4b_core.models.loading import load_model

    out = tmp_path / "base"
    rc = main(["model", "init", "--config", str(repo_root / "configs/tiny.yaml"), "--out", str(out),
               "--set", "data.synthetic.train_size=60"])
    assert rc == 0 and "written to" in capsys.readouterr().out
    model, processor = load_model(str(out))
    assert model.config.text_config.vocab_size == 512 and len(processor.tokenizer) <= 512
    rc = main(["model", "init", "--config", str(repo_root / "configs/r4b-4b.yaml"), "--out", str(tmp_path / "big")])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert rc == 2 and len(errors) == 1
    assert errors[0].startswith("error: model source 'google/siglip2-so400m-patch14-384'")
    assert "set model.vision_tower to DIR" in errors[0]
