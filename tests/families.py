"""Tiny random instances of the VLM families people bring, built from transformers' own classes.

    from families import FAMILIES, build_family
    path = build_family("qwen2_5_vl", tmp_path / "model")     # a save_pretrained folder, ~0.5 MB

Each family is its real configuration, model, processor and tokenizer class at toy size (64x64
images, hidden 64, two layers), with random weights and a byte-level BPE tokenizer trained here on a
small corpus, wrapped in the family's tokenizer class with the family's own special tokens (image
placeholders, turn markers, end-of-turn). The chat templates follow each family's published turn
format (written here; nothing is downloaded). What a family lacks stays missing on purpose: only
Qwen3-VL's vocabulary has `<think>` / `</think>`, so the others exercise the platform adding them.

Families: qwen2_5_vl, qwen3_vl (M-RoPE, image_grid_thw), llava_onevision (AnyRes, image_newline,
image_sizes), rvl (R-4B's layout: OneVision with a projector LayerNorm, r4b's own class), smolvlm (Idefics3 layout, pixel_attention_mask, `<end_of_utterance>`), gemma3
(`<end_of_turn>`, tied embeddings, bidirectional image attention).
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "What is 12 + 30?", "12 + 30 = 42", "The answer is 42.", "What colour is the square?", "red", "blue",
    "Step 1: read the numbers 7 and 5.\nStep 2: 7 * 5 = 35.", "How many shapes are there?", "3",
    "Which number is shown in the top row?", "The top row shows 18, the bottom row shows 4.", "18 - 4 = 14",
] * 10

IMAGE_SIZE = 64
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, max_position_embeddings=2048)   # vLLM CPU attention: head_dim >= 32


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


def _tokenizer(cls_name: str, special: list[str], extra: list[str], eos: str, pad: str, bos: str | None = None,
               named: dict[str, str] | None = None):
    """BPE trained on CORPUS plus the family's markup, in the family's tokenizer class. Byte-level for
    the GPT-2 style classes (Qwen2, GPT2); SentencePiece style (`▁` for spaces, byte fallback) for
    Gemma, whose class rebuilds that pipeline around the saved vocabulary when it loads."""
    import transformers
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    markup = ["\n\n", "user\n", "assistant\n", "User:", "Assistant:", "model\n", "system\n"] * 20
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
        tok.train_from_iterator(CORPUS + markup + newlines, trainers.BpeTrainer(
            vocab_size=400, special_tokens=special + ["<unk>", "<mask>"] + byte_tokens, show_progress=False))
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
        tok.train_from_iterator(CORPUS + markup, trainers.BpeTrainer(
            vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False))
        tokenizer = cls(tokenizer_object=tok, unk_token=None, **kwargs)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in extra])
    return tokenizer


def _ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def _qwen_vl(version: str):
    import transformers as tf

    qwen_special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>", "<|video_pad|>"]
    think = ["<think>", "</think>"] if version == "3" else []     # Qwen3's vocabulary has them, 2.5's not
    tok = _tokenizer("Qwen2Tokenizer", qwen_special, think, eos="<|im_end|>", pad="<|endoftext|>")
    image_id, video_id, vs, ve = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    patch = 14 if version == "2.5" else 16
    side = (IMAGE_SIZE // (2 * patch)) * 2 * patch                # a multiple of patch x merge
    pixels = dict(min_pixels=side * side, max_pixels=4 * side * side)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}   # sums to head_dim / 2
    common = dict(image_token_id=image_id, video_token_id=video_id, vision_start_token_id=vs,
                  vision_end_token_id=ve, tie_word_embeddings=False)
    text = dict(TEXT, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                bos_token_id=None)
    if version == "2.5":
        config = tf.Qwen2_5_VLConfig(
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                               window_size=56, fullatt_block_indexes=[1], out_hidden_size=TEXT["hidden_size"]),
            text_config=dict(text, rope_parameters=rope, model_type="qwen2_5_vl_text"), **common)
        model_cls, proc_cls, video_cls = (tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLProcessor,
                                          tf.Qwen2VLVideoProcessor)
        template = _template("<|im_start|>{role}\n", "<|im_end|>\n", "<|vision_start|><|image_pad|><|vision_end|>",
                             "<|im_start|>assistant\n", system="You are a helpful assistant.")
    else:
        config = tf.Qwen3VLConfig(
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch,
                               out_hidden_size=TEXT["hidden_size"], num_position_embeddings=16,
                               deepstack_visual_indexes=[0]),
            text_config=dict(text, rope_parameters=dict(rope, mrope_interleaved=True)), **common)
        model_cls, proc_cls, video_cls = (tf.Qwen3VLForConditionalGeneration, tf.Qwen3VLProcessor,
                                          tf.Qwen3VLVideoProcessor)
        template = _template("<|im_start|>{role}\n", "<|im_end|>\n", "<|vision_start|><|image_pad|><|vision_end|>",
                             "<|im_start|>assistant\n")
    image_proc = tf.Qwen2VLImageProcessor(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                          size={"shortest_edge": pixels["min_pixels"],
                                                "longest_edge": pixels["max_pixels"]})
    video_proc = video_cls(patch_size=patch, merge_size=2, temporal_patch_size=2,
                           size={"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]})
    processor = proc_cls(image_processor=image_proc, tokenizer=tok, video_processor=video_proc, chat_template=template)
    return config, model_cls, processor


def _llava_onevision():
    import transformers as tf

    tok = _tokenizer("Qwen2Tokenizer", ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"], [],
                     eos="<|im_end|>", pad="<|endoftext|>")
    image_id, video_id = _ids(tok, "<image>", "<video>")
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
    config = tf.LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=16,
                           vision_use_head=False),
        text_config=dict(TEXT, model_type="qwen2", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=None),
        image_token_index=image_id, video_token_index=video_id, vision_feature_select_strategy="full",
        vision_feature_layer=-1, image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False)
    image_proc = tf.LlavaOnevisionImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                 image_grid_pinpoints=pinpoints, crop_size=None)
    video_proc = tf.LlavaOnevisionVideoProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    template = _template("<|im_start|>{role}\n", "<|im_end|>\n", "<image>\n", "<|im_start|>assistant\n")
    processor = tf.LlavaOnevisionProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                           num_image_tokens=(IMAGE_SIZE // 16) ** 2,
                                           vision_feature_select_strategy="full", chat_template=template)
    return config, tf.LlavaOnevisionForConditionalGeneration, processor


def _rvl():
    """R-4B's layout (r4b_core/models/rvl.py): a SigLIP tower, OneVision's AnyRes tiles (32-pixel
    tiles, so a 64x64 image is a 2x2 grid) and a projector LayerNorm, a tied Qwen3 LM whose
    vocabulary has `<think>` / `</think>`, as R-4B's Qwen3-4B."""
    import transformers as tf

    from r4b_core.models import rvl

    tok = _tokenizer("Qwen2Tokenizer", ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"],
                     ["<think>", "</think>"], eos="<|im_end|>", pad="<|endoftext|>")
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=IMAGE_SIZE // 2, patch_size=8, vision_use_head=False)
    text = tf.Qwen3Config(**TEXT, vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          bos_token_id=None, tie_word_embeddings=True)
    config = rvl.rvl_config(vision, text, _ids(tok, "<image>")[0], tie_word_embeddings=True)
    template = _template("<|im_start|>{role}\n", "<|im_end|>\n", "<image>\n", "<|im_start|>assistant\n")
    processor = rvl.rvl_processor(tok, config, image_mean=[0.5] * 3, image_std=[0.5] * 3, chat_template=template)
    return config, rvl.RForConditionalGeneration, processor


