"""Serving: a model on vLLM's OpenAI-compatible server with auto / long / short thinking.

    r4b serve --model models:/r4b-tiny@champion                 registry alias (MLflow), then serve
    r4b serve --model models:/r4b-tiny/3 --port 8001            a registry version
    r4b serve --model s3://bucket/tiny/bpo/model                a storage URI (cached locally)
    r4b serve --model runs/tiny/bpo/model --host 0.0.0.0        a local save_pretrained folder
    r4b serve --model models:/r4b-4b@champion --fetch-only --out /models/current
                                                                (the Helm chart's init container)

Any OpenAI client then talks to it; the mode is a chat-template argument per request, as on the
R-4B model card (`enable_thinking` true/false is accepted as an alias of long/short):

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    r = client.chat.completions.create(model="r4b", messages=[...], extra_body={
            "chat_template_kwargs": {"thinking_mode": "auto"}})       # auto | long | short
    r.choices[0].message.reasoning_content, r.choices[0].message.content

The story: resolve (`models:/NAME@ALIAS` or `models:/NAME/VERSION` through the MLflow registry at
the config's tracking URI; a version's source is its weights' storage URI) -> fetch (a local folder
is served in place, S3 is cached under `<run dir>/serving/cache`, `--out` copies atomically) ->
launch (`rollout/vllm_server.VLLMServer`, the one launcher of vLLM, with the serving flags of
`serving_args()`: no dev-mode routes, no client-supplied chat templates, the model length, and the
`r4b_vllm_serving` plugins from r4b_core/assets: a reasoning parser that knows our forced prefixes,
so `reasoning_content` / `content` come back split, and a middleware in front of every route).
Bad requests are 4xx with a message: unknown thinking_mode (the chat template, 400), max_tokens
beyond the model length (vLLM, 400), and from the middleware, on every route that takes media: an
item over `serve.max_image_bytes` (413), a modality the model does not take (400), a media URL
whose host is not in `serve.allowed_media_domains` (400; empty by default: no URL is fetched).
With `$R4B_SERVE_API_KEY` set, requests without `Authorization: Bearer <key>` get a 401.

`deploy_champion(cfg, decision)` is the pipeline's deploy step: locally it fetches the champion into
`<run dir>/serving/model` and says how to serve it; on a cluster (`launcher.kind: pytorchjob`) it
restarts the Helm chart's serving Deployment so its init container pulls the new champion.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from r4b_core.config import RunConfig
from r4b_core.errors import R4BError
from r4b_core.rollout.vllm_server import BUDGET_ARGS, BUDGET_ENV

REGISTRY_SCHEME = "models:/"
# r4b_core/assets/r4b_vllm_serving.py, imported by the server from its PYTHONPATH
PLUGIN_MODULE = "r4b_vllm_serving"
REASONING_PARSER = "r4b"
MIDDLEWARE = f"{PLUGIN_MODULE}.R4BServingMiddleware"
ENV_MAX_IMAGE_BYTES = "R4B_MAX_IMAGE_BYTES"
ENV_ALLOWED_MEDIA_DOMAINS = "R4B_ALLOWED_MEDIA_DOMAINS"
ENV_API_KEY = "R4B_SERVE_API_KEY"      # the key itself: from the environment (a Secret), never the config
ENV_THINKING_BUDGET = "R4B_THINKING_BUDGET"
ENV_THINKING_BUDGET_IS_LIMIT = "R4B_THINKING_BUDGET_IS_LIMIT"
# written next to fetched weights: what they are (skip a refetch of the same version)
ORIGIN_FILE = "r4b_serving.json"
# pod-template annotations of the serving Deployment (the first is what `kubectl rollout restart` sets)
RESTART_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
VERSION_ANNOTATION = "r4b.dev/champion"


class ServeError(R4BError):
    """The model cannot be resolved, fetched or served; the message says which and the fix."""


# ---------------------------------------------------------------------------------------------
# Resolve: models:/NAME@ALIAS | models:/NAME/VERSION | storage URI | folder
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResolvedModel:
    ref: str                   # what was asked for
    uri: str                   # where the weights are (storage URI or local folder)
    name: str | None = None    # registered model, for registry refs
    version: int | None = None
    alias: str | None = None

    def describe(self) -> str:
        return f"{self.ref} (v{self.version}: {self.uri})" if self.name else self.uri


def parse_registry_ref(ref: str) -> tuple[str, str | None, int | None]:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS, None); `models:/NAME/VERSION` -> (NAME, None, VERSION)."""
    body = ref[len(REGISTRY_SCHEME):].strip("/")
    usage = (f"--model {ref!r}: write models:/NAME@ALIAS (e.g. models:/r4b-tiny@champion) or "
             f"models:/NAME/VERSION (e.g. models:/r4b-tiny/3)")
    if "@" in body:
        name, _, alias = body.rpartition("@")
        if name and alias and "/" not in name:
            return name, alias, None
        raise ServeError(usage)
    name, _, version = body.rpartition("/")
    if name and version.isdigit() and "/" not in name:
        return name, None, int(version)
    raise ServeError(usage)


