"""Load and save the policy model: tiny folders, storage URIs, Hugging Face ids, paper-scale pairs.

    model, processor = load_model("runs/tiny/base", cfg.model)                 # a local folder
    model, processor = load_model("s3://bucket/run/anneal/model", cfg.model, store=store)
    model, processor = load_model("Qwen/Qwen2.5-VL-3B-Instruct", cfg.model)   # HF id (needs a hub)
    model, processor = load_model(cfg.model.base, cfg.model)   # base: llava-onevision + vision_tower
                                                               # + language_model: composed
    save_model(model, processor, "runs/tiny/anneal/model")     # safetensors, transformers' layout, atomic

Paper scale (configs/r4b-4b.yaml) composes R-4B's layout (models/rvl.py: LLaVA-OneVision with AnyRes
tiles, `image_newline` and a projector LayerNorm, served by vLLM's R-4B model) from a vision tower
(google/siglip2-so400m-patch14-384) and a language model (Qwen/Qwen3-4B): the towers keep their
pretrained weights, the projector and `image_newline` are freshly initialised, the tokenizer is the
LM's plus an `<image>` token, the chat template the LM's own (each turn's images as `<image>` lines
before its text; `r4b serve` adds `thinking_mode` around it). A folder loads with the class its config's
`architectures` names (`model_class`): transformers' own, or r4b's R-4B class.

Saved folders use the key layout `save_pretrained` writes for the model's family (for LLaVA
`language_model.model.*`, `vision_tower.vision_model.*`; for Qwen2.5-VL `visual.*`, `model.*`):
transformers maps it back on load and each vLLM model maps it to its own modules. The weight
sync writes the same names (`saved_state_dict`).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from r4b_core.config import COMPOSED_BASES, ModelConfig
from r4b_core.errors import R4BError

MAX_SHARD_BYTES = 4 * 1024**3


class ModelLoadError(R4BError):
    """A model source that cannot be loaded; the message names the source and the fix."""


def _torch_dtype(dtype: Any):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(dtype)]
    except KeyError:
        raise ModelLoadError(f"dtype {dtype!r}: allowed: float32, bfloat16, float16") from None


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
def saved_state_dict(model) -> dict[str, Any]:
    """The model's tensors under the names `save_pretrained` writes: transformers' own checkpoint
    layout for the family (its conversion mapping reverted, tied weights once), which is also the
    layout every vLLM model loader maps from. The weight push writes the same names."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    if getattr(model, "_weight_conversions", None) is None:
        # Built here, not loaded: write what a checkpoint of the family looks like, as a loaded
        # model is written. transformers alone would drop the SigLIP `vision_model.` level, which
        # vLLM's LLaVA / OneVision / Gemma3 towers need.
        model._weight_conversions = get_model_conversion_mapping(model, add_legacy=False)
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return {k: v.detach().contiguous() for k, v in revert_weight_conversion(model, state).items()}


