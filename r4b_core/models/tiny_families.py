"""Tiny random instances of the VLM families people bring, built from transformers' own classes.

    model:
      base: tiny
      tiny: {family: qwen2_5_vl}        # prepare builds it; every stage then runs it as a user's model

    from r4b_core.models.tiny_families import build_tiny_family
    path = build_tiny_family("qwen2_5_vl", cfg.model.tiny, corpus_texts, "runs/x/base_model")

Each family is its real configuration, model, processor and tokenizer class at toy size (the
`model.tiny` sizes: text and vision hidden sizes, layers, heads, image size), with seeded random
weights and a BPE tokenizer trained on the given corpus, wrapped in the family's tokenizer class
with the family's own special tokens (image placeholders, turn markers, end of turn). The chat
templates follow each family's published turn format (written here; nothing is downloaded). What a
family lacks stays missing: only Qwen3-VL's vocabulary has `<think>` / `</think>`, so for the others
the platform adds them when it loads the model (loading.ensure_think_tokens), as for a real one.

Families: qwen2_5_vl, qwen3_vl (M-RoPE, image_grid_thw), llava_onevision (AnyRes, image_newline,
image_sizes), rvl (R-4B's layout: OneVision tiles of half the image size with a projector
LayerNorm, r4b's own class, models/rvl.py), smolvlm (Idefics3 layout, pixel_attention_mask,
`<end_of_utterance>`), gemma3
(`<end_of_turn>`, tied embeddings, bidirectional image attention, sliding windows). vLLM's CPU
attention needs a head dimension of at least 32 (`text_hidden / text_heads`).

This is a table of builders for tests and toy runs, not a registry the stages consult: the stages
read everything from the saved model, its processor and its chat template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from r4b_core.config import TinyModelConfig

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "llava_onevision", "rvl", "smolvlm", "gemma3")

# chat markup each tokenizer should hold as merged tokens, as a real one does
_MARKUP = ["\n\n", "user\n", "assistant\n", "User:", "Assistant:", "model\n", "system\n"] * 20


def _lit(s: str) -> str:
    return json.dumps(s)


def _template(turn: str, end: str, image: str, generation: str, bos: str = "", system: str | None = None,
              roles: dict[str, str] | None = None) -> str:
    """A chat template in one family's turn format: `turn` with {role}, images then text, `end`."""
    roles = roles or {}
    role_expr = "message['role']"
    if roles:
        role_expr = "{" + ", ".join(f"{_lit(k)}: {_lit(v)}" for k, v in roles.items()) + "}[message['role']]"
    head, tail = turn.split("{role}")
    out = _lit(bos) + " }}"
    if system is not None:
        out += ("{%- if messages[0]['role'] != 'system' -%}{{ " + _lit(head + "system" + tail + system + end)
                + " }}{%- endif -%}")
    return (
        "{{ " + out
        + "{%- for message in messages -%}"
        "{{ " + _lit(head) + " ~ " + role_expr + " ~ " + _lit(tail) + " }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] in ('image', 'image_url', 'input_image') -%}{{ " + _lit(image) + " }}"
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ " + _lit(end) + " }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + _lit(generation) + " }}{%- endif -%}"
    )


