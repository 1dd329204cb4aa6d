"""Storage: one small API over local folders and S3, with atomic stage outputs.

Every stage reads and writes through a `Store`, so the same code runs on a laptop (plain paths or
`file://` URIs) and on a cluster (`s3://bucket/key`, any S3-compatible server):

    store = Store.from_config(cfg.storage)
    out = store.join(cfg.run_uri(), "anneal")
    if store.is_complete(out, config_hash):               # the stage's identity (identity.py)
        return                                            # finished before: skip
    ...                                                   # the work: nothing written to `out` yet
    store.invalidate(out)                                 # an old manifest must not vouch for new files,
    store.write_text(store.join(out, "log.txt"), "...")   # so it goes just before they are written
    store.commit(out, {"config_hash": config_hash, "outputs": [...]})

    with store.atomic_dir(store.join(out, "checkpoints", "step-000100")) as tmp:
        model.save_pretrained(tmp)                        # visible only if the block succeeds
    latest = store.list_complete(store.join(out, "checkpoints"))[-1]

Guarantees:
- a stage is complete only once `manifest.json` exists with the stage's config hash; the manifest
  is written last (local: temp file + `os.replace`; S3: a single PUT, which is atomic);
- `atomic_dir` content appears all at once (local: rename of a staging folder; S3: upload, then a
  `_COMPLETE` marker object), and an exception inside the block leaves nothing visible; the
  marker lists every file with its sha256, which `verify_dir` checks a copy against;
- S3 calls are retried with exponential backoff on connection errors, timeouts, 5xx and
  throttling, up to `StorageConfig.max_attempts` and within `retry_budget_s` (the defaults wait
  >= 30 s for a server that refuses connections, and give up on one that accepts but never
  answers after about a minute: three 20 s read timeouts);
- failures raise `StorageError`, one line naming the URI, the operation and the fix.

S3 credentials come only from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and
`AWS_SESSION_TOKEN`); the endpoint from `storage.s3_endpoint_url`, else `AWS_ENDPOINT_URL_S3`, else
`AWS_ENDPOINT_URL` (unset = AWS).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from r4b_core.errors import R4BError, decode_utf8

if TYPE_CHECKING:
    from r4b_core.config import StorageConfig

log = logging.getLogger("r4b.storage")

MANIFEST = "manifest.json"
COMPLETE_MARKER = "_COMPLETE"
# Staging files and folders carry this tag; listings skip them so a half-written file is never seen.
TMP_TAG = ".r4b-tmp-"
_MiB = 1024 * 1024
_T = TypeVar("_T")


class StorageError(R4BError):
    """A storage operation that failed; the message names the URI, the operation and the fix."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object, file or folder does not exist."""


# ---------------------------------------------------------------------------------------------
# URIs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # no leading slash; "" = the bucket root

    @property
    def folder_prefix(self) -> str:
        """Key prefix of everything *under* this location (so `a/b` never matches `a/bc`)."""
        return self.key.rstrip("/") + "/" if self.key.strip("/") else ""


def is_s3(uri: str | os.PathLike) -> bool:
    return isinstance(uri, str) and uri.startswith("s3://")


def parse_uri(uri: str | os.PathLike) -> Path | S3Location:
    """A local `Path` for plain paths and `file://` URIs, an `S3Location` for `s3://bucket/key`."""
    if isinstance(uri, os.PathLike):
        return Path(uri)
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"{uri!r}: not a storage URI; use a local path, file:///abs/path or s3://bucket/key")
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket:
            raise StorageError(f"{uri}: no bucket name; write s3://BUCKET/key")
        return S3Location(bucket, key.lstrip("/"))
    if uri.startswith("file://"):
        rest = uri[len("file://"):]
        if rest.startswith("localhost/"):
            rest = rest[len("localhost"):]
        # file:///abs is absolute; file://rel (not standard, but handy in configs) is relative.
        # Percent-escapes are decoded, as Path.as_uri() writes them ("my%20dir").
        return Path(urllib.parse.unquote(rest) or ".")
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"{uri}: unsupported scheme {scheme!r}; use a local path, file:///abs/path or s3://bucket/key")
    return Path(uri)