def write_safetensors(tensors: dict[str, Any], folder: str | Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write tensors as model.safetensors (or shards + index) into an existing folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    shards: list[dict[str, Any]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        path = folder / "model.safetensors"
        save_file(shards[0], str(path), metadata={"format": "pt"})
        return [path]
    paths, weight_map = [], {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        paths.append(folder / name)
        weight_map.update({k: name for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return paths


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished folder into place; an older folder at `final` is removed only afterwards."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_model(model, processor, out_dir: str | Path) -> Path:
    """Save a loadable, servable folder: config, safetensors (transformers' layout), processor files.

    Atomic: everything is written to a temporary sibling folder that is renamed at the end, so
    a crash never leaves a half-written model where a finished one is expected.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        # config.save_pretrained alone omits `architectures`; vLLM then guesses a pooling model.
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        write_safetensors(saved_state_dict(model), tmp)
        processor.save_pretrained(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _hub_error(source: str, exc: Exception, field: str = "model.base (or the stage's model input)") -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    why = "HF_HUB_OFFLINE is set" if offline else "no network or the id does not exist"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ModelLoadError(
        f"model source {source!r} is not a local folder or storage URI, and the Hugging Face hub is "
        f"unreachable ({why}: {first[:160]}); download it where a hub is reachable "
        f"(`hf download {source} --local-dir DIR`) and set {field} to DIR")


def _is_hub_id(source: str) -> bool:
    return "://" not in source and not source.startswith((".", "/", "~")) and source.count("/") == 1


def local_model_dir(source: str, store=None) -> Path | None:
    """A local folder for `source`, downloading storage URIs; None for a hub id."""
    if source.startswith("file://"):
        path = Path(source[len("file://"):])
    elif "://" in source:
        if store is None:
            from r4b_core.config import StorageConfig
            from r4b_core.storage import Store

            store = Store.from_config(StorageConfig())   # endpoint/credentials from AWS_* env
        cache = Path(os.environ.get("R4B_CACHE_DIR", "~/.cache/r4b")).expanduser() / "models"
        path = Path(store.local_path(source, cache))
    else:
        path = Path(source).expanduser()
        if not path.exists() and _is_hub_id(source):
            return None
    if not path.exists():
        raise ModelLoadError(f"model source {source!r}: {path} does not exist; point model.base (or the "
                             f"stage input) at a save_pretrained folder")
    if not (path / "config.json").exists():
        raise ModelLoadError(f"model source {source!r}: {path} has no config.json; it is not a "
                             f"save_pretrained model folder")
    return path


def ensure_think_tokens(model, processor) -> list[str]:
    """Make `<think>` and `</think>` single tokens when the family's vocabulary lacks them (Qwen2.5-VL,
    LLaVA-OneVision, SmolVLM, Gemma3 have none): added as ordinary tokens (they survive decoding
    with skip_special_tokens, as in Qwen3), the embedding matrix grown only if the vocabulary
    outgrows it (Qwen's padded rows are used first), and each new row (input and output side) set
    to the mean of the rows in use, so the new tokens start as an average token rather than noise
    or a zero vector that attention cannot tell apart. Returns the tokens added."""
    import torch
    from tokenizers import AddedToken

    from r4b_core import modes

    tok = getattr(processor, "tokenizer", processor)
    vocab = tok.get_vocab()
    missing = [t for t in (modes.THINK_OPEN, modes.THINK_CLOSE) if t not in vocab]
    if not missing:
        return []
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])
    new_ids = tok.convert_tokens_to_ids(missing)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    first_new = min(new_ids)
    with torch.no_grad():
        weights = {id(m.weight): m.weight for m in (model.get_input_embeddings(), model.get_output_embeddings())
                   if m is not None}
        for w in weights.values():
            w[new_ids] = w[:first_new].mean(0)
    return missing


def model_class(config):
    """The class that loads a folder: the one its `architectures` names, from transformers or r4b's
    own (R-4B's layout, models/rvl.py), when it takes the folder's config class; else the
    image-text-to-text Auto class of its model_type (remote code included, where trusted)."""
    import transformers
    from transformers import AutoModelForImageTextToText

    from r4b_core.models import rvl

    own = {rvl.ARCHITECTURE: rvl.RForConditionalGeneration}
    for name in getattr(config, "architectures", None) or []:
        cls = own.get(name) or getattr(transformers, name, None)
        if isinstance(cls, type) and isinstance(config, getattr(cls, "config_class", ()) or ()):
            return cls
    return AutoModelForImageTextToText


def load_processor(path: str | Path, model_cfg: ModelConfig):
    """The processor of a model folder (or hub id), with `model.min_pixels` / `model.max_pixels`
    where set: passed to the image processor, which must take a pixel budget (it says so in its
    accepted arguments: Qwen2-VL's image processor and its descendants); else a one-line refusal."""
    from transformers import AutoProcessor

    budget = {k: v for k, v in (("min_pixels", model_cfg.min_pixels), ("max_pixels", model_cfg.max_pixels))
              if v is not None}
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code, **budget)
    if budget:
        image_processor = getattr(processor, "image_processor", None)
        accepted = getattr(getattr(image_processor, "valid_kwargs", None), "__annotations__", {})
        if "max_pixels" not in accepted:
            raise ModelLoadError(f"model.min_pixels / model.max_pixels: {path}'s image processor "
                                 f"({type(image_processor).__name__}) takes no pixel budget (it resizes to "
                                 f"{getattr(image_processor, 'size', '?')}); leave them unset for this model")
    return processor


def _load_folder(path: str | Path, model_cfg: ModelConfig, dtype):
    import torch
    from transformers import AutoConfig

    trust = model_cfg.trust_remote_code
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust)
    model = model_class(config).from_pretrained(path, config=config, dtype=dtype or torch.float32,
                                                trust_remote_code=trust)
    processor = load_processor(path, model_cfg)
    ensure_think_tokens(model, processor)
    return model.eval(), processor


def compose_r4b(vision_source: str, lm_source: str, model_cfg: ModelConfig, dtype=None, store=None):
    """R-4B's layout (models/rvl.py) from a pretrained vision tower and a pretrained causal LM: the
    towers keep their weights, the projector (with its LayerNorm) and `image_newline` are fresh."""
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from r4b_core import modes
    from r4b_core.models import rvl
    from r4b_core.models.chat import R4B_TEMPLATE_MARK
    from r4b_core.models.tokenizer import chat_template, images_as_text

    dtype = dtype or torch.float32
    trust = model_cfg.trust_remote_code

    def fetch(src: str):
        local = local_model_dir(src, store)
        return str(local) if local is not None else src

    vision_src, lm_src = fetch(vision_source), fetch(lm_source)
    try:
        vision_full = AutoModel.from_pretrained(vision_src, dtype=dtype, trust_remote_code=trust)
        tower_processor = AutoImageProcessor.from_pretrained(vision_src)
        lm = AutoModelForCausalLM.from_pretrained(lm_src, dtype=dtype, trust_remote_code=trust)
        tokenizer = AutoTokenizer.from_pretrained(lm_src, trust_remote_code=trust)
    except OSError as exc:
        vision_missing = not Path(vision_src).exists()
        raise _hub_error(vision_source if vision_missing else lm_source, exc,
                         "model.vision_tower" if vision_missing else "model.language_model") from None
    # A dual-encoder checkpoint (SigLIP) carries a text tower too: keep the vision half. OneVision
    # takes the patch features, so the tower's pooling head (if any) would be dead weight.
    vision = getattr(vision_full, "vision_model", vision_full)
    vision_config = getattr(vision_full.config, "vision_config", vision_full.config)
    if getattr(vision, "head", None) is not None:
        del vision.head
        vision.use_head = vision_config.vision_use_head = False

    if modes.IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [modes.IMAGE_TOKEN]})
    # The LM's own chat template renders the turns (its images as text before each turn's text);
    # an LM without one gets r4b's, which is ChatML.
    own_template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if own_template and R4B_TEMPLATE_MARK in own_template:      # an LM r4b trained: ours, current
        own_template = None
    missing = [t for t in (modes.IM_START, modes.IM_END) if t not in tokenizer.get_vocab()]
    if not own_template and missing:
        raise ModelLoadError(f"model.language_model {lm_source!r}: its tokenizer has no chat template and "
                             f"lacks {missing} for r4b's ChatML one; use an LM with a chat template")
    if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(len(tokenizer))
    config = rvl.rvl_config(vision_config, lm.config, tokenizer.convert_tokens_to_ids(modes.IMAGE_TOKEN),
                            tie_word_embeddings=bool(getattr(lm.config, "tie_word_embeddings", False)))
    # Build the shell without allocating a second copy of the towers, then move the loaded ones in.
    with torch.device("meta"):
        model = rvl.RForConditionalGeneration(config)
    model.model.vision_tower = vision
    model.model.language_model = lm.model
    model.lm_head = lm.lm_head
    model.model.multi_modal_projector = rvl.RVLMultiModalProjector(config).to(dtype)
    model.model.image_newline = torch.nn.Parameter(
        torch.randn(config.text_config.hidden_size, dtype=dtype) / config.text_config.hidden_size ** 0.5)
    model.to(dtype)
    model.generation_config = lm.generation_config   # the LM's EOS ids and sampling defaults
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ModelLoadError(f"compose_r4b: parameters left unset: {leftover[:5]}")
    template = images_as_text(own_template, modes.IMAGE_TOKEN) if own_template else chat_template()
    processor = rvl.rvl_processor(tokenizer, config, tower_processor.image_mean, tower_processor.image_std, template)
    ensure_think_tokens(model, processor)
    return model.eval(), processor


def load_model(source: str | Path, model_cfg: ModelConfig | None = None, store=None, dtype=None):
    """Load (model, processor) from a folder, a storage URI, a HF model id, or compose one.

    `source` equal to a composition keyword (model.base: llava-onevision) with model.vision_tower and
    model.language_model set builds the paper-scale pair. `dtype` defaults to model.dtype.
    """
    model_cfg = model_cfg or ModelConfig()
    dtype = _torch_dtype(dtype or model_cfg.dtype)
    source = str(source)
    if source == "tiny":
        raise ModelLoadError("model source 'tiny' has no weights yet: build it first with "
                             "`r4b model init --out DIR` (models.tiny.build_tiny_vlm) and load DIR")
    if source in COMPOSED_BASES:
        if not (model_cfg.vision_tower and model_cfg.language_model):
            raise ModelLoadError(f"model.base {source!r} composes a model: set model.vision_tower and "
                                 f"model.language_model (e.g. google/siglip2-so400m-patch14-384, Qwen/Qwen3-4B)")
        return compose_r4b(model_cfg.vision_tower, model_cfg.language_model, model_cfg, dtype, store)
    local = local_model_dir(source, store)
    if local is not None:
        return _load_folder(local, model_cfg, dtype)
    try:
        return _load_folder(source, model_cfg, dtype)
    except OSError as exc:
        raise _hub_error(source, exc) from None
