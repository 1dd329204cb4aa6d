"""Open the images a record refers to, wherever they live.

A record's `images` entries are paths relative to its JSONL file (what the synthetic generator
writes: `images/train-00001.png`), absolute paths, `file://` URIs, or `s3://bucket/key` URIs. A
relative entry of a JSONL that itself lives in S3 resolves to an S3 URI next to it.

    from r4b_core.data.images import load_image
    img = load_image(rec.images[0], jsonl_path="runs/tiny/data/train.jsonl")     # PIL RGB
    img = load_image("s3://bucket/run/data/images/x.png", store=Store.from_config(cfg.storage))

A missing or unreadable image raises `DataError` naming the record file, the reference and the
place looked at, with the fix.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from r4b_core.data.schema import DataError
from r4b_core.errors import R4BError


def _is_uri(ref: str) -> bool:
    return "://" in ref


def resolve(ref: str, jsonl_path: str | Path | None = None) -> str:
    """The path or URI an image reference points at (relative refs are relative to the JSONL)."""
    if _is_uri(ref) or Path(ref).is_absolute() or jsonl_path is None:
        return ref
    base = str(jsonl_path)
    if _is_uri(base):
        return base.rsplit("/", 1)[0] + "/" + ref.lstrip("/")
    return str(Path(base).parent / ref)


def load_image(ref: str, jsonl_path: str | Path | None = None, store: Any = None):
    """Open one image as a PIL RGB image (fully loaded, file closed).

    `store`: an `r4b_core.storage.Store`; when given, every read goes through it (local paths,
    `file://` and `s3://` alike); without one only local files can be read.
    """
    from PIL import Image

    where = f"{jsonl_path}: " if jsonl_path is not None else ""
    target = resolve(ref, jsonl_path)
    if store is not None:
        try:
            data = store.read_bytes(target)
        except (R4BError, OSError) as exc:
            raise DataError(f"{where}image {ref!r}: cannot read {target} ({exc}); check the reference and "
                            "that the data was copied with its images/ folder") from None
    elif _is_uri(target) and not target.startswith("file://"):
        raise DataError(f"{where}image {ref!r} is at {target}, which needs a storage.Store; pass "
                        "store=Store.from_config(cfg.storage) to load_image")
    else:
        p = Path(target.removeprefix("file://"))
        if not p.is_file():
            hint = ("relative references are resolved against the JSONL file; pass jsonl_path"
                    if jsonl_path is None and not p.is_absolute() else
                    "regenerate the data (r4b data generate) or fix the record's images entry")
            raise DataError(f"{where}image {ref!r} not found (looked at {p}); {hint}")
        data = p.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{where}image {ref!r} ({target}) is not a readable image ({exc}); "
                        "replace the file or drop the record") from None
