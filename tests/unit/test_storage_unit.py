"""Store on local paths (plain and file://): the same semantics as S3, no server needed."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest

from r4b_core.config import StorageConfig
from r4b_core.storage import (COMPLETE_MARKER, MANIFEST, S3Location, Store, StorageError,
                              StorageNotFoundError, join, local_dir_of, parse_uri)


@pytest.fixture(params=["path", "file-uri"])
def root(request, tmp_path) -> str:
    """The same tests run on a plain path and on a file:// URI."""
    base = tmp_path / "runs"
    return str(base) if request.param == "path" else base.as_uri()


@pytest.fixture
def store() -> Store:
    return Store.from_config(StorageConfig())


def _leftovers(path: Path) -> list[str]:
    return [p.name for p in path.rglob("*") if ".r4b-tmp-" in p.name]


def test_parse_and_join():
    assert parse_uri("s3://bkt/a/b.txt") == S3Location("bkt", "a/b.txt")
    assert parse_uri("s3://bkt") == S3Location("bkt", "")
    assert parse_uri("file:///abs/x") == Path("/abs/x")
    assert parse_uri("file://rel/x") == Path("rel/x")
    assert parse_uri("runs/x") == Path("runs/x")
    assert parse_uri(Path("/tmp/my dir").as_uri()) == Path("/tmp/my dir")
    assert join("s3://b/run", "anneal", "/ckpt/") == "s3://b/run/anneal/ckpt"
    assert join("file:///", "a") == "file:///a"
    assert join("runs/", "a/b") == "runs/a/b"
    assert join(Path("/tmp/x"), "y") == "/tmp/x/y"
    with pytest.raises(StorageError, match=r"^gs://b/x: unsupported scheme 'gs'; use a local path"):
        parse_uri("gs://b/x")
    with pytest.raises(StorageError, match="no bucket"):
        parse_uri("s3:///key")
    with pytest.raises(StorageError, match="no local folder"):
        local_dir_of("s3://b/k")


def test_roundtrip_and_atomic_writes(store, root):
    store.write_bytes(join(root, "a/blob.bin"), b"\x00\x01")
    assert store.read_bytes(join(root, "a/blob.bin")) == b"\x00\x01"
    store.write_text(join(root, "a/t.txt"), "λ")
    assert store.read_text(join(root, "a/t.txt")) == "λ"
    store.write_json(join(root, "a/j.json"), {"b": 1})
    assert store.read_json(join(root, "a/j.json")) == {"b": 1}
    assert _leftovers(local_dir_of(root)) == []
    with pytest.raises(StorageNotFoundError, match="no such file") as err:
        store.read_bytes(join(root, "nope.bin"))
    assert isinstance(err.value, FileNotFoundError)  # callers may catch the builtin too
    with pytest.raises(StorageError, match="is a folder"):
        store.read_bytes(join(root, "a"))


def test_list_exists_delete(store, root):
    for rel in ["x/1.txt", "x/2.txt", "x/sub/3.txt", "x2/4.txt", "top.txt"]:
        store.write_text(join(root, rel), rel)
    # A staging file left by a crash is never listed.
    (local_dir_of(root) / "x" / ".9.txt.r4b-tmp-abc").write_text("half")
    assert store.list(join(root, "x")) == [join(root, r) for r in ["x/1.txt", "x/2.txt", "x/sub/3.txt"]]
    assert store.list(join(root, "x"), recursive=False) == [join(root, "x/1.txt"), join(root, "x/2.txt"),
                                                            join(root, "x/sub") + "/"]
    assert store.list(join(root, "missing")) == []
    assert store.exists(join(root, "x/1.txt")) and store.exists(join(root, "x"))
    assert not store.exists(join(root, "x/9.txt"))
    assert store.delete(join(root, "x")) == 4  # three files and the stray staging file
    assert not store.exists(join(root, "x")) and store.exists(join(root, "x2/4.txt"))
    assert store.delete(join(root, "top.txt")) == 1
    assert store.delete(join(root, "top.txt")) == 0


