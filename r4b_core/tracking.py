"""Tracking: MLflow runs for a pipeline and its stages, safe to call from a training loop.

One MLflow run per pipeline run, one nested run per stage:

    with Tracker(cfg) as tracker:                     # reuses MLFLOW_RUN_ID when it is set
        with tracker.stage("anneal") as run:          # nested run, FAILED if the block raises
            run.log_params(cfg.anneal)                # nested config flattened to "optim.lr", ...
            run.log_metrics({"loss": 0.7, "acc@8": 0.1, "timing(s)/gen": 2.0}, step=10)
            run.log_dict({"samples": [...]}, "samples/step-10.json")

- Tracking URI: `tracking.uri`, else `MLFLOW_TRACKING_URI`, else a SQLite file in the local run
  folder (`<root>/<name>/mlflow.db`; `./runs/<name>/mlflow.db` when the root is on S3).
- Metric, param and tag names are sanitized (`sanitize_metric_name`): MLflow refuses names such as
  `acc@8` or `timing(s)/gen`; they become `acc_at_8` and `timing_s_/gen`.
- The tracking server being down never stops training: metrics, params, tags, artifacts and run
  starts/ends are kept in order and delivered on the next call that reaches the server (a failed
  server is retried at most every `retry_interval_s`). The buffer is bounded; when it overflows,
  or the tracker closes while the server is still down, pending metrics go to
  `<local run dir>/mlflow-pending.jsonl` and one warning line names the metrics and the file.
  The next Tracker of that run folder that reaches the same server (a later stage, a rerun) sends
  them and removes the file (`replay_pending`). It claims the file by renaming it to
  `*.replaying` first, so two processes never send the same records twice; a `*.replaying` file
  left by a process that died mid-replay can be renamed back to be sent again.
- Registry primitives for the promotion gate (`register_version`, `set_alias`, `get_version`,
  `set_version_tags`) raise `TrackingError` instead: a gate must not decide on missing data.
  Model weights stay in storage; a version's `source` is their storage URI.

Create a Tracker in one process per run (rank 0 under torchrun): SQLite allows a single writer.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from r4b_core.errors import R4BError
from r4b_core.storage import S3Location, parse_uri

if TYPE_CHECKING:
    from r4b_core.config import RunConfig

log = logging.getLogger("r4b.tracking")

PENDING_FILE = "mlflow-pending.jsonl"
# MLflow 3.17 limits (mlflow.utils.validation); a unit test checks they still match.
MAX_NAME_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
_BATCH_METRICS = 1000
_BATCH_PARAMS_TAGS = 100

# Errors that mean "try again later"; any other MlflowException is a refusal of that request.
_TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED",
                    "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED", "SERVICE_UNDER_MAINTENANCE"}


class TrackingError(R4BError):
    """A tracking or registry call that cannot go on (bad run id, refused registry request)."""


# ---------------------------------------------------------------------------------------------
# Names and params
# ---------------------------------------------------------------------------------------------
_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. /")
# Readable stand-ins for characters MLflow refuses. Brackets, colons and commas all become "_",
# so two names that differ only in those (e.g. "f(x)" vs "f[x]") would collide; any other
# character gets its own token ("λ" -> "_u3bb_"). Colons are refused too: MLflow on Windows does.
_TOKENS = {"@": "_at_", "%": "_pct", "#": "_num_", "+": "_plus_", "=": "_eq_", "*": "_x_", "&": "_and_",
           "<": "_lt_", ">": "_gt_", "|": "_or_", "!": "_not_", "?": "_q_", "~": "_tilde_", "^": "_pow_",
           "$": "_usd_", "'": "_", '"': "_", "`": "_", "\\": "_", "(": "_", ")": "_", "[": "_", "]": "_",
           "{": "_", "}": "_", ":": "_", ",": "_", ";": "_", "\t": " ", "\n": " ", "\r": " "}


@functools.lru_cache(maxsize=8192)
def sanitize_metric_name(name: str) -> str:
    """Map any string to a name MLflow accepts for metrics, params and tags, deterministically.

    Valid names pass unchanged. Refused characters become readable tokens (`acc@8` -> `acc_at_8`,
    `timing(s)/gen` -> `timing_s_/gen`); empty, `.` and `..` path segments are escaped (MLflow
    refuses names that normalise to another path); names over 250 characters are cut and get a
    hash of the original, so long names stay distinct.
    """
    name = str(name)
    out = "".join(c if c in _SAFE else _TOKENS.get(c, f"_u{ord(c):x}_") for c in name)
    segments = out.split("/")
    for i, seg in enumerate(segments):
        if seg in ("", ".", ".."):
            segments[i] = "_" + seg
        elif i == 0 and seg.startswith(".."):
            segments[i] = "_" + seg
    out = "/".join(segments)
    if len(out) > MAX_NAME_LENGTH:
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        out = out[: MAX_NAME_LENGTH - 11].rstrip("/") + "_" + digest
    return out


def flatten_params(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts (or a pydantic model) to {"a.b.c": "value"}; lists as JSON; values cut to
    MLflow's 6000-character limit."""
    if hasattr(params, "model_dump"):
        params = params.model_dump(mode="json")
    out: dict[str, str] = {}
    for key, value in dict(params).items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if hasattr(value, "model_dump"):
            value = value.model_dump(mode="json")
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, full))
            continue
        if isinstance(value, str):
            text = value
        else:
            try:
                text = json.dumps(value, default=str)
            except (TypeError, ValueError):
                text = str(value)
        out[full] = text[:MAX_PARAM_VALUE_LENGTH]
    return out


