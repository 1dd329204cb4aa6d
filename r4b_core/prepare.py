"""Stage 0 — prepare a run: publish the resolved config, the data splits and the base model.

    r4b prepare --config configs/tiny.yaml

- `config.yaml` under the run prefix: what every later task and PyTorchJob pod reads.
- data: the seeded synthetic visual-math splits (train / rl / eval) with their images, or the user's
  JSONL URIs as given (validated later by the stages that read them).
- base model: for `model.base: tiny`, a tokenizer trained on the training split and a randomly
  initialised tiny LLaVA-style VLM saved as an HF folder, then pretrained to read and compute when
  `model.pretrain.steps` > 0 (pretrain.py); for a composed base (`model.base: llava-onevision` with
  `model.vision_tower` + `model.language_model`) the pair composed once into R-4B's layout
  (models/rvl.py) and saved; otherwise the HF id / URI as given.

Every part is skipped when its manifest exists with the same config hash.
"""

from __future__ import annotations

import time
from pathlib import Path

from r4b_core import layout
from r4b_core.config import COMPOSED_BASES, ConfigError, RunConfig, dump_config
from r4b_core.identity import identity_hash, stage_identity


def data_hash(cfg: RunConfig) -> str:
    """The data stage's identity: data section, seed, model (the images are drawn at its size)."""
    return identity_hash(stage_identity(cfg, "data", {}))


def init_model_hash(cfg: RunConfig) -> str:
    """The tiny base as built: model section (less the pretraining that follows) and the data its
    tokenizer is trained on."""
    return identity_hash(stage_identity(cfg, "model", {"data": data_hash(cfg)}, ignore=("pretrain",)))


def prepare_data(cfg: RunConfig, store) -> dict[str, str]:
    splits = {s: layout.split_uri(cfg, s) for s in ("train", "rl", "eval")}
    if cfg.data.source != "synthetic":
        return splits
    from r4b_core.data.synthetic import generate_all

    prefix = layout.data_dir(cfg)
    if store.is_complete(prefix, data_hash(cfg)):
        return splits
    t0 = time.time()
    with store.atomic_dir(prefix) as staging:
        paths = generate_all(cfg.data.synthetic, Path(staging), image_size=cfg.model.tiny.image_size,
                             patch_size=cfg.model.tiny.patch_size)
        counts = {s: sum(1 for _ in open(p, encoding="utf-8")) for s, p in paths.items()}
    store.commit(prefix, {"stage": "data", "config_hash": data_hash(cfg), "source": "synthetic",
                          "splits": splits, "counts": counts, "seconds": round(time.time() - t0, 2)})
    return splits


def prepare_base_model(cfg: RunConfig, store, train_uri: str) -> str:
    """The base model's URI (layout.base_model_dir): a composed pair is built and saved once, so
    that every stage starts from the same weights (its projector is initialised here)."""
    if cfg.model.base in COMPOSED_BASES:
        return prepare_composed_model(cfg, store)
    if cfg.model.base != "tiny":
        return cfg.model.base
    from r4b_core.data.schema import parse_jsonl
    from r4b_core.data.synthetic import tokenizer_corpus
    from r4b_core.models.tiny import build_tiny_vlm

    prefix = layout.init_model_dir(cfg)
    model_hash = init_model_hash(cfg)
    if not store.is_complete(prefix, model_hash):
        records = parse_jsonl(store.read_bytes(train_uri), train_uri).records
        t0 = time.time()
        with store.atomic_dir(prefix) as staging:
            build_tiny_vlm(cfg.model.tiny, tokenizer_corpus(records), Path(staging), seed=cfg.seed)
        store.commit(prefix, {"stage": "base_model", "config_hash": model_hash, "kind": "tiny",
                              "tiny": cfg.model.tiny.model_dump(), "seconds": round(time.time() - t0, 2)})
    if cfg.model.pretrain.steps > 0:
        from r4b_core.pretrain import run_pretrain

        return run_pretrain(cfg, store, train_uri, prefix)
    return prefix


def prepare_composed_model(cfg: RunConfig, store) -> str:
    """model.vision_tower + model.language_model composed into R-4B's layout, saved at <run>/base_model."""
    import torch

    from r4b_core.models import rvl
    from r4b_core.models.loading import load_model, save_model

    prefix = layout.init_model_dir(cfg)
    # the architecture counts: a base composed before R-4B's layout (a plain LLaVA) is rebuilt
    model_hash = identity_hash(stage_identity(cfg, "model", {"architecture": rvl.ARCHITECTURE},
                                              ignore=("pretrain", "tiny")))
    if store.is_complete(prefix, model_hash):
        return prefix
    t0 = time.time()
    torch.manual_seed(cfg.seed)             # the projector's initialisation
    model, processor = load_model(cfg.model.base, cfg.model, store=store)
    with store.atomic_dir(prefix) as staging:
        save_model(model, processor, Path(staging))
    store.commit(prefix, {"stage": "base_model", "config_hash": model_hash, "kind": "composed",
                          "architecture": rvl.ARCHITECTURE, "vision_tower": cfg.model.vision_tower,
                          "language_model": cfg.model.language_model,
                          "seconds": round(time.time() - t0, 2)})
    return prefix


def run_prepare(cfg: RunConfig, store=None) -> dict[str, str]:
    """Publish config, data and base model; returns their URIs."""
    from r4b_core.bpo import check_bpo_config
    from r4b_core.storage import Store

    # Fail in the first minute, not after curation and annealing: BPO's arithmetic and what the
    # PyTorchJob launcher needs are known now.
    check_bpo_config(cfg)
    config_uri = layout.config_uri(cfg)
    if cfg.launcher.kind == "pytorchjob":
        from r4b_core.launch.pytorchjob import launch_problems

        problems = [p for stage in ("anneal", "bpo") for p in launch_problems(stage, config_uri, cfg)]
        if problems:
            raise ConfigError("\n".join(dict.fromkeys(problems)))
    store = store or Store.from_config(cfg.storage)
    store.write_text(config_uri, dump_config(cfg))
    splits = prepare_data(cfg, store)
    base = prepare_base_model(cfg, store, splits["train"])
    return {"config_uri": config_uri, **splits, "base_model": base}