def resolve_model(cfg: RunConfig, ref: str) -> ResolvedModel:
    """Where the weights of `ref` are. Registry refs ask MLflow at the config's tracking URI
    (`tracking.uri`, else MLFLOW_TRACKING_URI, else the run's SQLite file); other refs are
    storage URIs or folders and pass through."""
    ref = str(ref).strip()
    if not ref:
        raise ServeError("--model is empty: pass models:/NAME@ALIAS, a storage URI or a model folder")
    if not ref.startswith(REGISTRY_SCHEME):
        return ResolvedModel(ref=ref, uri=ref)
    name, alias, version = parse_registry_ref(ref)

    from r4b_core.tracking import _cap_mlflow_http_retries, tracking_uri

    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise ServeError(f"{ref}: no MLflow registry at {uri} (the file does not exist); run the pipeline "
                         f"first (r4b run), or point --config's tracking.uri / MLFLOW_TRACKING_URI at the "
                         f"registry that holds {name}")
    _cap_mlflow_http_retries()   # a dead server fails in seconds, not minutes
    for noisy in ("mlflow.store.db.utils", "alembic"):   # SQLite schema chatter on every start
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, str(version))
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.error_code
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            fix = (f"register a model (r4b register) or point the alias at a version "
                   f"(r4b promote {name} VERSION --reason ...)" if alias else "pick an existing version")
            raise ServeError(f"{ref}: not in the MLflow registry at {uri} ({first}); {fix}") from None
        raise ServeError(f"{ref}: MLflow registry at {uri} failed: {first}") from None
    except Exception as exc:  # noqa: BLE001 - connection errors come as many types
        raise ServeError(f"{ref}: MLflow registry at {uri} unreachable ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); check tracking.uri / "
                         f"MLFLOW_TRACKING_URI") from None
    if not mv.source:
        raise ServeError(f"{ref}: version {mv.version} has no source; register versions with their weights' "
                         f"storage URI (r4b register)")
    return ResolvedModel(ref=ref, uri=mv.source, name=name, version=int(mv.version), alias=alias)


# ---------------------------------------------------------------------------------------------
# Fetch
# ---------------------------------------------------------------------------------------------
def serving_dir(cfg: RunConfig) -> Path:
    """`<local run dir>/serving`: the fetched champion (model/) and the S3 cache (cache/)."""
    from r4b_core.tracking import local_run_dir

    return local_run_dir(cfg) / "serving"


def _check_model_dir(path: Path, resolved: ResolvedModel) -> None:
    if not (path / "config.json").is_file():
        raise ServeError(f"{resolved.describe()}: {path} has no config.json, so it is not a save_pretrained "
                         f"model folder; point --model at one (e.g. runs/tiny/bpo/model)")
    if not any(path.glob("*.safetensors")):
        raise ServeError(f"{resolved.describe()}: {path} has no *.safetensors weights; r4b saves models "
                         f"with save_model / save_pretrained(safe_serialization=True)")


def _origin(resolved: ResolvedModel) -> dict[str, Any]:
    return {k: v for k, v in asdict(resolved).items() if v is not None}


