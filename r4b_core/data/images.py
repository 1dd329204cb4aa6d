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
import posixpath
from pathlib import Path
from typing import Any

from r4b_core.data.schema import DataError
from r4b_core.errors import R4BError


def _is_uri(ref: str) -> bool:
    return "://" in ref


def escapes(ref: str) -> bool:
    """True for a relative reference that climbs out of its JSONL's folder (`../x.png`)."""
    if _is_uri(ref) or Path(ref).is_absolute():
        return False
    return posixpath.normpath(ref.replace("\\", "/")).split("/")[0] == ".."


def resolve(ref: str, jsonl_path: str | Path | None = None) -> str:
    """The path or URI an image reference points at (relative refs are relative to the JSONL, and
    must stay inside its folder: DataError otherwise)."""
    if escapes(ref):
        raise DataError(f"{jsonl_path or '<jsonl>'}: image {ref!r} points outside the data folder; keep images "
                        "next to the JSONL (e.g. images/x.png) or give an absolute path or URI")
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
                            "that the data was copied with its images/ folder") from exc
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


def check_images(records, rows, jsonl_path: str, store: Any) -> tuple[list, int, str | None]:
    """(BadLine per unusable image reference, images checked, a note on images not checked) for the
    records of one JSONL file (`rows`: their (line number, text), as parse_jsonl returns them):
    each reference must stay inside the data folder, exist and decode. Each distinct image is read
    once. After an object store fails to answer, its other images are not tried (each would wait
    out the storage timeouts); one line says how many were skipped."""
    from r4b_core.data.schema import BadLine
    from r4b_core.storage import StorageError, StorageNotFoundError, is_s3

    bad, seen, skipped, dead_endpoint = [], {}, 0, None
    for rec, (lineno, raw) in zip(records, rows):
        for i, ref in enumerate(rec.images):
            try:
                target = resolve(ref, jsonl_path)
            except DataError:
                bad.append(BadLine(jsonl_path, lineno, f"images[{i}]", f"{ref!r} points outside the data folder; "
                                   "keep images next to the JSONL or give an absolute path or URI", raw))
                continue
            if is_s3(target) and dead_endpoint is not None:
                skipped += 1
                continue
            if target not in seen:
                try:
                    load_image(target, store=store)
                    seen[target] = None
                except DataError as exc:
                    cause = exc.__cause__
                    seen[target] = str(exc)
                    if is_s3(target) and isinstance(cause, StorageError) and not isinstance(cause, StorageNotFoundError):
                        dead_endpoint = target
            if seen[target] is not None:
                bad.append(BadLine(jsonl_path, lineno, f"images[{i}]", seen[target], raw))
    note = (f"{skipped} more s3:// images not checked: the object store did not answer for {dead_endpoint}"
            if skipped else None)
    return bad, len(seen), note