def _tokenizer(cls_name: str, corpus: list[str], vocab_size: int, special: list[str], extra: list[str], eos: str,
               pad: str, bos: str | None = None, named: dict[str, str] | None = None):
    """BPE trained on the corpus plus the family's markup, in the family's tokenizer class.
    Byte-level for the GPT-2 style classes (Qwen2, GPT2); SentencePiece style (`▁` for spaces,
    byte fallback) for Gemma, whose class rebuilds that pipeline around the saved vocabulary."""
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    cls = getattr(transformers, cls_name)
    kwargs = dict(eos_token=eos, pad_token=pad, bos_token=bos, clean_up_tokenization_spaces=False,
                  model_input_names=["input_ids", "attention_mask"])
    if named:                     # the family's named special tokens (Gemma3's boi_token, image_token, ...)
        kwargs["extra_special_tokens"] = named
    if cls_name == "GemmaTokenizer":
        byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Replace(" ", "\u2581")
        # Runs of newlines are tokens of their own, never merged with text ("user" "\n", not
        # "user\n"): vLLM's Gemma3 processor assumes it when it joins the "\n\n" it inserts before
        # an image with the "\n" before it (to "\n\n\n", as the tokenizer reads the whole text). A
        # "user\n" token leaves the sidecar's prompt ids different from the trainer's
        # (docs/models.md). Split here for training only; the class's own pipeline reads the
        # saved vocabulary.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n+"), behavior="isolated")
        newlines = ["\n\n\n", "\n\n\n\n"] * 40
        # the 256 byte-fallback tokens come on top of the corpus's own characters (which the
        # byte-level families' alphabet already covers): 80 more ids keep the merges comparable
        tok.train_from_iterator(corpus + _MARKUP + newlines, trainers.BpeTrainer(
            vocab_size=vocab_size + 80, special_tokens=special + ["<unk>", "<mask>"] + byte_tokens,
            show_progress=False))
        state = json.loads(tok.to_str())["model"]
        merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
        tokenizer = cls(vocab=state["vocab"], merges=merges, unk_token="<unk>", **kwargs)
        tokenizer.add_special_tokens({"additional_special_tokens": special}, replace_extra_special_tokens=False)
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(corpus + _MARKUP, trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        tokenizer = cls(tokenizer_object=tok, unk_token=None, **kwargs)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    return tokenizer


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _text(cfg: TinyModelConfig, tok, **extra) -> dict:
    return dict(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                num_key_value_heads=cfg.text_kv_heads, head_dim=cfg.text_hidden // cfg.text_heads,
                max_position_embeddings=cfg.max_position_embeddings, vocab_size=len(tok), **extra)


def _vision(cfg: TinyModelConfig, **extra) -> dict:
    return dict(hidden_size=cfg.vision_hidden, intermediate_size=2 * cfg.vision_hidden,
                num_attention_heads=cfg.vision_heads, **extra)


def _qwen_vl(version: str, cfg: TinyModelConfig, corpus: list[str]):
    import transformers as tf

    qwen_special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]
    think = ["<think>", "</think>"] if version == "3" else []     # Qwen3's vocabulary has them, 2.5's not
    tok = _tokenizer("Qwen2Tokenizer", corpus, cfg.vocab_size, qwen_special, think, eos="<|im_end|>",
                     pad="<|endoftext|>")
    image_id, video_id, vs, ve = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    patch = cfg.patch_size
    side = max(1, cfg.image_size // (2 * patch)) * 2 * patch      # a multiple of patch x merge
    size = {"shortest_edge": side * side, "longest_edge": 4 * side * side}
    half = cfg.text_hidden // cfg.text_heads // 2                  # M-RoPE sections sum to head_dim / 2
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8]}
    common = dict(image_token_id=image_id, video_token_id=video_id, vision_start_token_id=vs,
                  vision_end_token_id=ve, tie_word_embeddings=False)
    text = _text(cfg, tok, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    vision = _vision(cfg, depth=cfg.vision_layers, patch_size=patch, out_hidden_size=cfg.text_hidden)
    vision["num_heads"] = vision.pop("num_attention_heads")
    if version == "2.5":
        config = tf.Qwen2_5_VLConfig(
            vision_config=dict(vision, window_size=4 * patch, fullatt_block_indexes=[cfg.vision_layers - 1]),
            text_config=dict(text, rope_parameters=rope, model_type="qwen2_5_vl_text"), **common)
        model_cls, proc_cls, video_cls = (tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor,
                                          tf.Qwen2VLVideoProcessor)
        template = _template("<|im_start|>{role}\n", "<|im_end|>\n", "<|vision_start|><|image_pad|><|vision_end|>",
                             "<|im_start|>assistant\n", system="You are a helpful assistant.")
    else:
        config = tf.Qwen3VLConfig(
            vision_config=dict(vision, num_position_embeddings=(cfg.image_size // patch) ** 2,
                               deepstack_visual_indexes=[0]),
            text_config=dict(text, rope_parameters=dict(rope, mrope_interleaved=True)), **common)
        model_cls, proc_cls, video_cls = (tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor,
                                          tf.Qwen3VLVideoProcessor)
        template = _template("<|im_start|>{role}\n", "<|im_end|>\n", "<|vision_start|><|image_pad|><|vision_end|>",
                             "<|im_start|>assistant\n")
    image_proc = tf.Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2, size=size)
    video_proc = video_cls(patch_size=patch, merge_size=2, temporal_patch_size=2, size=size)
    processor = proc_cls(image_processor=image_proc, tokenizer=tok, video_processor=video_proc, chat_template=template)
    return config, model_cls, processor


def _siglip(cfg: TinyModelConfig) -> dict:
    return _vision(cfg, model_type="siglip_vision_model", num_hidden_layers=cfg.vision_layers,
                   image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=False)


def _llava_onevision(cfg: TinyModelConfig, corpus: list[str]):
    import transformers as tf

    tok = _tokenizer("Qwen2Tokenizer", corpus, cfg.vocab_size,
                     ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"], [],
                     eos="<|im_end|>", pad="<|endoftext|>")
    image_id, video_id = _ids(tok, "<image>", "<video>")
    s = cfg.image_size
    pinpoints = [[s, s], [s, 2 * s], [2 * s, s]]
    config = tf.LlavaOnevisionConfig(
        vision_config=_siglip(cfg),
        text_config=_text(cfg, tok, model_type="qwen2", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          bos_token_id=None),
        image_token_index=image_id, video_token_index=video_id, vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False)
    image_proc = tf.LlavaOnevisionImageProcessor(size={"height": s, "width": s}, image_grid_pinpoints=pinpoints,
                                                 crop_size=None)
    video_proc = tf.LlavaOnevisionVideoProcessor(size={"height": s, "width": s})
    template = _template("<|im_start|>{role}\n", "<|im_end|>\n", "<image>\n", "<|im_start|>assistant\n")
    processor = tf.LlavaOnevisionProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                           num_image_tokens=(s // cfg.patch_size) ** 2,
                                           vision_feature_select_strategy="full", chat_template=template)
    return config, tf.LlavaOnevisionForConditionalGeneration, processor


def _rvl(cfg: TinyModelConfig, corpus: list[str]):
    """R-4B's layout (models/rvl.py): a SigLIP tower on tiles of half the image size (a square image
    is a 2x2 grid plus the base view), a projector LayerNorm, a tied Qwen3 LM whose vocabulary has
    `<think>` / `</think>`, as R-4B's Qwen3-4B."""
    import transformers as tf

    from r4b_core.models import rvl

    tok = _tokenizer("Qwen2Tokenizer", corpus, cfg.vocab_size, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
                     ["<think>", "</think>"], eos="<|im_end|>", pad="<|endoftext|>")
    vision = tf.SiglipVisionConfig(**_vision(cfg, num_hidden_layers=cfg.vision_layers, image_size=cfg.image_size // 2,
                                             patch_size=cfg.patch_size // 2, vision_use_head=False))
    text = tf.Qwen3Config(**_text(cfg, tok, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                  bos_token_id=None, tie_word_embeddings=True))
    config = rvl.rvl_config(vision, text, _ids(tok, "<image>")[0], tie_word_embeddings=True)
    template = _template("<|im_start|>{role}\n", "<|im_end|>\n", "<image>\n", "<|im_start|>assistant\n")
    processor = rvl.rvl_processor(tok, config, image_mean=[0.5] * 3, image_std=[0.5] * 3, chat_template=template)
    return config, rvl.RForConditionalGeneration, processor


def _smolvlm(cfg: TinyModelConfig, corpus: list[str]):
    import transformers as tf

    special = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
               "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 3) for c in range(1, 3)]
    tok = _tokenizer("GPT2Tokenizer", corpus, cfg.vocab_size, special, [], eos="<end_of_utterance>",
                     pad="<|endoftext|>", bos="<|im_start|>")
    tok.add_special_tokens({"additional_special_tokens": special[3:]})
    image_id, = _ids(tok, "<image>")
    s = cfg.image_size
    config = tf.SmolVLMConfig(
        vision_config=_vision(cfg, num_hidden_layers=cfg.vision_layers, image_size=s, patch_size=cfg.patch_size),
        text_config=_text(cfg, tok, model_type="llama", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id),
        image_token_id=image_id, scale_factor=2, tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    image_proc = tf.SmolVLMImageProcessor(size={"longest_edge": s}, max_image_size={"longest_edge": s},
                                          do_image_splitting=False)
    video_proc = tf.SmolVLMVideoProcessor(size={"longest_edge": s}, max_image_size={"longest_edge": s})
    template = _template("{role}:", "<end_of_utterance>\n", "<image>", "Assistant:", bos="<|im_start|>",
                         roles={"user": "User", "assistant": "Assistant", "system": "System"})
    processor = tf.SmolVLMProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                    image_seq_len=(s // cfg.patch_size // 2) ** 2, chat_template=template)
    return config, tf.SmolVLMForConditionalGeneration, processor


def _gemma3(cfg: TinyModelConfig, corpus: list[str]):
    import transformers as tf

    special = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
               "<image_soft_token>"]
    tok = _tokenizer("GemmaTokenizer", corpus, cfg.vocab_size, special, [], eos="<eos>", pad="<pad>", bos="<bos>",
                     named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                            "image_token": "<image_soft_token>"})
    boi, eoi, image_id, eot = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<end_of_turn>")
    tokens_per_image = (cfg.image_size // cfg.patch_size // 2) ** 2
    head_dim = cfg.text_hidden // cfg.text_heads
    config = tf.Gemma3Config(
        vision_config=_siglip(cfg),
        text_config=_text(cfg, tok, sliding_window=64, query_pre_attn_scalar=head_dim,
                          eos_token_id=[tok.eos_token_id, eot], pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id),
        mm_tokens_per_image=tokens_per_image, boi_token_index=boi, eoi_token_index=eoi,
        image_token_index=image_id, tie_word_embeddings=True)
    s = cfg.image_size
    image_proc = tf.Gemma3ImageProcessor(size={"height": s, "width": s})
    template = _template("<start_of_turn>{role}\n", "<end_of_turn>\n", "<start_of_image>", "<start_of_turn>model\n",
                         bos="<bos>", roles={"user": "user", "assistant": "model", "system": "user"})
    processor = tf.Gemma3Processor(image_processor=image_proc, tokenizer=tok, image_seq_length=tokens_per_image,
                                   chat_template=template)
    return config, tf.Gemma3ForConditionalGeneration, processor


_BUILDERS = {
    "qwen2_5_vl": lambda cfg, corpus: _qwen_vl("2.5", cfg, corpus),
    "qwen3_vl": lambda cfg, corpus: _qwen_vl("3", cfg, corpus),
    "llava_onevision": _llava_onevision,
    "rvl": _rvl,
    "smolvlm": _smolvlm,
    "gemma3": _gemma3,
}


def tiny_family_model(family: str, cfg: TinyModelConfig, texts: Iterable[str], seed: int = 0):
    """(model, processor) of `family` with seeded random weights, in eval mode."""
    import torch
    from transformers import GenerationConfig

    from r4b_core.errors import R4BError

    if family not in _BUILDERS:
        raise R4BError(f"model.tiny.family {family!r}: one of r4b, {', '.join(FAMILIES)}")
    config, model_cls, processor = _BUILDERS[family](cfg, list(texts))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    tok = processor.tokenizer
    eos = getattr(config.get_text_config(), "eos_token_id", None) or tok.eos_token_id
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id, do_sample=False)
    return model, processor


def build_tiny_family(family: str, cfg: TinyModelConfig, texts: Iterable[str], out_dir: str | Path,
                      seed: int = 0) -> Path:
    """Build `family` at `cfg`'s sizes and save it as the platform saves models (loading.save_model)."""
    from r4b_core.models.loading import save_model

    model, processor = tiny_family_model(family, cfg, texts, seed)
    return save_model(model, processor, out_dir)
