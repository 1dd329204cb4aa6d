"""Store against a real SeaweedFS S3 server (started by tests/servers.py)."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest

from r4b_core.config import StorageConfig
from r4b_core.storage import COMPLETE_MARKER, MANIFEST, Store, StorageError, StorageNotFoundError


@pytest.fixture
def store(s3_store):
    return s3_store


@pytest.fixture
def root(s3_root):
    return s3_root


def _raw_keys(seaweedfs, prefix_uri):
    """Keys under a prefix, listed with plain boto3 (not through the code under test)."""
    import boto3

    client = boto3.client("s3", endpoint_url=seaweedfs.endpoint_url, aws_access_key_id=seaweedfs.access_key,
                          aws_secret_access_key=seaweedfs.secret_key, region_name="us-east-1")
    prefix = prefix_uri.split("/", 3)[3] + "/"
    resp = client.list_objects_v2(Bucket=seaweedfs.bucket, Prefix=prefix)
    return sorted(o["Key"][len(prefix):] for o in resp.get("Contents", []))


def test_from_config_takes_endpoint_from_env(s3_env, monkeypatch):
    store = Store.from_config(StorageConfig(root="s3://x/y", max_attempts=3, multipart_threshold_mb=7))
    assert store.endpoint_url == s3_env.endpoint_url  # AWS_ENDPOINT_URL_S3 from s3_env
    assert store.max_attempts == 3 and store.multipart_threshold == 7 * 1024 * 1024
    explicit = Store.from_config(StorageConfig(s3_endpoint_url="http://127.0.0.1:1"))
    assert explicit.endpoint_url == "http://127.0.0.1:1"


def test_roundtrip_bytes_and_text(store, root):
    payload = bytes(range(256)) * 100
    store.write_bytes(f"{root}/a/blob.bin", payload)
    assert store.read_bytes(f"{root}/a/blob.bin") == payload
    store.write_text(f"{root}/a/note.txt", "thinking → answer\n")
    assert store.read_text(f"{root}/a/note.txt") == "thinking → answer\n"
    store.write_text(f"{root}/a/note.txt", "overwritten")
    assert store.read_text(f"{root}/a/note.txt") == "overwritten"
    with pytest.raises(StorageNotFoundError, match="no such object"):
        store.read_bytes(f"{root}/a/missing.bin")


def test_list_exists_delete(store, root, seaweedfs):
    for rel in ["x/1.txt", "x/2.txt", "x/sub/3.txt", "x2/4.txt", "top.txt"]:
        store.write_text(f"{root}/{rel}", rel)
    assert store.list(f"{root}/x") == [f"{root}/x/1.txt", f"{root}/x/2.txt", f"{root}/x/sub/3.txt"]
    assert store.list(f"{root}/x", recursive=False) == [f"{root}/x/1.txt", f"{root}/x/2.txt", f"{root}/x/sub/"]
    assert store.list(root, recursive=False) == [f"{root}/top.txt", f"{root}/x/", f"{root}/x2/"]
    assert store.list(f"{root}/nothing") == []
    assert store.exists(f"{root}/x/1.txt") and store.exists(f"{root}/x") and store.exists(f"{root}/x/sub")
    assert not store.exists(f"{root}/x/9.txt") and not store.exists(f"{root}/y")
    # Deleting folder x must not touch its sibling x2 (same key prefix "x").
    assert store.delete(f"{root}/x") == 3
    assert not store.exists(f"{root}/x")
    assert _raw_keys(seaweedfs, root) == ["top.txt", "x2/4.txt"]
    assert store.delete(f"{root}/top.txt") == 1
    assert store.delete(f"{root}/top.txt") == 0  # idempotent
    with pytest.raises(StorageError, match="whole bucket"):
        store.delete(f"s3://{seaweedfs.bucket}")


def test_upload_and_download_dirs(store, root, tmp_path):
    src = tmp_path / "src"
    (src / "nested" / "deeper").mkdir(parents=True)
    files = {"a.json": b"{}", "nested/b.bin": os.urandom(3000), "nested/deeper/c.txt": b"c"}
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    assert store.upload_dir(src, f"{root}/model") == 3
    assert store.list(f"{root}/model") == sorted(f"{root}/model/{r}" for r in files)
    dst = tmp_path / "dst"
    assert store.download_dir(f"{root}/model", dst) == 3
    for rel, data in files.items():
        assert (dst / rel).read_bytes() == data
    single = store.download_file(f"{root}/model/nested/b.bin", tmp_path / "one" / "b.bin")
    assert single.read_bytes() == files["nested/b.bin"]
    with pytest.raises(StorageNotFoundError):
        store.download_dir(f"{root}/no-model", tmp_path / "none")


def test_multipart_upload_above_threshold(s3_env, root, tmp_path):
    store = Store(s3_endpoint_url=s3_env.endpoint_url, multipart_threshold_mb=5)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1024 * 1024 + 123))
    want = hashlib.sha256(big.read_bytes()).hexdigest()
    store.upload_file(big, f"{root}/big.bin")
    # A multipart object's ETag is "<md5 of part md5s>-<number of parts>": 5 + 5 + 2 MiB = 3 parts.
    import boto3

    head = boto3.client("s3", endpoint_url=s3_env.endpoint_url, region_name="us-east-1").head_object(
        Bucket=s3_env.bucket, Key=f"{root.split('/', 3)[3]}/big.bin")
    assert head["ContentLength"] == big.stat().st_size
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]
    assert hashlib.sha256(store.read_bytes(f"{root}/big.bin")).hexdigest() == want
    back = store.download_file(f"{root}/big.bin", tmp_path / "back.bin")
    assert hashlib.sha256(back.read_bytes()).hexdigest() == want
    # write_bytes above the threshold goes through the same multipart path.
    store.write_bytes(f"{root}/big2.bin", big.read_bytes())
    assert store.digest(f"{root}/big2.bin") == want


def test_commit_and_is_complete(store, root):
    stage = f"{root}/anneal"
    assert store.read_manifest(stage) is None
    assert not store.is_complete(stage, "h1")  # nothing at all
    store.write_text(f"{stage}/model.safetensors", "weights")
    assert not store.is_complete(stage, "h1")  # outputs without a manifest are not complete
    uri = store.commit(stage, {"config_hash": "h1", "outputs": ["model.safetensors"]})
    assert uri == f"{stage}/{MANIFEST}"
    assert store.is_complete(stage, "h1")
    assert not store.is_complete(stage, "h2")  # config changed: must re-run
    manifest = store.read_manifest(stage)
    assert manifest["outputs"] == ["model.safetensors"] and manifest["committed_at"]
    assert store.invalidate(stage) and not store.is_complete(stage, "h1")
    with pytest.raises(StorageError, match="config_hash"):
        store.commit(stage, {"outputs": []})
    store.write_text(f"{stage}/{MANIFEST}", "{truncated")
    with pytest.raises(StorageError, match="not valid JSON"):
        store.read_manifest(stage)


def test_atomic_dir_publishes_only_on_success(store, root, seaweedfs):
    ckpts = f"{root}/checkpoints"
    with store.atomic_dir(f"{ckpts}/step-000100") as tmp:
        (tmp / "model.safetensors").write_bytes(b"w100")
        (tmp / "optim").mkdir()
        (tmp / "optim" / "state.pt").write_bytes(b"o100")
    with pytest.raises(RuntimeError, match="boom"):
        with store.atomic_dir(f"{ckpts}/step-000200") as tmp:
            (tmp / "model.safetensors").write_bytes(b"w200")
            raise RuntimeError("boom")
    assert not store.exists(f"{ckpts}/step-000200")  # nothing uploaded at all
    assert not tmp.exists()  # staging removed
    # A folder written without atomic_dir (e.g. a crashed upload) has no marker: not complete.
    store.write_text(f"{ckpts}/step-000300/model.safetensors", "partial")
    assert store.list_complete(ckpts) == [f"{ckpts}/step-000100"]
    assert _raw_keys(seaweedfs, f"{ckpts}/step-000100") == [COMPLETE_MARKER, "model.safetensors", "optim/state.pt"]
    assert store.is_dir_complete(f"{ckpts}/step-000100") and not store.is_dir_complete(f"{ckpts}/step-000300")

    # Replacing a complete, committed folder: new content, stale files and the old manifest gone.
    store.commit(f"{ckpts}/step-000100", {"config_hash": "old"})
    with store.atomic_dir(f"{ckpts}/step-000100") as tmp:
        (tmp / "model.safetensors").write_bytes(b"w100-v2")
    assert store.read_bytes(f"{ckpts}/step-000100/model.safetensors") == b"w100-v2"
    assert _raw_keys(seaweedfs, f"{ckpts}/step-000100") == [COMPLETE_MARKER, "model.safetensors"]
    assert store.list_complete(ckpts) == [f"{ckpts}/step-000100"]


def test_local_path_downloads_and_reuses_cache(store, root, tmp_path):
    store.write_text(f"{root}/m/config.json", '{"a": 1}')
    store.write_text(f"{root}/m/w.bin", "w1")
    cache = tmp_path / "cache"
    local = store.local_path(f"{root}/m", cache)
    assert (local / "config.json").read_text() == '{"a": 1}' and (local / "w.bin").read_text() == "w1"
    mtime = (local / "w.bin").stat().st_mtime_ns
    assert store.local_path(f"{root}/m", cache) == local
    assert (local / "w.bin").stat().st_mtime_ns == mtime  # unchanged remote: no new download
    store.write_text(f"{root}/m/w.bin", "w2")
    assert (store.local_path(f"{root}/m", cache) / "w.bin").read_text() == "w2"  # changed: refreshed
    one = store.local_path(f"{root}/m/config.json", cache)
    assert one.is_file() and one.read_text() == '{"a": 1}'
    with pytest.raises(StorageNotFoundError):
        store.local_path(f"{root}/nothing-here", cache)


@pytest.fixture
def patient_store(s3_env):
    """Backoff that outlasts a few seconds of outage plus a restart on a loaded machine (>= 14 s)."""
    return Store(s3_endpoint_url=s3_env.endpoint_url, backoff_base_s=0.5, backoff_max_s=4.0)


def test_write_survives_server_down_for_seconds(patient_store, root, seaweedfs, tmp_path):
    """The endpoint goes away, the write backs off and retries, the server comes back: success."""
    store = patient_store
    store.write_text(f"{root}/before.txt", "kept")
    payload = os.urandom(200_000)
    seaweedfs.stop(grace_s=0)  # SIGKILL: a crash, not a graceful shutdown
    result: dict = {}

    def write():
        try:
            store.write_bytes(f"{root}/during.bin", payload)
            result["ok"] = True
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    t0 = time.monotonic()
    retries_before = store.retries
    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(4.0)
    assert writer.is_alive(), f"write returned while the server was down: {result}"
    seaweedfs.start()
    writer.join(timeout=60)
    assert result.get("ok"), result
    assert store.retries - retries_before >= 2
    assert time.monotonic() - t0 >= 4.0
    assert store.read_bytes(f"{root}/during.bin") == payload
    assert store.read_text(f"{root}/before.txt") == "kept"  # data from before the crash survived


def test_upload_dir_survives_a_crash_midway(patient_store, root, seaweedfs, tmp_path):
    """SeaweedFS is killed while a folder upload is in flight and comes back 3 s later: every file
    arrives intact (the interrupted request is retried, not lost)."""
    store = patient_store
    src = tmp_path / "many"
    src.mkdir()
    files = {f"f{i:03d}.bin": os.urandom(20_000) for i in range(300)}
    for name, data in files.items():
        (src / name).write_bytes(data)
    result: dict = {}

    def upload():
        try:
            result["n"] = store.upload_dir(src, f"{root}/many")
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    retries_before = store.retries
    uploader = threading.Thread(target=upload)
    uploader.start()
    deadline = time.monotonic() + 60
    while len(_raw_keys(seaweedfs, f"{root}/many")) < 10 and time.monotonic() < deadline:
        time.sleep(0.02)
    seaweedfs.stop(grace_s=0)
    assert uploader.is_alive(), "upload finished before the crash; the test proves nothing"
    time.sleep(3.0)
    seaweedfs.start()
    uploader.join(timeout=90)
    assert result.get("n") == 300, result
    assert store.retries > retries_before
    assert _raw_keys(seaweedfs, f"{root}/many") == sorted(files)
    for name in ("f000.bin", "f150.bin", "f299.bin"):
        assert store.read_bytes(f"{root}/many/{name}") == files[name]


def test_wrong_secret_key_is_one_clear_line(s3_env, root, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = Store(s3_endpoint_url=s3_env.endpoint_url)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as err:
        store.write_text(f"{root}/x.txt", "x")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{root}/x.txt: write: refused by {s3_env.endpoint_url}")
    assert "SignatureDoesNotMatch" in msg and "AWS_SECRET_ACCESS_KEY" in msg
    assert time.monotonic() - t0 < 5  # auth errors are not retried


def test_missing_credentials_and_bucket(s3_env, root, monkeypatch):
    store = Store(s3_endpoint_url=s3_env.endpoint_url)
    with pytest.raises(StorageError) as err:
        store.read_bytes("s3://no-such-bucket-r4b/x.txt")
    assert str(err.value) == (f"s3://no-such-bucket-r4b/x.txt: read: bucket 'no-such-bucket-r4b' does not "
                              f"exist at {s3_env.endpoint_url}; create it or fix storage.root")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    with pytest.raises(StorageError, match=r"^s3://.*/x.txt: read: no S3 credentials; set AWS_ACCESS_KEY_ID"):
        Store(s3_endpoint_url=s3_env.endpoint_url).read_bytes(f"{root}/x.txt")


def test_data_check_reads_a_jsonl_and_its_images_on_s3(store, root, capsys):
    """`r4b data check s3://...`: the JSONL and the images next to it read from the object store;
    a missing object and an object that is not an image are reported with file:line."""
    import io
    import json

    from PIL import Image

    from r4b_core.cli import main

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(png, format="PNG")
    store.write_bytes(f"{root}/data/images/ok.png", png.getvalue())
    store.write_bytes(f"{root}/data/images/text.png", b"hello")
    rows = [{"id": f"r{i}", "question": "What colour?", "answer": "green", "images": [ref]}
            for i, ref in enumerate(["images/ok.png", "images/gone.png", "images/text.png"])]
    store.write_text(f"{root}/data/d.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "check", f"{root}/data/d.jsonl"]) == 2
    out = capsys.readouterr()
    err = out.err.splitlines()
    assert err[0].startswith(f"{root}/data/d.jsonl:2: images[0]: image '{root}/data/images/gone.png': cannot read")
    assert "no such object" in err[0]
    assert err[1].startswith(f"{root}/data/d.jsonl:3: images[0]: ") and "is not a readable image" in err[1]
    assert out.out.strip() == f"{root}/data/d.jsonl: 1 valid records, 2 bad lines; 3 images checked"