# ---------------------------------------------------------------------------------------------
# Where tracking data lives
# ---------------------------------------------------------------------------------------------
def local_run_dir(run_cfg: RunConfig) -> Path:
    """The run's local folder: `<root>/<name>` for a local root, `./runs/<name>` for an S3 root."""
    root = parse_uri(run_cfg.storage.root)
    base = Path("runs") if isinstance(root, S3Location) else root
    return base / run_cfg.name


def tracking_uri(run_cfg: RunConfig) -> str:
    """`tracking.uri`, else `MLFLOW_TRACKING_URI` (set by the KFP MLflow plugin and on clusters),
    else `sqlite:////abs/<local run dir>/mlflow.db`."""
    if run_cfg.tracking.uri:
        return run_cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str((local_run_dir(run_cfg) / "mlflow.db").resolve())


def _cap_mlflow_http_retries() -> None:
    """MLflow's client retries a dead server for minutes by default (7 retries, 120 s timeout);
    in a training loop that is a stall. The tracker buffers and retries itself instead. Only
    defaults: a value set in the environment wins."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def _is_transient(exc: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.error_code in _TRANSIENT_CODES
    return True  # connection errors, timeouts, S3 artifact store errors: try again later


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------
@dataclass(eq=False)
class _Run:
    name: str
    parent: _Run | None
    id: str | None = None
    owned: bool = True  # we created it, so we end it
    create_tags: dict[str, str] = field(default_factory=dict)
    verified: bool = False
    # Pending, in logging order; removed as they are delivered.
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    artifacts: list[list[Any]] = field(default_factory=list)  # [path, artifact_path, spooled]
    end_status: str | None = None
    ended: bool = False

    def pending(self) -> bool:
        return bool(self.metrics or self.params or self.tags or self.artifacts or
                    (self.end_status and not self.ended) or self.id is None or not self.verified)


class RunHandle:
    """One MLflow run (the pipeline run or a stage run); its `log_*` calls go to that run."""

    def __init__(self, tracker: Tracker, run: _Run) -> None:
        self._tracker, self._run = tracker, run

    @property
    def name(self) -> str:
        return self._run.name

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (None while the server has not been reachable since the run began)."""
        return self._run.id

    def log_params(self, params: Mapping[str, Any] | Any) -> None:
        self._tracker.log_params(params, run=self)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._tracker.log_metrics(metrics, step, run=self)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._tracker.set_tags(tags, run=self)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._tracker.log_artifact(local_path, artifact_path, run=self)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._tracker.log_artifacts(local_dir, artifact_path, run=self)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self._tracker.log_dict(data, artifact_file, run=self)