def absolute_uri(uri: str | os.PathLike) -> str:
    """A URI that means the same from any directory or machine: `s3://...` as it is, a local path
    (plain, `file://rel` or `file:///abs`) as `file:///abs/path` (what a model registry records)."""
    loc = parse_uri(uri)
    return loc.resolve().as_uri() if isinstance(loc, Path) else str(uri)


def join(uri: str | os.PathLike, *parts: str) -> str:
    """Append path parts to a URI, keeping its form: join("s3://b/run", "anneal") == "s3://b/run/anneal"."""
    out = os.fspath(uri)
    for part in parts:
        part = str(part).strip("/")
        if part:
            out = (out if out.endswith("/") else out + "/") + part
    return out


def local_dir_of(uri: str | os.PathLike) -> Path:
    """The local folder of a `file://` URI or plain path (StorageError for `s3://`)."""
    loc = parse_uri(uri)
    if isinstance(loc, S3Location):
        raise StorageError(f"{uri}: an S3 URI has no local folder; use Store.local_path(uri, cache_dir)")
    return loc


def _is_tmp(name: str) -> bool:
    return TMP_TAG in name


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------
# Local atomic primitives
# ---------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_local(path: Path, data: bytes | None = None, *, src: Path | None = None,
                        durable: bool = False) -> None:
    """Write `data` (or copy `src`) to a temp file next to `path`, fsync, then rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_TAG}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if src is not None:
                with open(src, "rb") as s:
                    shutil.copyfileobj(s, f, 4 * _MiB)
            else:
                f.write(data or b"")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        _fsync_dir(path.parent)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _file_in_the_way(folder: Path) -> Path | None:
    """`folder` itself or its nearest existing parent, when that is a file rather than a folder."""
    for path in (folder, *folder.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * _MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def _remove_local(path: Path) -> None:
    """Remove a file, link or folder tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _replace_dir(staging: Path, target: Path) -> None:
    """Put `staging` at `target`; an old `target` (folder or file) is swapped out in one step, then removed."""
    if not target.exists() and not target.is_symlink():
        os.rename(staging, target)
    elif _exchange(staging, target):
        _remove_local(staging)  # now holds the old content
    else:
        # Two renames: a crash in between leaves the old copy under its .r4b-tmp- name, never mixed.
        old = target.with_name(f".{target.name}{TMP_TAG}old-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(target, old)
        os.rename(staging, target)
        _remove_local(old)
    _fsync_dir(target.parent)


# ---------------------------------------------------------------------------------------------
# Error classification for S3
# ---------------------------------------------------------------------------------------------
_THROTTLE_CODES = {"Throttling", "ThrottlingException", "SlowDown", "RequestTimeout",
                   "RequestLimitExceeded", "TooManyRequests", "ServiceUnavailable", "InternalError"}
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
               "ExpiredToken", "AuthorizationHeaderMalformed", "InvalidSecurity"}


def _root_cause(exc: BaseException) -> BaseException:
    """boto3 wraps transfer failures (S3UploadFailedError); look through to the botocore error."""
    seen = 0
    while seen < 5:
        inner = exc.__cause__ or exc.__context__
        name = type(exc).__name__
        if inner is None or name not in {"S3UploadFailedError", "S3TransferFailedError", "RetriesExceededError"}:
            return exc
        exc, seen = inner, seen + 1
    return exc


def _classify(exc: BaseException) -> tuple[str, str, int]:
    """(kind, error code, HTTP status) with kind in retry / notfound / nobucket / auth / creds / other."""
    import botocore.exceptions as bex

    exc = _root_cause(exc)
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return "creds", type(exc).__name__, 0
    if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError)):
        return "retry", type(exc).__name__, 0
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code == "NoSuchBucket":
            return "nobucket", code, status
        if code in {"NoSuchKey", "404", "NotFound"} or status == 404:
            return "notfound", code, status
        if code in _AUTH_CODES or status == 403:
            return "auth", code, status
        if status >= 500 or status == 429 or code in _THROTTLE_CODES:
            return "retry", code, status
        return "other", code, status
    if type(exc).__name__ == "RetriesExceededError":  # s3transfer download stream errors
        return "retry", type(exc).__name__, 0
    return "other", type(exc).__name__, 0