def test_files_and_dirs(store, root, tmp_path):
    src = tmp_path / "src"
    (src / "n").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "n" / "b.bin").write_bytes(os.urandom(100))
    assert store.upload_dir(src, join(root, "m")) == 2
    dst = tmp_path / "dst"
    assert store.download_dir(join(root, "m"), dst) == 2
    assert (dst / "n" / "b.bin").read_bytes() == (src / "n" / "b.bin").read_bytes()
    store.upload_file(src / "a.txt", join(root, "single/a.txt"))
    assert store.download_file(join(root, "single/a.txt"), tmp_path / "o" / "a.txt").read_text() == "a"
    assert store.local_path(join(root, "m"), tmp_path / "cache") == local_dir_of(join(root, "m"))
    with pytest.raises(StorageNotFoundError):
        store.local_path(join(root, "none"), tmp_path / "cache")
    with pytest.raises(StorageNotFoundError, match="no such local file"):
        store.upload_file(tmp_path / "ghost.txt", join(root, "g.txt"))


def test_commit_and_is_complete(store, root):
    stage = join(root, "curate")
    assert store.read_manifest(stage) is None and not store.is_complete(stage, "abc")
    store.write_text(join(stage, "train.jsonl"), "{}\n")
    assert not store.is_complete(stage, "abc")
    store.commit(stage, {"config_hash": "abc", "counts": {"train": 1}})
    assert store.is_complete(stage, "abc") and not store.is_complete(stage, "other")
    on_disk = json.loads((local_dir_of(stage) / MANIFEST).read_text())
    assert on_disk["counts"] == {"train": 1} and on_disk["config_hash"] == "abc"
    assert _leftovers(local_dir_of(root)) == []
    assert store.invalidate(stage) is True and store.invalidate(stage) is False
    assert not store.is_complete(stage, "abc")
    with pytest.raises(StorageError, match=r"manifest.json: commit: the manifest needs a non-empty 'config_hash'"):
        store.commit(stage, {"config_hash": ""})
    (local_dir_of(stage) / MANIFEST).write_text("[1, 2]")
    with pytest.raises(StorageError, match="not a JSON object"):
        store.read_manifest(stage)


def test_atomic_dir_success_failure_and_replace(store, root):
    ckpts = join(root, "ckpt")
    with store.atomic_dir(join(ckpts, "step-000010")) as tmp:
        assert not store.exists(join(ckpts, "step-000010"))  # invisible while being written
        (tmp / "w.bin").write_bytes(b"v1")
        (tmp / "old-only.txt").write_text("stale later")
    final = local_dir_of(join(ckpts, "step-000010"))
    assert (final / "w.bin").read_bytes() == b"v1" and (final / COMPLETE_MARKER).is_file()
    assert json.loads((final / COMPLETE_MARKER).read_text())["files"] == ["old-only.txt", "w.bin"]
    assert final.stat().st_mode & 0o777 == 0o755

    with pytest.raises(ValueError, match="crash"):
        with store.atomic_dir(join(ckpts, "step-000020")) as tmp:
            (tmp / "w.bin").write_bytes(b"v2")
            raise ValueError("crash")
    assert not store.exists(join(ckpts, "step-000020"))

    # A failure while *replacing* leaves the old complete folder untouched.
    with pytest.raises(KeyboardInterrupt):
        with store.atomic_dir(join(ckpts, "step-000010")) as tmp:
            (tmp / "w.bin").write_bytes(b"never")
            raise KeyboardInterrupt
    assert (final / "w.bin").read_bytes() == b"v1"

    with store.atomic_dir(join(ckpts, "step-000010")) as tmp:
        (tmp / "w.bin").write_bytes(b"v1b")
    assert (final / "w.bin").read_bytes() == b"v1b" and not (final / "old-only.txt").exists()

    store.write_text(join(ckpts, "step-000030/w.bin"), "no marker")  # not written by atomic_dir
    assert store.list_complete(ckpts) == [join(ckpts, "step-000010")]
    assert store.list_complete(join(root, "none")) == []
    assert _leftovers(local_dir_of(root)) == []


