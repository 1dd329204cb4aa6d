"""R-4B's own layout: LLaVA-OneVision (AnyRes tiles, `image_newline`) whose projector starts with a
LayerNorm, as vLLM serves R-4B (its `rvl.py`, architecture `RForConditionalGeneration`).

    model = RForConditionalGeneration(rvl_config(vision_config, text_config, image_token_id))
    save_model(model, processor, out)     # config.json: model_type llava_onevision,
                                          # architectures [RForConditionalGeneration]

The tiny default model stays a plain LLaVA (models/tiny.py). Module-level torch / transformers
imports: the classes subclass them; models/loading imports this module only when it loads a model.

How each side loads a saved folder, offline and without `trust_remote_code`:
- the config is transformers' own `LlavaOnevisionConfig` (model_type `llava_onevision`), so
  transformers and vLLM both parse it; `architectures` names `RForConditionalGeneration`, which picks
  vLLM's R-4B model (the model class comes from `architectures`, the config class from model_type);
- on the transformers side that name is this class: `loading.model_class` takes the class a folder's
  `architectures` names, from transformers or from r4b's own (this one), so nothing registers it
  with the Auto classes (which key on the config class and would turn every OneVision into R-4B).

The weights are saved as transformers saves a OneVision (`language_model.model.*`,
`language_model.lm_head.*`, `vision_tower.vision_model.*`, `image_newline`,
`multi_modal_projector.{pre_norm,linear_1,linear_2}.*`): vLLM's R-4B module has these names, and its
mapper also reads the names R-4B's released checkpoint uses (`model.language_model.*`, `lm_head.*`,
...), which this class loads too.

What the layout fixes, because vLLM's R-4B module fixes it: the projector is LayerNorm(eps 1e-6) ->
Linear -> GELU (erf) -> Linear with biases, on one vision feature layer; `projector_hidden_act` and
`multimodal_projector_bias` are written to say so.

AnyRes grids: vLLM's R-4B counts an image's tokens as LLaVA-NeXT does (every tile's features +
one newline per row), while the OneVision model it runs shrinks a grid whose features exceed
`anyres_max_9`'s budget by more than 10% (bilinear). A grid of at most 9 tiles never shrinks,
so the composition offers OneVision's tile grids up to 9 tiles (`rvl_pinpoints`) and the two counts
agree; given a 4x4 grid, vLLM 0.32's engine fails on a big enough image (docs/models.md).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.activations import GELUActivation
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

ARCHITECTURE = "RForConditionalGeneration"      # vLLM's name for R-4B (model_executor/models/rvl.py)
PRE_NORM_EPS = 1e-6                             # vLLM's RVLMultiModalProjector.pre_norm
MAX_TILES = 9                                   # anyres_max_9: grids up to this many tiles never shrink


def rvl_pinpoints(image_size: int, max_side: int = 6) -> list[list[int]]:
    """OneVision's tile grids (1..6 tiles a side, (height, width) in pixels) of at most MAX_TILES tiles."""
    return [[image_size * rows, image_size * cols] for rows in range(1, max_side + 1)
            for cols in range(1, max_side + 1) if rows * cols <= MAX_TILES]


def rvl_config(vision_config, text_config, image_token_id: int, tie_word_embeddings: bool = False,
               **overrides) -> LlavaOnevisionConfig:
    """The R-4B layout's config: a SigLIP-style tower's config and a causal LM's config."""
    vision = vision_config.to_dict() | {"model_type": vision_config.model_type}
    text = text_config.to_dict() | {"model_type": text_config.model_type}
    values = dict(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        vision_feature_select_strategy="full",     # SigLIP has no CLS token to drop
        vision_feature_layer=-1,
        image_grid_pinpoints=rvl_pinpoints(vision_config.image_size),
        vision_aspect_ratio="anyres_max_9",
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=tie_word_embeddings,
    )
    config = LlavaOnevisionConfig(**(values | overrides))
    config.architectures = [ARCHITECTURE]
    return config


def rvl_processor(tokenizer, config: LlavaOnevisionConfig, image_mean, image_std, chat_template: str):
    """OneVision's processor for the layout: AnyRes tiles of the tower's image size over the config's
    grids, the tower's normalisation, `<image>` expanded to base + tiles + one newline per row."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    side = config.vision_config.image_size
    size = {"height": side, "width": side}
    image_processor = LlavaOnevisionImageProcessor(size=size, crop_size=None, image_mean=image_mean,
                                                   image_std=image_std,
                                                   image_grid_pinpoints=config.image_grid_pinpoints)
    # R-4B takes no video (vLLM's R-4B neither); the processor class requires a video processor
    video_processor = LlavaOnevisionVideoProcessor(size=size, image_mean=image_mean, image_std=image_std)
    return LlavaOnevisionProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        num_image_tokens=(side // config.vision_config.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio, chat_template=chat_template)


class RVLMultiModalProjector(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, vision features into the LM's hidden size."""

    def __init__(self, config: LlavaOnevisionConfig):
        super().__init__()
        vision_hidden, text_hidden = config.vision_config.hidden_size, config.text_config.hidden_size
        self.pre_norm = nn.LayerNorm(vision_hidden, eps=PRE_NORM_EPS)
        self.linear_1 = nn.Linear(vision_hidden, text_hidden, bias=True)
        self.act = GELUActivation()
        self.linear_2 = nn.Linear(text_hidden, text_hidden, bias=True)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.pre_norm(image_features))))


class RForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """transformers' LLaVA-OneVision with R-4B's projector; everything else is OneVision's."""

    def __init__(self, config: LlavaOnevisionConfig):
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(f"{ARCHITECTURE}: vision_feature_layer must be one layer (vLLM's R-4B projector "
                             f"takes one), got {config.vision_feature_layer!r}")
        super().__init__(config)
        self.model.multi_modal_projector = RVLMultiModalProjector(config)
        self.post_init()


# transformers maps checkpoint names only for its own classes (a class defined elsewhere counts as
# remote code), so this one is told to read and write OneVision's names.
register_checkpoint_conversion_mapping(ARCHITECTURE, get_checkpoint_conversion_mapping("llava_onevision"),
                                       overwrite=True)