class _NoCredentials(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------
class Store:
    """Read/write/list local paths and S3 URIs; atomic stage commits and atomic folders."""

    def __init__(self, *, s3_endpoint_url: str | None = None, s3_region: str = "us-east-1",
                 max_attempts: int = 8, multipart_threshold_mb: int = 64,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 10.0,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 20.0,
                 retry_budget_s: float = 60.0) -> None:
        self.endpoint_url = (s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                             or os.environ.get("AWS_ENDPOINT_URL") or None)
        self.region = s3_region
        self.max_attempts = max(1, int(max_attempts))
        self.multipart_threshold = int(multipart_threshold_mb) * _MiB
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.retry_budget_s = retry_budget_s
        # Number of S3 attempts that failed and were retried (reported in stage logs/metrics).
        self.retries = 0
        self._client: Any = None
        self._client_lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: StorageConfig, **overrides: Any) -> Store:
        kwargs: dict[str, Any] = dict(s3_endpoint_url=cfg.s3_endpoint_url, s3_region=cfg.s3_region,
                                      max_attempts=cfg.max_attempts,
                                      multipart_threshold_mb=cfg.multipart_threshold_mb,
                                      connect_timeout_s=cfg.connect_timeout_s, read_timeout_s=cfg.read_timeout_s,
                                      retry_budget_s=cfg.retry_budget_s)
        kwargs.update(overrides)
        return cls(**kwargs)

    join = staticmethod(join)

    # -- S3 plumbing -------------------------------------------------------------------------
    @property
    def _endpoint_name(self) -> str:
        return self.endpoint_url or "AWS S3"

    def _s3(self) -> Any:
        with self._client_lock:
            if self._client is None:
                key = os.environ.get("AWS_ACCESS_KEY_ID")
                secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
                if not key or not secret:
                    raise _NoCredentials()
                import boto3
                from botocore.config import Config

                extra: dict[str, Any] = {}
                if self.endpoint_url:
                    # Non-AWS servers (SeaweedFS, MinIO, Ceph): path-style URLs and only the
                    # checksums S3 requires.
                    extra = dict(s3={"addressing_style": "path"},
                                 request_checksum_calculation="when_required",
                                 response_checksum_validation="when_required")
                session = boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret,
                                                aws_session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
                                                region_name=self.region)
                # Retries are ours (`_call`), so botocore makes exactly one attempt per call.
                config = Config(retries={"total_max_attempts": 1, "mode": "standard"},
                                connect_timeout=self.connect_timeout_s, read_timeout=self.read_timeout_s,
                                signature_version="s3v4", **extra)
                self._client = session.client("s3", endpoint_url=self.endpoint_url, config=config)
            return self._client

    @property
    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        chunk = max(self.multipart_threshold, 5 * _MiB)  # S3 parts are at least 5 MiB
        return TransferConfig(multipart_threshold=self.multipart_threshold, multipart_chunksize=chunk,
                              max_concurrency=4, use_threads=True)

    def _call(self, op: str, uri: str, fn: Callable[[], _T]) -> _T:
        """Run one S3 operation with retries; turn failures into a one-line StorageError."""
        start = time.monotonic()
        spent = 0.0   # seconds charged to the retry budget
        for attempt in range(1, self.max_attempts + 1):
            began = time.monotonic()
            try:
                return fn()
            except _NoCredentials:
                raise StorageError(
                    f"{uri}: {op}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                    f"(on a cluster, mount the credentials Secret as environment variables)") from None
            except Exception as exc:  # noqa: BLE001 - classified below, re-raised as StorageError
                kind, code, status = _classify(exc)
                # An attempt counts at most one connect + read timeout: longer, it was moving data.
                spent += min(time.monotonic() - began, self.connect_timeout_s + self.read_timeout_s)
                # Jitter: many ranks must not retry in lockstep.
                delay = self.backoff_delay(attempt) * random.uniform(0.75, 1.0)
                if kind == "retry" and attempt < self.max_attempts and spent + delay < self.retry_budget_s:
                    spent += delay
                    self.retries += 1
                    log.warning("%s: %s attempt %d/%d failed (%s); retrying in %.1f s",
                                uri, op, attempt, self.max_attempts, code or type(exc).__name__, delay)
                    time.sleep(delay)
                    continue
                raise self._error(op, uri, exc, kind, code, status, attempt, time.monotonic() - start) from exc
        raise AssertionError("unreachable")

    def backoff_delay(self, attempt: int) -> float:
        """Nominal wait after failed attempt `attempt` (1-based), before jitter (x0.75..1)."""
        return min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))

    def _error(self, op: str, uri: str, exc: BaseException, kind: str, code: str, status: int,
               attempts: int, elapsed: float) -> StorageError:
        ep = self._endpoint_name
        loc = parse_uri(uri)
        bucket = loc.bucket if isinstance(loc, S3Location) else "?"
        if kind == "notfound":
            return StorageNotFoundError(f"{uri}: {op}: no such object at {ep}")
        if kind == "nobucket":
            return StorageError(f"{uri}: {op}: bucket {bucket!r} does not exist at {ep}; "
                                f"create it or fix storage.root")
        if kind == "auth":
            return StorageError(f"{uri}: {op}: refused by {ep} ({code or status}); the access key or secret "
                                f"key is wrong or lacks permission: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
        if kind == "creds":
            return StorageError(f"{uri}: {op}: no usable S3 credentials ({code}); set AWS_ACCESS_KEY_ID "
                                f"and AWS_SECRET_ACCESS_KEY")
        if kind == "retry" and "Timeout" in code:
            return StorageError(f"{uri}: {op}: endpoint {ep} did not answer: {attempts} attempts over {elapsed:.0f} s "
                                f"({code}; storage.connect_timeout_s={self.connect_timeout_s:g}, read_timeout_s="
                                f"{self.read_timeout_s:g}, retry_budget_s={self.retry_budget_s:g}); check that the "
                                "server is healthy and storage.s3_endpoint_url points at its S3 port")
        if kind == "retry" and status == 0:
            return StorageError(f"{uri}: {op}: endpoint {ep} unreachable after {attempts} attempts over "
                                f"{elapsed:.0f} s ({code}; storage.retry_budget_s={self.retry_budget_s:g}); check "
                                f"storage.s3_endpoint_url / AWS_ENDPOINT_URL_S3 and that the server is up")
        if kind == "retry":
            return StorageError(f"{uri}: {op}: {ep} kept failing ({status} {code}) after {attempts} attempts "
                                f"over {elapsed:.0f} s; check the server's health, or raise storage.max_attempts")
        detail = _one_line(exc)
        return StorageError(f"{uri}: {op} failed at {ep}: {detail}")

    def _list_objects(self, loc: S3Location, uri: str, *, recursive: bool = True,
                      op: str = "list") -> tuple[list[dict], list[str]]:
        """(objects under the folder `loc`, immediate sub-prefixes when not recursive)."""
        prefix = loc.folder_prefix

        def go() -> tuple[list[dict], list[str]]:
            paginator = self._s3().get_paginator("list_objects_v2")
            kwargs: dict[str, Any] = dict(Bucket=loc.bucket, Prefix=prefix)
            if not recursive:
                kwargs["Delimiter"] = "/"
            objects, dirs = [], []
            for page in paginator.paginate(**kwargs):
                objects.extend(page.get("Contents", []))
                dirs.extend(p["Prefix"] for p in page.get("CommonPrefixes", []))
            return objects, dirs

        return self._call(op, uri, go)

    def _head(self, loc: S3Location, uri: str, op: str) -> dict | None:
        def go() -> dict | None:
            try:
                return self._s3().head_object(Bucket=loc.bucket, Key=loc.key)
            except Exception as exc:
                if _classify(exc)[0] == "notfound":
                    return None
                raise

        return self._call(op, uri, go)

    # -- bytes and text ------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        loc = parse_uri(uri)
        if isinstance(loc, Path):
            try:
                return loc.read_bytes()
            except FileNotFoundError:
                raise StorageNotFoundError(f"{uri}: read: no such file") from None
            except IsADirectoryError:
                raise StorageError(f"{uri}: read: is a folder, not a file; list() it instead") from None
        self._need_key(loc, uri, "read")
        return self._call("read", uri, lambda: self._s3().get_object(Bucket=loc.bucket, Key=loc.key)["Body"].read())

    def write_bytes(self, uri: str, data: bytes) -> None:
        loc = parse_uri(uri)
        if isinstance(loc, Path):
            _atomic_write_local(loc, bytes(data))
            return
        self._need_key(loc, uri, "write")
        if len(data) > self.multipart_threshold:
            self._call("write", uri, lambda: self._s3().upload_fileobj(
                io.BytesIO(data), loc.bucket, loc.key, Config=self._transfer))
        else:
            self._call("write", uri, lambda: self._s3().put_object(Bucket=loc.bucket, Key=loc.key, Body=data))

    def read_text(self, uri: str) -> str:
        """The UTF-8 text of a file; StorageError `uri:line: not UTF-8 at byte N` otherwise."""
        try:
            return decode_utf8(self.read_bytes(uri), uri)
        except StorageError:
            raise
        except R4BError as exc:
            raise StorageError(str(exc)) from None

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def read_json(self, uri: str) -> Any:
        text = self.read_text(uri)
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise StorageError(f"{uri}:{exc.lineno}: not valid JSON ({exc.msg})") from None

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    @staticmethod
    def _need_key(loc: S3Location, uri: str, op: str) -> None:
        if not loc.key or loc.key.endswith("/"):
            raise StorageError(f"{uri}: {op}: names a bucket or folder, not an object; add a file name")

    # -- listing -------------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        """True for an existing file/object, or a folder/prefix with at least one object under it."""
        loc = parse_uri(uri)
        if isinstance(loc, Path):
            return loc.exists()
        if loc.key and not loc.key.endswith("/") and self._head(loc, uri, "exists") is not None:
            return True

        def any_under() -> bool:
            resp = self._s3().list_objects_v2(Bucket=loc.bucket, Prefix=loc.folder_prefix, MaxKeys=1)
            return bool(resp.get("Contents"))

        return self._call("exists", uri, any_under)

    def list(self, prefix: str, recursive: bool = True) -> list[str]:
        """URIs under the folder `prefix`, sorted, in the same form as `prefix`.

        Recursive: every file. Not recursive: the immediate files and sub-folders, folders ending
        in "/". Staging files (".r4b-tmp-") are never listed. A missing folder lists as [].
        """
        loc = parse_uri(prefix)
        if isinstance(loc, Path):
            if not loc.is_dir():
                return []
            out = []
            if recursive:
                for root, dirs, files in os.walk(loc):
                    dirs[:] = [d for d in dirs if not _is_tmp(d)]
                    rel_root = Path(root).relative_to(loc)
                    out += [join(prefix, (rel_root / f).as_posix()) for f in files if not _is_tmp(f)]
            else:
                for child in loc.iterdir():
                    if not _is_tmp(child.name):
                        out.append(join(prefix, child.name) + ("/" if child.is_dir() else ""))
            return sorted(out)
        objects, dirs = self._list_objects(loc, prefix, recursive=recursive)
        base = loc.folder_prefix
        out = [join(prefix, o["Key"][len(base):]) for o in objects if not _is_tmp(o["Key"])]
        out += [join(prefix, d[len(base):]) + "/" for d in dirs if not _is_tmp(d)]
        return sorted(out)

    def delete(self, uri: str) -> int:
        """Remove a file/object, or a whole folder/prefix. Returns how many files were removed;
        a missing target is not an error (deleting is idempotent)."""
        loc = parse_uri(uri)
        if isinstance(loc, Path):
            if loc.is_dir() and not loc.is_symlink():
                n = sum(len(files) for _, _, files in os.walk(loc))
                shutil.rmtree(loc)
                return n
            try:
                loc.unlink()
                return 1
            except FileNotFoundError:
                return 0
        if not loc.key.strip("/"):
            raise StorageError(f"{uri}: delete: refusing to empty a whole bucket; name a folder inside it")
        keys = [o["Key"] for o in self._list_objects(loc, uri, op="delete")[0]]
        if not loc.key.endswith("/") and self._head(loc, uri, "delete") is not None:
            keys.append(loc.key)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i:i + 1000]]

            def go(batch: list = batch) -> None:
                resp = self._s3().delete_objects(Bucket=loc.bucket, Delete={"Objects": batch, "Quiet": True})
                if resp.get("Errors"):
                    e = resp["Errors"][0]
                    raise StorageError(f"{uri}: delete: {len(resp['Errors'])} objects not deleted, "
                                       f"first {e.get('Key')}: {e.get('Code')} {e.get('Message')}")

            self._call("delete", uri, go)
        return len(keys)

    # -- files and folders ----------------------------------------------------------------------
    def upload_file(self, local_path: str | os.PathLike, uri: str) -> None:
        src = Path(local_path)
        if not src.is_file():
            raise StorageNotFoundError(f"{src}: upload to {uri}: no such local file")
        loc = parse_uri(uri)
        if isinstance(loc, Path):
            _atomic_write_local(loc, src=src)
            return
        self._need_key(loc, uri, "upload")
        self._call("upload", uri, lambda: self._s3().upload_file(str(src), loc.bucket, loc.key, Config=self._transfer))

    def download_file(self, uri: str, local_path: str | os.PathLike) -> Path:
        dst = Path(local_path)
        loc = parse_uri(uri)
        if isinstance(loc, Path):
            if not loc.is_file():
                raise StorageNotFoundError(f"{uri}: download: no such file")
            _atomic_write_local(dst, src=loc)
            return dst
        self._need_key(loc, uri, "download")
        dst.parent.mkdir(parents=True, exist_ok=True)
        # s3transfer writes a temp file and renames it, so `dst` is never half-written.
        self._call("download", uri, lambda: self._s3().download_file(loc.bucket, loc.key, str(dst), Config=self._transfer))
        return dst

    def upload_dir(self, local_dir: str | os.PathLike, uri: str) -> int:
        """Copy every file under `local_dir` to the folder `uri`; returns the file count."""
        src = Path(local_dir)
        if not src.is_dir():
            raise StorageNotFoundError(f"{src}: upload to {uri}: no such local folder")
        n = 0
        for root, dirs, files in os.walk(src):
            dirs[:] = sorted(d for d in dirs if not _is_tmp(d))
            for f in sorted(files):
                if _is_tmp(f):
                    continue
                path = Path(root) / f
                self.upload_file(path, join(uri, path.relative_to(src).as_posix()))
                n += 1
        return n

    def download_dir(self, uri: str, local_dir: str | os.PathLike) -> int:
        """Copy every file under the folder `uri` into `local_dir`; returns the file count."""
        dst = Path(local_dir)
        files = self.list(uri, recursive=True)
        if not files and not self.exists(uri):
            raise StorageNotFoundError(f"{uri}: download: no such folder")
        base = uri if uri.endswith("/") else uri + "/"
        for f in files:
            self.download_file(f, dst / f[len(base):])
        dst.mkdir(parents=True, exist_ok=True)
        return len(files)

    def local_path(self, uri: str, cache_dir: str | os.PathLike) -> Path:
        """A local path for `uri`: a local path as-is; an S3 object or folder downloaded into
        `cache_dir/<bucket>/<key>` (reused while the remote ETags are unchanged)."""
        loc = parse_uri(uri)
        if isinstance(loc, Path):
            if not loc.exists():
                raise StorageNotFoundError(f"{uri}: no such file or folder")
            return loc
        dest = Path(cache_dir) / loc.bucket / loc.key.strip("/")
        stamp = dest.with_name(f".{dest.name}.r4b-source.json")
        head = self._head(loc, uri, "download") if loc.key and not loc.key.endswith("/") else None
        if head is not None:
            source = {"": head.get("ETag", ""), "size": head.get("ContentLength")}
        else:
            objects = self._list_objects(loc, uri, op="download")[0]
            if not objects:
                raise StorageNotFoundError(f"{uri}: download: no such object or folder at {self._endpoint_name}")
            base = loc.folder_prefix
            source = {o["Key"][len(base):]: o.get("ETag", "") for o in objects}
        with contextlib.suppress(OSError, ValueError):
            if dest.exists() and json.loads(stamp.read_text()) == source:
                return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        if head is not None:
            self.download_file(uri, dest)
        else:
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}{TMP_TAG}", dir=dest.parent))
            try:
                self.download_dir(uri, staging)
                os.chmod(staging, 0o755)
                _replace_dir(staging, dest)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        _atomic_write_local(stamp, json.dumps(source, sort_keys=True).encode())
        return dest

    # -- stage commits -------------------------------------------------------------------------
    def commit(self, prefix: str, manifest: dict) -> str:
        """Mark the stage output at `prefix` complete by writing `manifest.json` last.

        `manifest` must carry the stage's `config_hash`; `committed_at` is added. Returns the
        manifest URI.
        """
        if not isinstance(manifest, dict) or not manifest.get("config_hash"):
            raise StorageError(f"{join(prefix, MANIFEST)}: commit: the manifest needs a non-empty 'config_hash' "
                               "(identity_hash of the stage's identity, identity.py) so reruns can be skipped safely")
        body = {**manifest, "committed_at": manifest.get("committed_at") or _now()}
        uri = join(prefix, MANIFEST)
        data = (json.dumps(body, indent=2, sort_keys=True, default=str) + "\n").encode()
        loc = parse_uri(uri)
        if isinstance(loc, Path):
            _atomic_write_local(loc, data, durable=True)
        else:
            self.write_bytes(uri, data)
        return uri

    def invalidate(self, prefix: str) -> bool:
        """Remove the stage's manifest before (re)writing its outputs, so files from a new attempt
        are never vouched for by an old manifest. True if there was one."""
        return self.delete(join(prefix, MANIFEST)) > 0

    def read_manifest(self, prefix: str) -> dict | None:
        uri = join(prefix, MANIFEST)
        try:
            manifest = self.read_json(uri)
        except StorageNotFoundError:
            return None
        if not isinstance(manifest, dict):
            raise StorageError(f"{uri}: manifest is not a JSON object; delete it to re-run the stage")
        return manifest

    def is_complete(self, prefix: str, config_hash: str) -> bool:
        """True when `prefix` has a manifest written for this exact config hash."""
        manifest = self.read_manifest(prefix)
        return manifest is not None and manifest.get("config_hash") == config_hash

    # -- atomic folders (checkpoints) ---------------------------------------------------------------
    @contextlib.contextmanager
    def atomic_dir(self, uri: str) -> Iterator[Path]:
        """A local staging folder whose content appears at `uri` only if the block exits cleanly.

        Local: the staging folder sits next to the target and is renamed into place (an old
        folder is swapped out atomically, then removed). S3: files are uploaded, then a
        `_COMPLETE` marker is written; an old folder loses its marker first and its stale files
        after. Both get the marker, so `list_complete` works the same everywhere.
        """
        loc = parse_uri(uri)
        if isinstance(loc, Path):
            # Refused before any work: a file there is someone's data, not an older folder.
            blocker = _file_in_the_way(loc)
            if blocker is not None:
                raise StorageError(f"{uri}: publish folder: the file {blocker} is in the way; move or delete it, "
                                   "or choose another output path")
            loc.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{loc.name}{TMP_TAG}", dir=loc.parent))
        else:
            staging = Path(tempfile.mkdtemp(prefix="r4b-atomic-"))
        try:
            yield staging
            marker = self._marker(staging)
            if isinstance(loc, Path):
                _atomic_write_local(staging / COMPLETE_MARKER, marker)
                os.chmod(staging, 0o755)  # mkdtemp makes 0700; readers (sidecars) may be other users
                _replace_dir(staging, loc)
            else:
                self._publish_s3(staging, uri, marker)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @staticmethod
    def _marker(staging: Path) -> bytes:
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*")
                       if p.is_file() and p.name != COMPLETE_MARKER)
        sha256 = {name: _sha256_file(staging / name) for name in files}
        return (json.dumps({"completed_at": _now(), "files": files, "sha256": sha256}, indent=2) + "\n").encode()

    def verify_dir(self, uri: str, local: str | os.PathLike) -> list[str]:
        """Problems of the local copy `local` of the folder `uri` against the checksums its
        `_COMPLETE` marker lists (one per damaged or missing file; [] when all match, or for a
        folder written before markers carried checksums)."""
        marker = self.read_json(join(uri, COMPLETE_MARKER))
        sums = marker.get("sha256") if isinstance(marker, dict) else None
        if not isinstance(sums, dict):
            return []
        problems = []
        for name, expected in sorted(sums.items()):
            path = Path(local) / name
            if not path.is_file():
                problems.append(f"{name}: missing")
            elif _sha256_file(path) != expected:
                problems.append(f"{name}: content differs from its checksum in {COMPLETE_MARKER} "
                                f"({path.stat().st_size} bytes now)")
        return problems

    def move(self, src: str, dst: str) -> None:
        """Move the folder or file `src` to `dst` (local: one rename; S3: copy, then delete)."""
        loc, target = parse_uri(src), parse_uri(dst)
        if isinstance(loc, Path) != isinstance(target, Path):
            raise StorageError(f"{src}: move to {dst}: both must be local or both s3://")
        if isinstance(loc, Path):
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(loc, target)
            return
        objects = self._list_objects(loc, src, op="move")[0]
        base = loc.folder_prefix
        keys = [(o["Key"], o["Key"][len(base):]) for o in objects]
        if not keys and self._head(loc, src, "move") is not None:
            keys = [(loc.key, "")]
        for key, rel in keys:
            dest = join(dst, rel) if rel else dst
            dloc = parse_uri(dest)
            self._call("move", src, lambda key=key, dloc=dloc: self._s3().copy(
                {"Bucket": loc.bucket, "Key": key}, dloc.bucket, dloc.key, Config=self._transfer))
        self.delete(src)

    def _publish_s3(self, staging: Path, uri: str, marker: bytes) -> None:
        marker_uri = join(uri, COMPLETE_MARKER)
        # An old folder here stops counting as complete (marker) or committed (manifest) before
        # any of its files change.
        self.delete(marker_uri)
        self.delete(join(uri, MANIFEST))
        old = set(self.list(uri))
        self.upload_dir(staging, uri)
        new = {join(uri, p.relative_to(staging).as_posix()) for p in staging.rglob("*") if p.is_file()}
        for stale in sorted(old - new - {marker_uri}):
            self.delete(stale)
        self.write_bytes(marker_uri, marker)

    def is_dir_complete(self, uri: str) -> bool:
        return self.exists(join(uri, COMPLETE_MARKER))

    def list_complete(self, prefix: str) -> list[str]:
        """Sub-folders of `prefix` that `atomic_dir` finished (have `_COMPLETE`), sorted, no trailing "/"."""
        loc = parse_uri(prefix)
        if isinstance(loc, Path):
            if not loc.is_dir():
                return []
            return sorted(join(prefix, d.name) for d in loc.iterdir()
                          if d.is_dir() and not _is_tmp(d.name) and (d / COMPLETE_MARKER).is_file())
        base = loc.folder_prefix
        done = set()
        for o in self._list_objects(loc, prefix)[0]:
            rel = o["Key"][len(base):]
            child, _, rest = rel.partition("/")
            if rest == COMPLETE_MARKER and child and not _is_tmp(child):
                done.add(join(prefix, child))
        return sorted(done)

    def digest(self, uri: str) -> str:
        """sha256 of a file's content (reads it whole; for manifests and tests, not for models)."""
        return hashlib.sha256(self.read_bytes(uri)).hexdigest()
