"""Tiny random instances of the VLM families people bring, at test size (r4b_core/models/tiny_families.py).

    from families import FAMILIES, build_family
    path = build_family("qwen2_5_vl", tmp_path / "model")     # a save_pretrained folder, ~0.5 MB

64x64 images (R-4B's layout: 32x32 tiles), hidden 64 (head dimension 32: vLLM's CPU attention
needs it), two layers, a BPE tokenizer trained on a small corpus of the synthetic task's kind of text.
"""

from __future__ import annotations

from pathlib import Path

from r4b_core.config import TinyModelConfig
from r4b_core.models.tiny_families import FAMILIES, tiny_family_model

FAMILIES = list(FAMILIES)
CORPUS = [
    "What is 12 + 30?", "12 + 30 = 42", "The answer is 42.", "What colour is the square?", "red", "blue",
    "Step 1: read the numbers 7 and 5.\nStep 2: 7 * 5 = 35.", "How many shapes are there?", "3",
    "Which number is shown in the top row?", "The top row shows 18, the bottom row shows 4.", "18 - 4 = 14",
] * 10
SIZES = TinyModelConfig(image_size=64, patch_size=16, vision_hidden=32, vision_layers=2, vision_heads=2,
                        text_hidden=64, text_layers=2, text_heads=2, text_kv_heads=1, text_intermediate=128,
                        vocab_size=320, max_position_embeddings=2048)


def build_family_model(family: str, seed: int = 0):
    """(model, processor) of `family` with seeded random weights, in eval mode."""
    return tiny_family_model(family, SIZES, CORPUS, seed)


def build_family(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build `family` and save it as the platform saves models (loading.save_model)."""
    from r4b_core.models.loading import save_model

    model, processor = build_family_model(family, seed)
    return save_model(model, processor, out_dir)


# A text LM's chat template in Qwen3's turn format, written here (Qwen/Qwen3-4B's is not downloaded):
# string content only (it calls `.startswith` on it), a system turn, an assistant turn's think block
# split out, and `enable_thinking=false` writing the empty think block after the generation prompt.
QWEN3_TEXT_TEMPLATE = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(searching=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- if ns.searching and message.role == "user" and not message.content.startswith('<tool_response>') %}
        {%- set ns.searching = false %}
        {%- set ns.last_query_index = (messages|length - 1) - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
