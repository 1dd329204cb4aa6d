"""R-4B's layout (r4b_core/models/rvl.py) on its own: the architecture vLLM's R-4B module runs
(OneVision's AnyRes tiles and `image_newline`, a LayerNorm before the projector), the config both
sides parse offline, and a checkpoint in R-4B's released key names loading into r4b's class. The
family tests (test_families.py, integration/test_families_vllm.py) take it through save/load,
prompts, rollouts and the vLLM sidecar like every other family."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from families import build_family_model
from r4b_core.modes import Mode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_architecture_is_onevision_with_a_projector_layernorm():
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from r4b_core.models import rvl
    from r4b_core.models.chat import ChatFormat

    model, processor = build_family_model("rvl")
    assert isinstance(model, LlavaOnevisionForConditionalGeneration) and isinstance(model.config, LlavaOnevisionConfig)
    proj = model.model.multi_modal_projector
    assert [name for name, _ in proj.named_children()] == ["pre_norm", "linear_1", "act", "linear_2"]
    assert isinstance(proj.pre_norm, torch.nn.LayerNorm) and proj.pre_norm.eps == 1e-6
    assert proj.linear_1.bias is not None and proj.linear_2.bias is not None
    assert model.model.image_newline.shape == (model.config.text_config.hidden_size,)
    # the projector normalises first: shifting and scaling a feature leaves its output alone
    x = torch.randn(3, model.config.vision_config.hidden_size)
    with torch.no_grad():
        assert torch.allclose(proj(x), proj(5 * x + 2), atol=1e-4)

    # AnyRes: a 64x64 image on 32-pixel tiles is the base tile + a 2x2 grid, one newline per row
    fmt = ChatFormat.of(processor, model.generation_config)
    enc = processor(text=[fmt.prompt("What is 7 + 5?", 1, Mode.THINK)], images=[[Image.new("RGB", (64, 64))]],
                    return_tensors="pt")
    per_tile = (32 // 8) ** 2
    grid_side = 2 * (32 // 8)
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == per_tile + grid_side * (grid_side + 1)
    assert tuple(enc["pixel_values"].shape[:2]) == (1, 1 + 4) and enc["image_sizes"].tolist() == [[64, 64]]
    # every offered grid has at most 9 tiles: OneVision never shrinks it, so vLLM's R-4B token count
    # (LLaVA-NeXT's, without the shrink) agrees with the features its model produces
    assert max(h * w for h, w in model.config.image_grid_pinpoints) == 9 * 32 * 32
    assert model.config.architectures == [rvl.ARCHITECTURE]


def test_released_key_names_load_into_the_class(tmp_path):
    """R-4B's released checkpoint uses transformers' module names (`model.language_model.*`, vLLM's
    R-4B mapper reads them); r4b writes OneVision's names. Both load into r4b's class alike."""
    from safetensors.torch import save_file

    from r4b_core.models import rvl
    from r4b_core.models.loading import load_model, save_model

    model, processor = build_family_model("rvl", seed=4)
    ours = save_model(model, processor, tmp_path / "ours")
    released = tmp_path / "released"
    released.mkdir()
    for f in ours.iterdir():
        if f.name != "model.safetensors":
            (released / f.name).write_bytes(f.read_bytes())
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}   # tied
    assert any(k.startswith("model.language_model.") for k in state)
    save_file(state, str(released / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((released / "config.json").read_text())["architectures"] == [rvl.ARCHITECTURE]

    enc = processor(text=["<|im_start|>user\n<image>\nHi<|im_end|>\n"], images=[[Image.new("RGB", (40, 64))]],
                    return_tensors="pt")
    with torch.no_grad():
        expected = model(**enc).logits
        for folder in (ours, released):
            loaded, _ = load_model(str(folder))
            assert type(loaded) is rvl.RForConditionalGeneration
            assert torch.equal(loaded(**enc).logits, expected), folder.name