def fetch_model(cfg: RunConfig, resolved: ResolvedModel, out: str | Path | None = None, store=None) -> Path:
    """A local folder with the weights of `resolved`.

    out=None: a local folder as it is, an S3 folder through the cache `<run dir>/serving/cache`.
    out=DIR: a copy at DIR, written atomically (a staging folder renamed into place) with the
    current chat template (models/tokenizer.py, so a server that reads the folder's template
    renders exactly our prompts) and `r4b_serving.json` naming its origin; a DIR that already
    holds the same origin is kept as it is.
    """
    from r4b_core.storage import Store, StorageError, parse_uri

    store = store or Store.from_config(cfg.storage)
    try:
        if out is None:
            path = store.local_path(resolved.uri, serving_dir(cfg) / "cache")
            _check_model_dir(path, resolved)
            return path
        out = Path(out)
        origin = _origin(resolved)
        try:
            if json.loads((out / ORIGIN_FILE).read_text()) == origin and (out / "config.json").is_file():
                return out
        except (OSError, ValueError):
            pass
        from r4b_core.models.tokenizer import served_chat_template
        from r4b_core.storage import join

        source = parse_uri(resolved.uri)
        if isinstance(source, Path):   # check before copying: a wrong folder may be large
            if not source.is_dir():
                raise ServeError(f"{resolved.describe()}: no such model folder {source.absolute()}")
            _check_model_dir(source, resolved)
        elif not store.exists(join(resolved.uri, "config.json")):
            raise ServeError(f"{resolved.describe()}: no config.json under {resolved.uri}; point --model at a "
                             f"save_pretrained folder (e.g. s3://bucket/run/bpo/model)")
        with store.atomic_dir(str(out)) as staging:
            if isinstance(source, Path):
                shutil.copytree(source, staging, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.r4b-tmp-*"))
            else:
                store.download_dir(resolved.uri, staging)
            _check_model_dir(staging, resolved)
            (staging / "chat_template.jinja").write_text(served_chat_template(staging))
            (staging / ORIGIN_FILE).write_text(json.dumps(origin, indent=2) + "\n")
        return out
    except StorageError as exc:
        raise ServeError(f"{resolved.describe()}: cannot fetch the weights: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------
def serving_args(cfg: RunConfig) -> list[str]:
    """vLLM flags that serving adds to the launcher's (rollout/vllm_server.server_command). The Helm
    chart's serving container renders the same from its `serving.*` values, which carry the names of
    `serve.*` in camelCase (tests/integration/test_helm_chart.py checks it for several values files)."""
    args = ["--max-model-len", str(cfg.serve.max_model_len),
            # the checkpoint's own dtype (later flags win over the sidecar command's pinned fp32)
            "--dtype", "auto",
            "--reasoning-parser-plugin", PLUGIN_MODULE, "--reasoning-parser", REASONING_PARSER,
            *BUDGET_ARGS, "--middleware", MIDDLEWARE]
    if cfg.serve.allowed_media_domains:   # vLLM checks the host again (empty means "any" to vLLM)
        args += ["--allowed-media-domains", *cfg.serve.allowed_media_domains]
    return args


def serving_env(cfg: RunConfig) -> dict[str, str]:
    """Environment of the serving process (the chart sets the same from its values)."""
    limit = cfg.serve.max_image_bytes
    budget = cfg.serve.thinking_budget
    return {ENV_MAX_IMAGE_BYTES: str(limit),
            ENV_ALLOWED_MEDIA_DOMAINS: ",".join(cfg.serve.allowed_media_domains),
            # inline media is checked by the middleware; vLLM caps downloads itself (in MiB) ...
            "VLLM_MAX_MEDIA_DOWNLOAD_SIZE_MB": str(max(1, math.ceil(limit / 2**20))),
            # ... and must not follow a redirect from an allowed host to one that is not
            "VLLM_MEDIA_URL_ALLOW_REDIRECTS": "0",
            ENV_THINKING_BUDGET: "" if budget is None else str(budget),
            ENV_THINKING_BUDGET_IS_LIMIT: "1" if cfg.serve.thinking_budget_is_limit else "0",
            **BUDGET_ENV}


def api_key_note(cfg: RunConfig, host: str, env: dict[str, str] | None = None) -> str:
    """How clients authenticate, for the start-up line; refuses to go on without a required key."""
    env = os.environ if env is None else env
    if env.get(ENV_API_KEY):
        return f"API key required (${ENV_API_KEY}): clients send 'Authorization: Bearer <key>'"
    if cfg.serve.require_api_key:
        raise ServeError(f"serve.require_api_key is true but ${ENV_API_KEY} is empty; export the key "
                         f"(e.g. {ENV_API_KEY}=$(openssl rand -hex 24)) or set serve.require_api_key: false")
    return f"no API key: whoever reaches {host} can use the server (set ${ENV_API_KEY} to require one)"


def served_model_names(resolved: ResolvedModel) -> list[str]:
    """The names clients may put in `model`: `r4b`, and for a registry ref the registered model with
    its alias or version (`r4b-4b@champion`), the name a router or KServe routes by."""
    from r4b_core.rollout.vllm_server import SERVED_MODEL_NAME

    return [SERVED_MODEL_NAME] + ([resolved.ref[len(REGISTRY_SCHEME):].strip("/")] if resolved.name else [])


def serving_server(cfg: RunConfig, model_dir: str | Path, host: str | None = None, port: int | None = None,
                   log_path: str | Path | None = None, names: list[str] | None = None):
    """A `VLLMServer` (not started) that serves `model_dir` with the serving flags; port 0 = a free one.
    `names`: the served model names (default: the launcher's one, `r4b`)."""
    from r4b_core.rollout.vllm_server import VLLMServer

    extra = serving_args(cfg) + (["--served-model-name", *names] if names else [])   # replaces the launcher's
    return VLLMServer(model_dir, cfg.vllm, port=cfg.serve.port if port is None else port, log_path=log_path,
                      extra_args=extra, host=host or cfg.serve.host,
                      trust_request_chat_template=False, dev_mode=False, env=serving_env(cfg))


def _budget_text(cfg: RunConfig) -> str:
    budget = cfg.serve.thinking_budget
    if budget is None:
        return "no default thinking budget"
    return (f"default thinking budget {budget} tokens" +
            (", the most a request may ask for" if cfg.serve.thinking_budget_is_limit else ""))


def serve(cfg: RunConfig, ref: str, host: str | None = None, port: int | None = None,
          log_path: str | Path | None = None, echo: Callable[[str], None] = print) -> None:
    """Resolve, fetch and serve `ref` until Ctrl-C / SIGTERM (or the server dies: ServeError)."""
    access = api_key_note(cfg, host or cfg.serve.host)   # before anything is fetched or started
    resolved = resolve_model(cfg, ref)
    model_dir = fetch_model(cfg, resolved)
    log_path = Path(log_path) if log_path else serving_dir(cfg) / "vllm.log"
    names = served_model_names(resolved)
    server = serving_server(cfg, model_dir, host, port, log_path, names)
    echo(f"serving {resolved.describe()} from {model_dir} on {server.host}:{server.port}; vLLM log: {log_path}")
    echo(access)
    main_thread = threading.current_thread() is threading.main_thread()   # signals: main thread only
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None

    def _terminate(signum, frame):   # a pod / service manager stops us with SIGTERM: stop vLLM too
        raise KeyboardInterrupt

    if main_thread:
        signal.signal(signal.SIGTERM, _terminate)
    t0 = time.monotonic()
    try:
        with server:
            echo(f"ready in {time.monotonic() - t0:.0f} s: OpenAI API at {server.url}/v1, model name "
                 f"{' or '.join(repr(n) for n in names)}; per request chat_template_kwargs={{\"thinking_mode\": "
                 f"\"auto\"|\"long\"|\"short\", \"thinking_budget\": N}}; {_budget_text(cfg)}; mode "
                 f"metrics at {server.url}/metrics. Ctrl-C stops.")
            while server.alive():
                time.sleep(1.0)
            raise ServeError(f"the vLLM server exited (log: {log_path}); last lines:\n{server.log_tail()}")
    except KeyboardInterrupt:
        echo("stopped")
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------------
# Deploy (the pipeline's last step)
# ---------------------------------------------------------------------------------------------
def champion_ref(cfg: RunConfig) -> str:
    return f"{REGISTRY_SCHEME}{cfg.tracking.registered_model}@{cfg.promotion.champion_alias}"


def _decision_text(decision: str) -> str:
    version, _, outcome = str(decision).partition(":")
    if outcome == "promoted":
        return f"v{version} was promoted to champion"
    if outcome == "kept":
        return f"v{version} was kept as challenger (the gate failed)"
    return f"register step said {decision!r}"


def deploy_champion(cfg: RunConfig, decision: str) -> str:
    """Make the version the register step promoted servable; returns what was done, for the
    pipeline's log.

    `decision` is the register step's "<version>:<promoted|kept>": a kept version changes nothing.
    A promoted one is resolved as `models:/NAME/<version>` (the version handed over, not a second
    alias lookup that another run may have moved). Locally it is fetched into
    `<run dir>/serving/model` (the same resolve/fetch as `r4b serve`; a folder that already holds
    that version is kept) and the message has the command that serves it. With
    `launcher.kind: pytorchjob` the chart's serving Deployment is restarted instead.
    """
    version, _, outcome = str(decision).partition(":")
    if outcome != "promoted" or not version.isdigit():
        return f"{_decision_text(decision)}; the champion is unchanged, nothing to deploy"
    resolved = resolve_model(cfg, f"{REGISTRY_SCHEME}{cfg.tracking.registered_model}/{version}")
    if cfg.launcher.kind == "pytorchjob":
        return f"{_decision_text(decision)}; " + restart_serving_deployment(cfg, resolved)
    target = serving_dir(cfg) / "model"
    fetch_model(cfg, resolved, out=target)
    return (f"{_decision_text(decision)}; champion {resolved.describe()} is in {target.absolute()}; serve it "
            f"with: r4b serve --model {target.absolute()} --port {cfg.serve.port}")


def restart_serving_deployment(cfg: RunConfig, resolved: ResolvedModel, api=None) -> str:
    """Roll the Helm chart's serving Deployment so its init container (`r4b serve --fetch-only`)
    pulls `resolved`. The only Kubernetes code of serving; the client is imported here.

    The chart's defaults ConfigMap (`launcher.defaults_configmap`, in `launcher.namespace`) names
    the Deployment (key R4B_SERVING_DEPLOYMENT; absent when serving is off); when that ConfigMap
    cannot be read, the chart's naming (<fullname>-defaults -> <fullname>-serving) is used. A
    Deployment already annotated with this version is left alone.
    """
    from datetime import datetime, timezone

    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    from r4b_core.launch.pytorchjob import _api_client, job_namespace

    api = api or _api_client()
    ns = job_namespace(cfg)
    cm_name = cfg.launcher.defaults_configmap
    if not cm_name:
        raise ServeError("launcher.defaults_configmap is empty: set it to the chart's <fullname>-defaults "
                         "ConfigMap so deploy can find the serving Deployment")
    name = cm_name.removesuffix("-defaults") + "-serving"
    try:
        data = k8s.CoreV1Api(api).read_namespaced_config_map(cm_name, ns).data or {}
        name = data.get("R4B_SERVING_DEPLOYMENT", "")
        if not name:
            return (f"serving is off in the chart (ConfigMap {ns}/{cm_name} has no R4B_SERVING_DEPLOYMENT); "
                    f"{resolved.describe()} is the champion; helm upgrade with serving.enabled=true "
                    f"--set serving.model={champion_ref(cfg)} to serve it")
    except ApiException as exc:
        if exc.status == 404:
            raise ServeError(f"ConfigMap {ns}/{cm_name} not found: install the chart (helm install r4b "
                             f"charts/r4b) in launcher.namespace={ns!r} or set launcher.defaults_configmap") from None
        if exc.status != 403:
            raise ServeError(f"reading ConfigMap {ns}/{cm_name}: HTTP {exc.status} {exc.reason}") from None
    apps = k8s.AppsV1Api(api)
    version = f"{resolved.name}/{resolved.version}"
    try:
        current = apps.read_namespaced_deployment(name, ns)
        annotations = (current.spec.template.metadata.annotations or {}) if current.spec.template.metadata else {}
        if annotations.get(VERSION_ANNOTATION) == version:
            return f"Deployment {ns}/{name} already serves {resolved.describe()}; not restarted"
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        patch = {"spec": {"template": {"metadata": {"annotations": {RESTART_ANNOTATION: now,
                                                                    VERSION_ANNOTATION: version}}}}}
        apps.patch_namespaced_deployment(name, ns, patch)
    except ApiException as exc:
        if exc.status == 404:
            raise ServeError(f"Deployment {ns}/{name} not found: enable serving in the chart "
                             f"(serving.enabled=true, serving.model={champion_ref(cfg)})") from None
        if exc.status == 403:
            raise ServeError(f"Deployment {ns}/{name}: forbidden ({exc.reason}); the pipeline runner's "
                             f"service account needs get/patch on deployments (the chart's Role)") from None
        raise ServeError(f"Deployment {ns}/{name}: HTTP {exc.status} {exc.reason}") from None
    return f"restarted Deployment {ns}/{name}: its init container pulls {resolved.describe()}"