def _smolvlm():
    import transformers as tf

    special = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
               "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 3) for c in range(1, 3)]
    tok = _tokenizer("GPT2Tokenizer", special, [], eos="<end_of_utterance>", pad="<|endoftext|>",
                     bos="<|im_start|>")
    tok.add_special_tokens({"additional_special_tokens": special[3:]})
    image_id, = _ids(tok, "<image>")
    config = tf.SmolVLMConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=16),
        text_config=dict(TEXT, model_type="llama", vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id),
        image_token_id=image_id, scale_factor=2, tie_word_embeddings=False, pad_token_id=tok.pad_token_id)
    image_proc = tf.SmolVLMImageProcessor(size={"longest_edge": IMAGE_SIZE},
                                          max_image_size={"longest_edge": IMAGE_SIZE}, do_image_splitting=False)
    video_proc = tf.SmolVLMVideoProcessor(size={"longest_edge": IMAGE_SIZE},
                                          max_image_size={"longest_edge": IMAGE_SIZE})
    template = _template("{role}:", "<end_of_utterance>\n", "<image>", "Assistant:", bos="<|im_start|>",
                         roles={"user": "User", "assistant": "Assistant", "system": "System"})
    processor = tf.SmolVLMProcessor(image_processor=image_proc, tokenizer=tok, video_processor=video_proc,
                                    image_seq_len=(IMAGE_SIZE // 16 // 2) ** 2, chat_template=template)
    return config, tf.SmolVLMForConditionalGeneration, processor


def _gemma3():
    import transformers as tf

    special = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
               "<image_soft_token>"]
    tok = _tokenizer("GemmaTokenizer", special, [], eos="<eos>", pad="<pad>", bos="<bos>",
                     named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                            "image_token": "<image_soft_token>"})
    boi, eoi, image_id, eot = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<end_of_turn>")
    tokens_per_image = 4
    config = tf.Gemma3Config(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=16,
                           vision_use_head=False),
        text_config=dict(TEXT, vocab_size=len(tok), sliding_window=64, query_pre_attn_scalar=32,
                         eos_token_id=[tok.eos_token_id, eot], pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id),
        mm_tokens_per_image=tokens_per_image, boi_token_index=boi, eoi_token_index=eoi,
        image_token_index=image_id, tie_word_embeddings=True)
    image_proc = tf.Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    template = _template("<start_of_turn>{role}\n", "<end_of_turn>\n", "<start_of_image>", "<start_of_turn>model\n",
                         bos="<bos>", roles={"user": "user", "assistant": "model", "system": "user"})
    processor = tf.Gemma3Processor(image_processor=image_proc, tokenizer=tok, image_seq_length=tokens_per_image,
                                   chat_template=template)
    return config, tf.Gemma3ForConditionalGeneration, processor


BUILDERS = {
    "qwen2_5_vl": lambda: _qwen_vl("2.5"),
    "qwen3_vl": lambda: _qwen_vl("3"),
    "llava_onevision": _llava_onevision,
    "rvl": _rvl,
    "smolvlm": _smolvlm,
    "gemma3": _gemma3,
}
FAMILIES = list(BUILDERS)


def build_family_model(family: str, seed: int = 0):
    """(model, processor) of `family` with seeded random weights, in eval mode."""
    import torch
    from transformers import GenerationConfig

    config, model_cls, processor = BUILDERS[family]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    tok = processor.tokenizer
    eos = getattr(config.get_text_config(), "eos_token_id", None) or tok.eos_token_id
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id, do_sample=False)
    return model, processor


def build_family(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build `family` and save it as the platform saves models (loading.save_model)."""
    from r4b_core.models.loading import save_model

    model, processor = build_family_model(family, seed)
    return save_model(model, processor, out_dir)