@dataclass(frozen=True)
class RegisteredVersion:
    """A registered model version: weights live at `source` (a storage URI)."""

    name: str
    version: int
    source: str
    run_id: str | None
    tags: dict[str, str]
    aliases: list[str]
    status: str

    @classmethod
    def _from_mlflow(cls, mv: Any) -> RegisteredVersion:
        return cls(name=mv.name, version=int(mv.version), source=mv.source, run_id=mv.run_id or None,
                   tags=dict(mv.tags or {}), aliases=list(getattr(mv, "aliases", []) or []),
                   status=str(mv.status))


class Tracker:
    """The pipeline run and its nested stage runs, with buffering while the server is away."""

    def __init__(self, run_cfg: RunConfig, *, uri: str | None = None, run_id: str | None = None,
                 run_name: str | None = None, spill_path: str | os.PathLike | None = None,
                 max_buffered: int = 100_000, retry_interval_s: float = 30.0) -> None:
        _cap_mlflow_http_retries()
        self.uri = uri or tracking_uri(run_cfg)
        self.experiment = run_cfg.tracking.experiment
        self.run_dir = local_run_dir(run_cfg)
        self.spill_path = Path(spill_path) if spill_path else self.run_dir / PENDING_FILE
        self.max_buffered = max_buffered
        self.retry_interval_s = retry_interval_s
        self.spilled = 0  # metrics written to the pending file instead of MLflow
        existing = run_id or os.environ.get("MLFLOW_RUN_ID") or None
        name = run_name or f"{run_cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self._pipeline = _Run(name=name, parent=None, id=existing, owned=existing is None,
                              create_tags={"r4b.run": run_cfg.name, "r4b.kind": "pipeline"})
        self._runs: list[_Run] = [self._pipeline]
        self._stack: list[_Run] = [self._pipeline]
        self._lock = threading.RLock()
        self._client_obj: Any = None
        self._experiment_id: str | None = None
        self._offline_since: float | None = None
        self._next_try = 0.0
        self._last_error: BaseException | None = None
        self._warned: set[str] = set()
        self._names: dict[str, str] = {}  # sanitized -> original, to report collisions
        self._spill_announced = False
        self._closed = False
        if self.uri.startswith("sqlite:"):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._deliver(force=True, strict=True)
            if self._offline_since is None:
                self.replay_pending()
        atexit.register(self.close)

    # -- public: runs --------------------------------------------------------------------------
    @property
    def pipeline(self) -> RunHandle:
        return RunHandle(self, self._pipeline)

    @property
    def run_id(self) -> str | None:
        """The pipeline run's id; hand it to stage subprocesses as MLFLOW_RUN_ID (see `env()`)."""
        return self._pipeline.id

    @property
    def online(self) -> bool:
        return self._offline_since is None

    @property
    def active(self) -> RunHandle:
        return RunHandle(self, self._stack[-1])

    def env(self) -> dict[str, str]:
        """Environment for a child process whose Tracker should join this pipeline run."""
        out = {"MLFLOW_TRACKING_URI": self.uri}
        if self._pipeline.id:
            out["MLFLOW_RUN_ID"] = self._pipeline.id
        return out

    @contextlib.contextmanager
    def stage(self, name: str, tags: Mapping[str, Any] | None = None) -> Iterator[RunHandle]:
        """A nested run under the current one; FINISHED, or FAILED/KILLED if the block raises."""
        with self._lock:
            parent = self._stack[-1]
            run = _Run(name=name, parent=parent,
                       create_tags={"r4b.kind": "stage", "r4b.stage": name,
                                    **{sanitize_metric_name(k): str(v)[:MAX_TAG_VALUE_LENGTH]
                                       for k, v in (tags or {}).items()}})
            self._runs.append(run)
            self._stack.append(run)
            self._deliver()
        status = "FINISHED"
        try:
            yield RunHandle(self, run)
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:
            status = "FAILED"
            raise
        finally:
            with self._lock:
                if run in self._stack:
                    self._stack.remove(run)
                run.end_status = status
                self._deliver(force=True)

    def flush(self) -> bool:
        """Try to deliver everything now; True when nothing is left pending."""
        with self._lock:
            self._deliver(force=True)
            return not any(r.pending() for r in self._runs)

    def close(self, status: str | None = None) -> None:
        """End the pipeline run (if this tracker created it) and deliver or spill what is pending."""
        with self._lock:
            if self._closed:
                return
            for run in reversed(self._stack[1:]):  # stages left open (no `with`): mark them killed
                run.end_status = run.end_status or "KILLED"
            self._stack[1:] = []
            if self._pipeline.owned:
                self._pipeline.end_status = status or "FINISHED"
            self._deliver(force=True)
            if any(r.metrics or r.params or r.tags or r.artifacts for r in self._runs):
                self._spill("the run ended while MLflow was unreachable", everything=True)
            self._closed = True
            with contextlib.suppress(OSError):
                self._spool_dir().rmdir()  # only when empty: everything was delivered
        atexit.unregister(self.close)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # -- public: logging -----------------------------------------------------------------------
    def _target(self, run: RunHandle | None) -> _Run | None:
        if self._closed:
            self._warn_once("closed", "tracking: a log call after Tracker.close() was ignored")
            return None
        return run._run if run is not None else self._stack[-1]

    def log_params(self, params: Mapping[str, Any] | Any, *, run: RunHandle | None = None) -> None:
        with self._lock:
            target = self._target(run)
            if target is None:
                return
            for key, value in flatten_params(params).items():
                target.params[sanitize_metric_name(key)] = value
            self._deliver()

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None, *,
                    run: RunHandle | None = None) -> None:
        ts = int(time.time() * 1000)
        with self._lock:
            target = self._target(run)
            if target is None:
                return
            for key, value in metrics.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    self._warn_once(f"nan:{key}", f"tracking: metric {key!r} has a non-numeric value "
                                                  f"{value!r}; skipped")
                    continue
                target.metrics.append((self._name(key), number, ts, int(step or 0)))
            self._deliver()

    def set_tags(self, tags: Mapping[str, Any], *, run: RunHandle | None = None) -> None:
        with self._lock:
            target = self._target(run)
            if target is None:
                return
            for key, value in tags.items():
                target.tags[sanitize_metric_name(key)] = str(value)[:MAX_TAG_VALUE_LENGTH]
            self._deliver()

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None, *,
                     run: RunHandle | None = None) -> None:
        self._add_artifact(Path(local_path), artifact_path, run, spooled=False)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None, *,
                      run: RunHandle | None = None) -> None:
        self._add_artifact(Path(local_dir), artifact_path, run, spooled=False)

    def log_dict(self, data: Any, artifact_file: str, *, run: RunHandle | None = None) -> None:
        """`data` as JSON (or YAML for .yaml/.yml) at `artifact_file` inside the run's artifacts."""
        folder = self._spool_dir() / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / Path(artifact_file).name
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(data, sort_keys=False))
        else:
            path.write_text(json.dumps(data, indent=2, default=str))
        parent = str(Path(artifact_file).parent)
        self._add_artifact(path, None if parent == "." else parent, run, spooled=True)

    def _add_artifact(self, path: Path, artifact_path: str | None, run: RunHandle | None, spooled: bool) -> None:
        if not path.exists():
            raise TrackingError(f"{path}: log_artifact: no such file or folder")
        with self._lock:
            target = self._target(run)
            if target is None:
                return
            entry = [path, artifact_path, spooled]
            target.artifacts.append(entry)
            self._deliver()
            if any(e is entry for e in target.artifacts) and not entry[2]:
                # Not delivered: keep a copy, the caller may change or delete the original.
                copy = self._spool_dir() / uuid.uuid4().hex[:12] / path.name
                copy.parent.mkdir(parents=True, exist_ok=True)
                (shutil.copytree if path.is_dir() else shutil.copy2)(path, copy)
                entry[0], entry[2] = copy, True

    def _name(self, key: str) -> str:
        name = sanitize_metric_name(key)
        first = self._names.setdefault(name, key)
        if first != key:
            self._warn_once(f"collide:{name}", f"tracking: metrics {first!r} and {key!r} both map to MLflow "
                                               f"name {name!r}; rename one of them")
        return name

    def _spool_dir(self) -> Path:
        return self.run_dir / "mlflow-spool"

    # -- delivery ------------------------------------------------------------------------------
    def _client(self) -> Any:
        if self._client_obj is None:
            from mlflow import MlflowClient

            self._client_obj = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self._client_obj

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)

    def _deliver(self, force: bool = False, strict: bool = False) -> None:
        """Send what is pending unless we are backing off from a failed server. Never raises,
        except in `strict` mode (construction) for errors a retry cannot fix."""
        now = time.monotonic()
        if self._offline_since is None or force or now >= self._next_try:
            try:
                self._flush(strict)
            except Exception as exc:  # noqa: BLE001 - training must go on; buffered below
                if strict and isinstance(exc, TrackingError):
                    raise
                self._last_error = exc
                self._next_try = now + self.retry_interval_s
                if self._offline_since is None:
                    self._offline_since = time.time()
                    log.warning("tracking: MLflow at %s unreachable (%s); training continues, metrics are "
                                "buffered (up to %d) and sent when it answers again (next try in %.0f s)",
                                self.uri, _one_line(exc, 200), self.max_buffered, self.retry_interval_s)
            else:
                if self._offline_since is not None:
                    log.warning("tracking: MLflow at %s reachable again after %.0f s; buffered data delivered",
                                self.uri, time.time() - self._offline_since)
                    self._offline_since = None
        if sum(len(r.metrics) for r in self._runs) > self.max_buffered:
            self._spill(f"more than {self.max_buffered} metrics buffered")

    def _flush(self, strict: bool = False) -> None:
        client = self._client()
        for run in list(self._runs):
            if not run.pending():
                continue
            if run.id is None:
                self._create(client, run)
            elif not run.verified:
                self._verify(client, run, strict)
            self._send(client, run)

    def _experiment_id_for(self, client: Any) -> str:
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            exp = client.get_experiment_by_name(self.experiment)
            if exp is None:
                kwargs = {}
                if self.uri.startswith("sqlite:"):  # keep artifacts next to the database
                    kwargs["artifact_location"] = (self.run_dir / "mlartifacts").resolve().as_uri()
                try:
                    self._experiment_id = client.create_experiment(self.experiment, **kwargs)
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    self._experiment_id = client.get_experiment_by_name(self.experiment).experiment_id
            elif exp.lifecycle_stage == "deleted":
                raise TrackingError(f"{self.uri}: experiment {self.experiment!r} is deleted; restore it "
                                    f"(mlflow experiments restore --experiment-id {exp.experiment_id}) "
                                    f"or set tracking.experiment to another name")
            else:
                self._experiment_id = exp.experiment_id
        return self._experiment_id

    def _create(self, client: Any, run: _Run) -> None:
        if run.parent is not None and run.parent.id is None:
            self._create(client, run.parent)
        tags = dict(run.create_tags)
        if run.parent is not None:
            tags["mlflow.parentRunId"] = run.parent.id
        exp = self._experiment_id_for(client)
        run.id = client.create_run(exp, tags=tags, run_name=run.name).info.run_id
        run.verified = True

    def _verify(self, client: Any, run: _Run, strict: bool) -> None:
        """A run we did not create (MLFLOW_RUN_ID): it must exist; nested runs join its experiment."""
        from mlflow.exceptions import MlflowException

        try:
            info = client.get_run(run.id).info
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            message = (f"MLFLOW_RUN_ID={run.id}: no such run at {self.uri}; unset MLFLOW_RUN_ID or point "
                       f"tracking.uri / MLFLOW_TRACKING_URI at the server that created it")
            if strict:
                raise TrackingError(message) from None
            self._warn_once("badrun", f"tracking: {message}; logging to a new run instead")
            run.id, run.owned = None, True
            self._create(client, run)
            return
        self._experiment_id = info.experiment_id
        run.verified = True

    def _send(self, client: Any, run: _Run) -> None:
        from mlflow.entities import Metric, Param, RunTag

        while run.params:
            keys = list(run.params)[:_BATCH_PARAMS_TAGS]
            self._batch(client, run, "params", [Param(k, run.params[k]) for k in keys])
            for k in keys:
                del run.params[k]
        while run.tags:
            keys = list(run.tags)[:_BATCH_PARAMS_TAGS]
            self._batch(client, run, "tags", [RunTag(k, run.tags[k]) for k in keys])
            for k in keys:
                del run.tags[k]
        while run.metrics:
            chunk = run.metrics[:_BATCH_METRICS]
            self._batch(client, run, "metrics", [Metric(k, v, ts, step) for k, v, ts, step in chunk])
            del run.metrics[: len(chunk)]
        while run.artifacts:
            path, artifact_path, spooled = run.artifacts[0]
            try:
                if Path(path).is_dir():
                    client.log_artifacts(run.id, str(path), artifact_path)
                else:
                    client.log_artifact(run.id, str(path), artifact_path)
            except Exception as exc:
                if _is_transient(exc):
                    raise
                self._warn_once(f"art:{path}", f"tracking: MLflow refused artifact {path} for run "
                                               f"{run.name}: {_one_line(exc)}; skipped")
            run.artifacts.pop(0)
            if spooled:
                shutil.rmtree(Path(path).parent, ignore_errors=True)
        if run.end_status and not run.ended:
            client.set_terminated(run.id, run.end_status)
            run.ended = True

    def _batch(self, client: Any, run: _Run, kind: str, items: list) -> None:
        """log_batch; a refused batch is split until the refused entries are found and dropped."""
        try:
            client.log_batch(run.id, **{kind: items})
        except Exception as exc:
            if _is_transient(exc):
                raise
            if len(items) == 1:
                self._warn_once(f"{kind}:{items[0].key}", f"tracking: MLflow refused {kind[:-1]} "
                                                          f"{items[0].key!r} of run {run.name}: {_one_line(exc)}; dropped")
                return
            mid = len(items) // 2
            self._batch(client, run, kind, items[:mid])
            self._batch(client, run, kind, items[mid:])

    def _spill(self, reason: str, everything: bool = False, runs: list[_Run] | None = None) -> None:
        """Write pending metrics (and, at close, params/tags/artifact paths) to the JSONL file."""
        records = []
        for run in self._runs if runs is None else runs:
            base = {"run_id": run.id, "run_name": run.name,
                    "parent_run_id": run.parent.id if run.parent else None,
                    "parent_run_name": run.parent.name if run.parent else None}
            if run.id is None and (everything or run.metrics):
                # Never created: keep its tags so a replay can create it as it would have been.
                records.append({"type": "run", **base, "tags": run.create_tags})
            records += [{"type": "metric", **base, "key": k, "value": v, "timestamp": ts, "step": step}
                        for k, v, ts, step in run.metrics]
            n_metrics = len(run.metrics)
            run.metrics.clear()
            self.spilled += n_metrics
            if everything:
                records += [{"type": "param", **base, "key": k, "value": v} for k, v in run.params.items()]
                records += [{"type": "tag", **base, "key": k, "value": v} for k, v in run.tags.items()]
                records += [{"type": "artifact", **base, "path": str(p), "artifact_path": a}
                            for p, a, _ in run.artifacts]
                if run.end_status and not run.ended:
                    records.append({"type": "end", **base, "status": run.end_status})
                run.params.clear()
                run.tags.clear()
                run.artifacts.clear()
        if not records:
            return
        # Which server and experiment the records belong to: a replay sends them only there.
        header = {"type": "target", "uri": self.uri, "experiment": self.experiment}
        self._append_records([header, *records])
        if not self._spill_announced:
            self._spill_announced = True
            metrics = [r for r in records if r["type"] == "metric"]
            log.warning("tracking: MLflow at %s is unreachable (%s) and %s: wrote %d pending metrics (%s) to %s. "
                        "They are NOT in MLflow yet; the next tracker of this run folder that reaches %s (a later "
                        "stage, a rerun) sends them. Later overflows append to the same file without another "
                        "warning.", self.uri, _one_line(self._last_error, 120) if self._last_error else "no answer",
                        reason, len(metrics), _describe(metrics), self.spill_path, self.uri)

    def _append_records(self, records: list[dict]) -> None:
        self.spill_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.spill_path, "a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def replay_pending(self) -> int:
        """Send the records an earlier tracker spilled to `spill_path` for this server and
        experiment; returns how many metrics were delivered. Called at construction when the
        server answers. Records for another server stay in the file; what cannot be delivered
        now goes back to it."""
        with self._lock:
            path = self.spill_path
            claimed = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.replaying")
            try:
                os.rename(path, claimed)  # atomic: of two trackers, one gets the file
            except FileNotFoundError:
                return 0
            runs, foreign = self._runs_from_records(claimed)
            if foreign:
                self._append_records(foreign)
            sent = sum(len(r.metrics) for r in runs)
            self._runs.extend(runs)
            self._deliver(force=True)
            left = [r for r in runs if r.pending()]
            if left:
                # The server went away again: back to the file, for the next tracker.
                sent -= sum(len(r.metrics) for r in left)
                for run in left:
                    self._runs.remove(run)
                self._spill("it failed again while earlier pending records were replayed", everything=True,
                            runs=left)
            claimed.unlink()
            if sent:
                log.warning("tracking: sent %d metrics that an earlier process had left in %s to MLflow at %s",
                            sent, path, self.uri)
            return sent

    def _runs_from_records(self, path: Path) -> tuple[list[_Run], list[dict]]:
        """Rebuild pending runs from a spill file; records for another target are returned as-is."""
        runs: dict[tuple, _Run] = {}
        parents: dict[tuple, _Run] = {}
        foreign: list[dict] = []
        target: dict = {}
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                rec = json.loads(line)
            except ValueError:
                self._warn_once(f"badline:{path}", f"tracking: {path}:{number}: not a JSON record; skipped")
                continue
            if rec.get("type") == "target":
                target = rec
                continue
            # Records before any header (older files) belong to this run folder's tracker.
            if target and (target.get("uri"), target.get("experiment")) != (self.uri, self.experiment):
                if target not in foreign:
                    foreign.append(target)
                foreign.append(rec)
                continue
            parent = None
            if rec.get("parent_run_id") or rec.get("parent_run_name"):
                pkey = (rec.get("parent_run_id") or None, None if rec.get("parent_run_id") else rec.get("parent_run_name"))
                parent = parents.get(pkey) or runs.get(pkey)
                if parent is None:
                    parent = parents[pkey] = _Run(name=rec.get("parent_run_name") or "pipeline", parent=None,
                                                  id=pkey[0], owned=False, verified=pkey[0] is not None)
            key = (rec.get("run_id") or None, None if rec.get("run_id") else rec.get("run_name"))
            run = runs.get(key)
            if run is None:
                run = parents.pop(key, None) or _Run(name=rec.get("run_name") or "run", parent=parent, id=key[0],
                                                     owned=False, verified=key[0] is not None)
                run.parent = run.parent or parent
                runs[key] = run
            kind = rec.get("type")
            if kind == "run":
                run.create_tags = dict(rec.get("tags") or {})
            elif kind == "metric":
                run.metrics.append((rec["key"], float(rec["value"]), int(rec["timestamp"]), int(rec["step"])))
            elif kind == "param":
                run.params[rec["key"]] = rec["value"]
            elif kind == "tag":
                run.tags[rec["key"]] = rec["value"]
            elif kind == "artifact":
                artifact = Path(rec["path"])
                if artifact.exists():
                    run.artifacts.append([artifact, rec.get("artifact_path"), artifact.parent.parent.name == "mlflow-spool"])
                else:
                    self._warn_once(f"gone:{artifact}", f"tracking: pending artifact {artifact} no longer exists; skipped")
            elif kind == "end":
                run.end_status = rec["status"]
        # Parents that are only parents (no records of their own) are created on demand by _create.
        return list(parents.values()) + list(runs.values()), foreign

    # -- registry (used by the promotion gate) -------------------------------------------------------
    def _registry(self, what: str, fn: Any, attempts: int = 3) -> Any:
        for attempt in range(1, attempts + 1):
            try:
                return fn(self._client())
            except TrackingError:
                raise
            except Exception as exc:
                if _is_transient(exc) and attempt < attempts:
                    time.sleep(2 ** (attempt - 1))
                    continue
                hint = ""
                if "local path" in str(exc):
                    hint = "; a tracking server accepts only remote sources (use an s3:// storage.root)"
                raise TrackingError(f"MLflow registry at {self.uri}: {what}: {_one_line(exc)}{hint}") from exc
        raise AssertionError("unreachable")

    def register_version(self, name: str, source_uri: str, tags: Mapping[str, Any] | None = None, *,
                         run_id: str | None = None, description: str | None = None) -> RegisteredVersion:
        """A new version of registered model `name` (created if needed) pointing at `source_uri`."""
        from mlflow.exceptions import MlflowException

        def go(client: Any) -> RegisteredVersion:
            try:
                client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            mv = client.create_model_version(name, source=source_uri, run_id=run_id,
                                             tags={str(k): str(v) for k, v in (tags or {}).items()},
                                             description=description)
            return RegisteredVersion._from_mlflow(client.get_model_version(name, mv.version))

        return self._registry(f"register {name} from {source_uri}", go)

    def set_alias(self, name: str, alias: str, version: int | str) -> None:
        self._registry(f"set alias {name}@{alias} -> {version}",
                       lambda c: c.set_registered_model_alias(name, alias, str(version)))

    def get_version(self, name: str, alias: str) -> RegisteredVersion | None:
        """The version `name@alias` points at, or None if the model or the alias does not exist."""
        from mlflow.exceptions import MlflowException

        def go(client: Any) -> RegisteredVersion | None:
            try:
                return RegisteredVersion._from_mlflow(client.get_model_version_by_alias(name, alias))
            except MlflowException as exc:
                if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in str(exc):
                    return None
                raise

        return self._registry(f"get {name}@{alias}", go)

    def set_version_tags(self, name: str, version: int | str, tags: Mapping[str, Any]) -> None:
        def go(client: Any) -> None:
            for key, value in tags.items():
                client.set_model_version_tag(name, str(version), str(key), str(value))

        self._registry(f"tag {name} v{version}", go)


