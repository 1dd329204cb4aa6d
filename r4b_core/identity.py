"""What a stage's output depends on: the one rule every stage uses to skip finished work and to
accept or refuse a checkpoint.

    ident = stage_identity(cfg, "bpo", {"prompts": uri, "init_model": lineage(store, init_uri)})
    if store.is_complete(out_uri, identity_hash(ident)): ...        # skip: done for this identity

An identity is the stage's config section, the seed and the model section, plus the stage's
inputs (URIs, and what produced them). Knobs of *how* a stage runs — checkpointing, logging,
probing, threads, the rollout engine — are listed in each section's `OPERATIONAL` (config.py) and
never count: changing them neither retrains a finished stage nor refuses a resume.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from r4b_core.config import RunConfig

# Bumped when the meaning of an identity changes, so that older manifests are not trusted.
IDENTITY_VERSION = 2


def stage_identity(cfg: RunConfig, section: str, inputs: dict[str, Any], ignore: Iterable[str] = ()) -> dict:
    """The stage's section (less its OPERATIONAL knobs and `ignore`), seed, model section and
    `inputs`. An input that is None is unknown: the identity then has no hash (never skips)."""
    values = getattr(cfg, section)
    left_out = set(type(values).OPERATIONAL) | set(ignore)
    ident = {"seed": cfg.seed, "model": cfg.model.model_dump(mode="json"), "inputs": dict(inputs)}
    ident[section] = {k: v for k, v in values.model_dump(mode="json").items() if k not in left_out}
    return ident


def identity_hash(ident: dict) -> str | None:
    """A short hash of an identity; None when one of its inputs is unknown."""
    if any(v is None for v in ident.get("inputs", {}).values()):
        return None
    blob = json.dumps({**ident, "v": IDENTITY_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def is_storage_uri(uri: str) -> bool:
    """A storage path/URI rather than a Hugging Face id ("org/name")."""
    from pathlib import Path

    return "://" in uri or Path(uri).is_absolute() or uri.startswith(".") or uri.count("/") != 1


def model_lineage(store, uri: str) -> str | None:
    """What identifies a model's weights: the config hash its folder was committed with (its
    manifest), the id itself for a Hugging Face id; None when unknown (a folder without manifest)."""
    from r4b_core.errors import R4BError

    if not is_storage_uri(uri):
        return uri
    try:
        manifest = store.read_manifest(uri)
    except R4BError:
        return None
    return (manifest or {}).get("config_hash")


def data_lineage(store, uri: str) -> str:
    """What identifies a data file's contents: the config hash of the stage that wrote it (the
    manifest of its folder), else the file's own sha256."""
    from r4b_core.errors import R4BError

    try:
        manifest = store.read_manifest(uri.rstrip("/").rsplit("/", 1)[0])
    except R4BError:
        manifest = None
    if manifest and manifest.get("config_hash"):
        return manifest["config_hash"]
    return hashlib.sha256(store.read_bytes(uri)).hexdigest()
