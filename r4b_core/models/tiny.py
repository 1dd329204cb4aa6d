"""The toy VLM of the local run: a ~1M-parameter LLaVA-style model with random weights.

    from r4b_core.models.tiny import build_tiny_vlm
    path = build_tiny_vlm(cfg.model.tiny, corpus_texts, "runs/tiny/base")   # a save_pretrained folder

It mirrors R-4B's lineage at toy scale: a SigLIP vision tower (64x64 images, 16x16 patches ->
16 image tokens), a two-layer GELU MLP projector and a Qwen3 text model, with a byte-level BPE
tokenizer trained on the run's own corpus (models/tokenizer.py) and our chat template. The
processor is `LlavaProcessor` around the SigLIP image processor.

Deviations from R-4B, on purpose (R-4B's own layout is models/rvl.py, what the paper-scale
composition builds):
- LLaVA's projector is Linear -> GELU -> Linear; R-4B's puts a LayerNorm before it.
- single-resolution images (no AnyRes tiling): 16 image tokens per image keep the toy run's
  sequences short; input embeddings and output layer are untied (Qwen3-4B ties them; the vLLM
  weight-sync path handles both, see rollout/vllm_server.py).

The folder is written by `loading.save_model` (safetensors, vLLM key layout, atomic) and loads
with `loading.load_model` in transformers and with `vllm.entrypoints.openai.api_server`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from r4b_core.config import TinyModelConfig


def tiny_llava_config(cfg: TinyModelConfig, image_token_id: int, pad_token_id: int, eos_token_id: int):
    from transformers import LlavaConfig, Qwen3Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 2,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        vision_use_head=False,   # LLaVA takes the patch features; the pooling head would be dead weight
    )
    text = Qwen3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        head_dim=cfg.text_hidden // cfg.text_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    num_image_tokens = (cfg.image_size // cfg.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        image_seq_length=num_image_tokens,
        vision_feature_select_strategy="full",   # SigLIP has no CLS token to drop
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )


def make_processor(tokenizer, image_size: int, patch_size: int):
    """LlavaProcessor around the SigLIP image processor."""
    from transformers import LlavaProcessor, SiglipImageProcessor

    from r4b_core.models.tokenizer import chat_template

    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=chat_template(),
    )


def build_tiny_vlm(cfg: TinyModelConfig, texts: Iterable[str], out_dir: str | Path, seed: int = 0) -> Path:
    """Train the tokenizer on `texts`, build the model with seeded random weights, save to out_dir.
    `cfg.family` other than "r4b": that family's tiny instance (models/tiny_families.py)."""
    import torch
    from transformers import LlavaForConditionalGeneration, GenerationConfig

    from r4b_core import modes
    from r4b_core.errors import R4BError
    from r4b_core.models.loading import save_model
    from r4b_core.models.tokenizer import train_tokenizer

    if cfg.family != "r4b":
        from r4b_core.models.tiny_families import build_tiny_family

        return build_tiny_family(cfg.family, cfg, texts, out_dir, seed)

    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    if len(tokenizer) > cfg.vocab_size:
        raise R4BError(f"tokenizer has {len(tokenizer)} tokens but model.tiny.vocab_size is {cfg.vocab_size}; "
                       f"raise model.tiny.vocab_size")
    image_id = tokenizer.convert_tokens_to_ids(modes.IMAGE_TOKEN)
    config = tiny_llava_config(cfg, image_id, tokenizer.pad_token_id, tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    processor = make_processor(tokenizer, cfg.image_size, cfg.patch_size)
    return save_model(model, processor, out_dir)