def test_atomic_dir_over_a_file_is_refused_before_any_work(store, root):
    """A file where the folder would go (or above it) is someone's data: one line, the file kept,
    nothing staged and no hidden leftovers."""
    base = local_dir_of(root)
    base.mkdir(parents=True)
    (base / "out").write_text("keep me")
    for target in ("out", "out/sub/step-000001"):
        ran = []
        with pytest.raises(StorageError, match=rf"^{join(root, target)}: publish folder: the file "
                                               rf"{base / 'out'} is in the way; move or delete it"):
            with store.atomic_dir(join(root, target)) as tmp:
                ran.append(tmp)
        assert ran == []
    assert (base / "out").read_text() == "keep me"
    assert sorted(p.name for p in base.iterdir()) == ["out"]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_endpoint_error_names_attempts(monkeypatch):
    """A real connection refused (nothing listens on the port): N attempts, then one clear line."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    store = Store(s3_endpoint_url=endpoint, max_attempts=3, backoff_base_s=0.05, backoff_max_s=0.1)
    with pytest.raises(StorageError) as err:
        store.write_text("s3://bucket/run/x.txt", "x")
    msg = str(err.value)
    assert msg.startswith(f"s3://bucket/run/x.txt: write: endpoint {endpoint} unreachable after 3 attempts")
    assert "storage.s3_endpoint_url" in msg and "\n" not in msg
    assert store.retries == 2


def test_endpoint_that_never_answers_fails_within_the_budget(monkeypatch):
    """A real socket that accepts connections (the kernel completes the handshake) and never
    answers: each attempt ends at the read timeout, the call gives up once the budget is spent,
    and the one line names the endpoint, the timeouts and the budget."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    try:
        store = Store.from_config(StorageConfig(s3_endpoint_url=endpoint, connect_timeout_s=0.5, read_timeout_s=1.0,
                                                retry_budget_s=3.0), backoff_base_s=0.1, backoff_max_s=0.2)
        t0 = time.monotonic()
        with pytest.raises(StorageError) as err:
            store.read_text("s3://bucket/run/config.yaml")
        took = time.monotonic() - t0
    finally:
        silent.close()
    msg = str(err.value)
    assert msg.startswith(f"s3://bucket/run/config.yaml: read: endpoint {endpoint} did not answer: 3 attempts over ")
    assert ("(ReadTimeoutError; storage.connect_timeout_s=0.5, read_timeout_s=1, retry_budget_s=3)" in msg
            and "\n" not in msg)
    assert 3.0 <= took < 8.0, took   # 3 read timeouts + backoff; a stuck client would wait far longer


def test_default_timeouts_give_up_in_about_a_minute():
    """The defaults (the scenario above at full size): attempts of one read timeout each are made
    while the budget lasts, and the last may start just before it runs out."""
    cfg = StorageConfig()
    store = Store.from_config(cfg)
    assert (store.connect_timeout_s, store.read_timeout_s, store.retry_budget_s) == (5.0, 20.0, 60.0)
    assert cfg.retry_budget_s + cfg.read_timeout_s <= 90


def test_default_backoff_outlasts_a_20s_outage():
    """Issue 6 stops SeaweedFS for ~10 s mid-upload; the default schedule waits longer than that
    even with the smallest jitter, before giving up."""
    store = Store.from_config(StorageConfig())
    waits = [store.backoff_delay(a) * 0.75 for a in range(1, store.max_attempts)]
    assert sum(waits) >= 20, waits
    assert max(waits) <= 10


def test_missing_credentials_is_immediate(monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=r"^s3://b/k: read: no S3 credentials; set AWS_ACCESS_KEY_ID and "
                                          r"AWS_SECRET_ACCESS_KEY"):
        Store(s3_endpoint_url="http://127.0.0.1:9").read_bytes("s3://b/k")
    assert time.monotonic() - t0 < 2