def _describe(metrics: list[dict]) -> str:
    """'loss, lr, think (steps 3-40 of anneal)': which metrics a spill holds, in one phrase."""
    if not metrics:
        return "none"
    keys = list(dict.fromkeys(m["key"] for m in metrics))
    names = ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
    steps = [m["step"] for m in metrics]
    runs = ", ".join(dict.fromkeys(m["run_name"] for m in metrics))
    return f"{names}; steps {min(steps)}-{max(steps)} of run {runs}"


def _find_pipeline_run(uri: str, experiment: str, pipeline_run_id: str) -> str | None:
    """The MLflow run tagged with this pipeline run id, or None (also when the server is away)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    _cap_mlflow_http_retries()  # a dead server must not stall this lookup for minutes
    try:
        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            return None
        runs = client.search_runs([exp.experiment_id], f"tags.`r4b.pipeline_run` = '{pipeline_run_id}'",
                                  max_results=1, order_by=["attributes.start_time ASC"])
        return runs[0].info.run_id if runs else None
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        log.warning("could not look up the pipeline run %s (%s); this stage logs to a new run",
                    pipeline_run_id, _one_line(exc))
        return None


def pipeline_tracker(run_cfg: RunConfig, pipeline_run_id: str | None = None) -> Tracker | None:
    """The Tracker a stage process uses: it joins the pipeline's MLflow run, or returns None on
    torchrun ranks > 0 (one writer per run).

    The pipeline run is `MLFLOW_RUN_ID` when set (the KFP MLflow plugin sets it), else the run
    tagged `r4b.pipeline_run=<id>` (the id comes from the argument or `R4B_PIPELINE_RUN_ID`, which
    the pipeline's tasks and launchers pass down), else a new run that gets that tag — so every task
    of one pipeline run nests its stage run under the same parent.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    pid = pipeline_run_id or os.environ.get("R4B_PIPELINE_RUN_ID", "")
    run_id = os.environ.get("MLFLOW_RUN_ID") or None
    uri = tracking_uri(run_cfg)
    if run_id is None and pid:
        if uri.startswith("sqlite:"):
            local_run_dir(run_cfg).mkdir(parents=True, exist_ok=True)
        run_id = _find_pipeline_run(uri, run_cfg.tracking.experiment, pid)
    tracker = Tracker(run_cfg, uri=uri, run_id=run_id, run_name=f"{run_cfg.name}-{pid}" if pid else None)
    if pid and run_id is None:
        tracker.set_tags({"r4b.pipeline_run": pid}, run=tracker.pipeline)
    return tracker
