"""Run an r4b training stage (anneal, bpo) on Kubernetes as a Kubeflow PyTorchJob (Training Operator v1).

The KFP components call one function; it returns when the job finished and raises if it did not:

    from r4b_core.launch.pytorchjob import launch
    result = launch("bpo", "s3://bucket/runs/r4b-4b/config.yaml", run_cfg, run_id=PIPELINE_RUN_ID)

What it builds (kubeflow-training 1.9.4 SDK models, serialized by the kubernetes client):
- one Master and `nnodes - 1` Workers, each pod running
  `torchrun --nproc-per-node=N -m r4b_core.cli <stage> --config <URI>`; the operator sets the
  PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT env that torchrun reads;
- GPUs, memory, a memory-backed `/dev/shm`, env from a Secret (`envFrom`, never literal credentials)
  and from the chart's defaults ConfigMap, node selector / tolerations, `sidecar.istio.io/inject: "false"`,
  restricted pod security (non-root, no privilege escalation, all capabilities dropped, read-only root);
- for BPO with `bpo.engine: vllm`, in every pod: an init step that copies the starting weights into
  `/dev/shm/r4b/model`, then the vLLM OpenAI server as a **native sidecar** (an initContainer with
  `restartPolicy: Always`): own GPUs, exec startup/readiness probes on `/health`, bound to 127.0.0.1 so
  its dev-mode routes (weight reload) are reachable only from inside the pod. The trainer finds it at
  `R4B_VLLM_URL` and hands weights over through `R4B_SHM_DIR`. The job completes when the trainer exits.

Idempotent: the job name is derived from (pipeline run id, stage); an existing running job is adopted
(a retried pipeline step picks up where it was), a succeeded one is reported as done, a failed one is
deleted and launched again (the stage resumes from its last checkpoint). While waiting, the master's
log is streamed and new Warning events are printed; a failure raises `PyTorchJobFailed` carrying the
job condition, each pod's container states, the Warning events and the master's last log lines.

Without a cluster:
    python -m r4b_core.launch.pytorchjob render --stage bpo --config configs/r4b-4b.yaml
prints the PyTorchJob YAML (docs/kubernetes.md shows one). The sidecar's init step is the serving
pod's: `r4b serve --config <URI> --model <init model URI> --fetch-only --out /dev/shm/r4b/model`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubeflow.training import models as kf
from kubernetes import client as k8s
from kubernetes.client.rest import ApiException
from kubernetes.utils import parse_quantity

from r4b_core import layout
from r4b_core.config import (DEFAULT_CREDENTIALS_SECRET, DEFAULT_PLATFORM_IMAGE, DEFAULT_VLLM_IMAGE, ConfigError,
                             RunConfig)
from r4b_core.errors import R4BError
from r4b_core.launch import CLIENT_LABELS, LaunchError
from r4b_core.rollout.vllm_server import SERVED_MODEL_NAME, server_command

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
STAGES = ("anneal", "bpo")
TRAINER = "pytorch"              # the operator requires a container with this name
SIDECAR = "vllm"
FETCH = "fetch-weights"
MASTER_PORT = 23456              # the operator's default; named so it finds it
SHM_DIR = "/dev/shm/r4b"
SIDECAR_MODEL_DIR = SHM_DIR + "/model"
SIDECAR_CHAT_TEMPLATE = SIDECAR_MODEL_DIR + "/chat_template.jinja"   # written by the fetch step (r4b serve --fetch-only)
RUN_AS = 1000                    # the uid our images create (docker/*.Dockerfile)
# Where docker/vllm.Dockerfile puts r4b_core/assets (the worker extension named by
# vllm_server.WORKER_EXTENSION, the serving plugin): on the sidecar's PYTHONPATH.
VLLM_ASSETS_DIR = "/opt/r4b/assets"
# Pod names are <job>-worker-<i> and the operator makes a Service of each: keep room under 63.
MAX_NAME = 48
# Env that the KFP MLflow plugin injects into the launcher; forwarded so the stage logs into that run.
FORWARDED_ENV = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_WORKSPACE")

JOB_LABEL = "training.kubeflow.org/job-name"
ROLE_LABEL = "training.kubeflow.org/job-role"
SPEC_HASH = "r4b.dev/spec-hash"


class PyTorchJobFailed(R4BError):
    """The job ended in Failed; the message carries the reason, pod states, events and log tail."""


class PyTorchJobTimeout(R4BError):
    """The job did not finish within launcher.timeout_s."""


@dataclass
class LaunchResult:
    name: str
    namespace: str
    state: str                    # "Succeeded"
    action: str                   # "created" | "adopted" | "recreated" | "already-succeeded"
    seconds: float
    conditions: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Names and labels
# ---------------------------------------------------------------------------------------------
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def job_name(run_id: str, stage: str, extra_args: Sequence[str] = ()) -> str:
    """Deterministic DNS-1035 name (<= 48 chars) from the pipeline run id, the stage (its readable
    token, e.g. "bpo" or "grpo") and the stage's extra CLI args (two variants of a stage in one run
    get two jobs)."""
    if not run_id:
        raise LaunchError("run_id is empty; pass the pipeline run id (dsl.PIPELINE_JOB_ID_PLACEHOLDER)")
    digest = hashlib.sha256(json.dumps([run_id, stage, list(extra_args)]).encode()).hexdigest()[:8]
    head = f"r4b-{stage}-"
    slug = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")
    slug = slug[: MAX_NAME - len(head) - len(digest) - 1].strip("-")
    return f"{head}{slug}-{digest}" if slug else f"{head}{digest}"


def _label_value(text: str) -> str:
    """A label value: <= 63 chars of [A-Za-z0-9._-], starting and ending alphanumeric."""
    value = re.sub(r"[^A-Za-z0-9._-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


# ---------------------------------------------------------------------------------------------
# Building the PyTorchJob
# ---------------------------------------------------------------------------------------------
_REMOTE = ("s3://", "gs://", "http://", "https://")


def launch_problems(stage: str, config_uri: str, cfg: RunConfig) -> list[str]:
    """What cannot work in a pod, each naming the field and the fix (empty: fine). `r4b prepare`
    checks both stages with it, so bad launcher settings fail in the first minute."""
    if stage not in STAGES:
        raise LaunchError(f"stage {stage!r} cannot run as a PyTorchJob; choose one of {', '.join(STAGES)}")
    L, dist = cfg.launcher, getattr(cfg, stage).distributed
    errors = []
    if not config_uri.startswith(_REMOTE):
        errors.append(f"config URI {config_uri!r} is not readable from a pod; write the resolved config "
                      "to the run's object-store prefix (s3://...) and pass that URI")
    if not cfg.storage.root.startswith(_REMOTE):
        errors.append(f"storage.root: {cfg.storage.root!r} is a local path; pods would write into their own "
                      "filesystem and lose it; set storage.root: s3://<bucket>/<prefix>")
    if L.gpus_per_node and dist.nproc_per_node > L.gpus_per_node:
        errors.append(f"{stage}.distributed.nproc_per_node: {dist.nproc_per_node} processes but "
                      f"launcher.gpus_per_node is {L.gpus_per_node}; one process per GPU: lower it or add GPUs")
    if not L.gpus_per_node and dist.backend == "nccl":
        errors.append(f"{stage}.distributed.backend: 'nccl' needs GPUs but launcher.gpus_per_node is 0; "
                      "use backend: auto or gloo, or set launcher.gpus_per_node")
    if _has_sidecar(stage, cfg):
        if "/" in cfg.vllm.python or "\\" in cfg.vllm.python:
            errors.append(f"vllm.python: {cfg.vllm.python!r} is a path on this machine; in the sidecar image "
                          "the interpreter is 'python3' (set vllm.python: python3)")
        if L.gpus_per_node and not L.sidecar_gpus:
            errors.append("launcher.sidecar_gpus: 0 while trainer pods have GPUs; the vLLM sidecar needs its "
                          "own GPU (set launcher.sidecar_gpus: 1)")
    for key in ("memory", "sidecar_memory", "shm_size") + (("cpu",) if L.cpu else ()):
        try:
            parse_quantity(getattr(L, key))
        except ValueError:
            errors.append(f"launcher.{key}: {getattr(L, key)!r} is not a Kubernetes quantity (e.g. 16Gi, 500m)")
    return errors


# The launcher settings a config may leave null -> the chart's ConfigMap key that names them
# (charts/r4b/templates/configmap.yaml) and the built-in value without the chart.
CHART_KEYS = {"image": ("R4B_PLATFORM_IMAGE", DEFAULT_PLATFORM_IMAGE),
              "vllm_image": ("R4B_VLLM_IMAGE", DEFAULT_VLLM_IMAGE),
              "secret_name": ("R4B_CREDENTIALS_SECRET", DEFAULT_CREDENTIALS_SECRET)}
# where a pod finds its own namespace (the service account volume Kubernetes mounts)
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def fill_launcher(cfg: RunConfig, chart: Mapping[str, str] | None = None, namespace: str | None = None) -> RunConfig:
    """`cfg` with the launcher settings it leaves null: from the chart's ConfigMap data, else built in."""
    L, chart = cfg.launcher, chart or {}
    update: dict[str, Any] = {name: chart.get(key) or default for name, (key, default) in CHART_KEYS.items()
                              if getattr(L, name) is None}
    if namespace and not L.namespace:
        update["namespace"] = namespace
    return cfg.model_copy(update={"launcher": L.model_copy(update=update)}) if update else cfg


def job_namespace(cfg: RunConfig) -> str:
    """launcher.namespace, else the namespace of the pod this runs in (a pipeline task)."""
    if cfg.launcher.namespace:
        return cfg.launcher.namespace
    try:
        own = open(SA_NAMESPACE_FILE).read().strip()
    except OSError:
        own = ""
    if not own:
        raise LaunchError(f"launcher.namespace is not set and this process is not in a pod (no {SA_NAMESPACE_FILE}); "
                          f"set launcher.namespace to the namespace the r4b chart is installed in")
    return own


def chart_settings(cfg: RunConfig, api: k8s.ApiClient, log: Callable[[str], None] = print) -> RunConfig:
    """The launcher settings of a job: the config's, the rest from the Helm chart installed in the job
    namespace. That namespace must hold the chart's ConfigMap (launcher.defaults_configmap): the
    chart's training NetworkPolicy and RBAC live there, and a job anywhere else would run outside them.
    launcher.defaults_configmap: null skips the check (a namespace without the chart)."""
    ns, L = job_namespace(cfg), cfg.launcher
    data: dict[str, str] = {}
    if L.defaults_configmap:
        try:
            data = k8s.CoreV1Api(api).read_namespaced_config_map(L.defaults_configmap, ns).data or {}
        except ApiException as exc:
            if exc.status not in (403, 404):
                raise _api_error(exc, f"reading ConfigMap {L.defaults_configmap}", ns) from None
            raise LaunchError(
                f"namespace {ns!r} has no readable ConfigMap {L.defaults_configmap} (HTTP {exc.status} {exc.reason}): "
                f"the r4b chart is not installed there, so its training NetworkPolicy would not cover the jobs; "
                f"set launcher.namespace to the chart's release namespace (helm list -A), or "
                f"launcher.defaults_configmap: null to run without the chart") from None
        for name, (key, _) in CHART_KEYS.items():
            ours = getattr(L, name)
            if ours is not None and data.get(key) and data[key] != ours:
                log(f"launcher.{name}: {ours!r} (config) wins over the chart's {key}={data[key]!r}")
    return fill_launcher(cfg, data, ns)


def _has_sidecar(stage: str, cfg: RunConfig) -> bool:
    return stage == "bpo" and cfg.bpo.engine == "vllm"


def _tolerations(items: list[dict[str, Any]]) -> list[k8s.V1Toleration]:
    names = {"key": "key", "operator": "operator", "value": "value", "effect": "effect",
             "tolerationSeconds": "toleration_seconds"}
    out = []
    for i, item in enumerate(items):
        unknown = sorted(set(item) - set(names))
        if unknown:
            raise ConfigError(f"launcher.tolerations[{i}].{unknown[0]}: unknown key; allowed: {', '.join(names)}")
        out.append(k8s.V1Toleration(**{names[k]: v for k, v in item.items()}))
    return out


def _env(pairs: Mapping[str, str]) -> list[k8s.V1EnvVar]:
    return [k8s.V1EnvVar(name=k, value=str(v)) for k, v in pairs.items()]


def _gib_plus(quantity: str, extra_gib: int) -> str:
    """quantity + extra GiB, written in Mi (a memory limit that also holds what is put in /dev/shm)."""
    mib = math.ceil(parse_quantity(quantity) / (1 << 20)) + extra_gib * 1024
    return f"{mib}Mi"


def _security() -> k8s.V1SecurityContext:
    return k8s.V1SecurityContext(
        allow_privilege_escalation=False, capabilities=k8s.V1Capabilities(drop=["ALL"]),
        read_only_root_filesystem=True, run_as_non_root=True)


def _storage_env(cfg: RunConfig) -> dict[str, str]:
    env = {"HOME": "/tmp", "AWS_DEFAULT_REGION": cfg.storage.s3_region}
    if cfg.storage.s3_endpoint_url:
        env["AWS_ENDPOINT_URL_S3"] = cfg.storage.s3_endpoint_url
        env["MLFLOW_S3_ENDPOINT_URL"] = cfg.storage.s3_endpoint_url
    return env


def _env_from(cfg: RunConfig) -> list[k8s.V1EnvFromSource]:
    L = cfg.launcher
    # The Secret is required (a pod without credentials should fail visibly, CreateContainerConfigError);
    # the chart's defaults ConfigMap is optional so jobs also run in namespaces without the chart.
    out = [k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=L.secret_name))]
    if L.defaults_configmap:
        out.append(k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=L.defaults_configmap,
                                                                               optional=True)))
    return out


def _mounts() -> list[k8s.V1VolumeMount]:
    return [k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
            k8s.V1VolumeMount(name="tmp", mount_path="/tmp")]


def _health_probe(port: int, period: int, failures: int, python: str) -> k8s.V1Probe:
    # exec, not httpGet: the kubelet's HTTP probes come from outside the pod's loopback, and the
    # sidecar listens on 127.0.0.1 only.
    code = f"import urllib.request as u; u.urlopen('http://127.0.0.1:{port}/health', timeout=4)"
    return k8s.V1Probe(_exec=k8s.V1ExecAction(command=[python, "-c", code]),
                       period_seconds=period, failure_threshold=failures, timeout_seconds=5)


def _sidecar_containers(cfg: RunConfig, config_uri: str, model_uri: str) -> list[k8s.V1Container]:
    L, v = cfg.launcher, cfg.vllm
    # the serving pod's init step too: the folder, copied atomically, with our chat template in it
    fetch = k8s.V1Container(
        name=FETCH, image=L.image,
        command=["python", "-m", "r4b_core.cli", "serve", "--config", config_uri, "--model", model_uri,
                 "--fetch-only", "--out", SIDECAR_MODEL_DIR],
        env=_env(_storage_env(cfg)), env_from=_env_from(cfg),
        # tmpfs pages are charged to the container that writes them: room for the weights
        resources=k8s.V1ResourceRequirements(requests={"memory": "1Gi"},
                                             limits={"memory": _gib_plus(L.shm_size, 1)}),
        volume_mounts=_mounts(), security_context=_security())
    # The same command line as the local sidecar (rollout/vllm_server.py): logprobs mode, generation
    # config, chat template, worker extension all match what the BPO client expects.
    command = server_command(v.python, SIDECAR_MODEL_DIR, v, L.sidecar_port, host="127.0.0.1",
                             chat_template_path=SIDECAR_CHAT_TEMPLATE)
    # server_command pins fp32 (token-exact parity with transformers on CPU); on a cluster the sidecar
    # serves in the trainer's dtype (model.dtype), which is what the rollout logprobs are compared to.
    command[command.index("--dtype") + 1] = cfg.model.dtype
    env = {"VLLM_SERVER_DEV_MODE": "1", "HOME": "/tmp", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": VLLM_ASSETS_DIR}
    limits: dict[str, str] = {"memory": L.sidecar_memory}
    if L.sidecar_gpus:
        limits[L.gpu_resource] = str(L.sidecar_gpus)
    else:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(v.kv_cache_gib)
        if v.cpu_threads:
            # as the local sidecar (rollout/vllm_server.server_env): a few unpinned threads; with
            # vllm.cpu_threads null vLLM binds one thread per core the container's cpuset grants
            env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
            env["OMP_NUM_THREADS"] = str(v.cpu_threads)
    period = 5
    sidecar = k8s.V1Container(
        name=SIDECAR, image=L.vllm_image, restart_policy="Always",
        command=command,
        env=_env(env),
        resources=k8s.V1ResourceRequirements(requests={"memory": L.sidecar_memory}, limits=limits),
        startup_probe=_health_probe(L.sidecar_port, period, math.ceil(v.startup_timeout_s / period), v.python),
        readiness_probe=_health_probe(L.sidecar_port, 10, 3, v.python),
        # no liveness probe: a restarted sidecar would serve the starting weights; the trainer's
        # per-sync verification catches that and fails loudly instead.
        volume_mounts=_mounts(), security_context=_security())
    return [fetch, sidecar]


def build_pytorchjob(stage: str, config_uri: str, cfg: RunConfig, run_id: str,
                     extra_env: Mapping[str, str] | None = None, extra_args: Sequence[str] | None = None,
                     init_model_uri: str | None = None) -> kf.KubeflowOrgV1PyTorchJob:
    """The PyTorchJob for one stage of one pipeline run (SDK model objects; see `manifest`).

    `extra_args` are appended to the stage command (its inputs, e.g. `--init-model URI`, and
    `--set bpo.algorithm=grpo`); `cfg` must already reflect them (it decides resources, the sidecar
    and the name: the GRPO control is "grpo"). The BPO sidecar starts from `launcher.sidecar_model_uri`,
    else `init_model_uri` (the stage's init model), else the run's annealed model.
    """
    errors = launch_problems(stage, config_uri, cfg)
    if errors:
        raise ConfigError("\n".join(errors))
    cfg = fill_launcher(cfg)     # what launch() did not take from the chart: built in (namespace: none)
    L, dist = cfg.launcher, getattr(cfg, stage).distributed
    extra_args = list(extra_args or [])
    name = job_name(run_id, cfg.bpo.algorithm if stage == "bpo" else stage, extra_args)
    labels = {"app.kubernetes.io/name": "r4b", "app.kubernetes.io/part-of": "r4b",
              "app.kubernetes.io/component": "trainer", "r4b.dev/stage": stage,
              "r4b.dev/run-id": _label_value(run_id), **CLIENT_LABELS}
    env = {"R4B_STAGE": stage, "R4B_RUN_ID": run_id, "R4B_CONFIG_URI": config_uri, **_storage_env(cfg)}
    if cfg.tracking.uri:
        env["MLFLOW_TRACKING_URI"] = cfg.tracking.uri
    if L.gpus_per_node == 0:
        env["OMP_NUM_THREADS"] = "1"   # torchrun would set it anyway; explicit so gloo ranks don't oversubscribe
    sidecar = _has_sidecar(stage, cfg)
    if sidecar:
        env |= {"R4B_VLLM_URL": f"http://127.0.0.1:{L.sidecar_port}", "R4B_VLLM_MODEL": SERVED_MODEL_NAME,
                "R4B_SHM_DIR": SHM_DIR, "R4B_VLLM_MODEL_DIR": SIDECAR_MODEL_DIR}
    env |= dict(extra_env or {})

    requests: dict[str, str] = {"memory": L.memory}
    limits: dict[str, str] = {"memory": L.memory}
    if L.cpu:
        requests["cpu"] = L.cpu
    if L.gpus_per_node:
        limits[L.gpu_resource] = str(L.gpus_per_node)
    trainer = k8s.V1Container(
        name=TRAINER, image=L.image,
        command=["torchrun", f"--nproc-per-node={dist.nproc_per_node}",
                 "-m", "r4b_core.cli", stage, "--config", config_uri, *extra_args],
        ports=[k8s.V1ContainerPort(name="pytorchjob-port", container_port=MASTER_PORT, protocol="TCP")],
        env=_env(env), env_from=_env_from(cfg),
        resources=k8s.V1ResourceRequirements(requests=requests, limits=limits),
        volume_mounts=_mounts(), security_context=_security())

    model_uri = L.sidecar_model_uri or init_model_uri or layout.model_dir(cfg, "anneal")
    pod = k8s.V1PodSpec(
        containers=[trainer],
        init_containers=_sidecar_containers(cfg, config_uri, model_uri) if sidecar else None,
        volumes=[k8s.V1Volume(name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory",
                                                                                size_limit=L.shm_size)),
                 k8s.V1Volume(name="tmp", empty_dir=k8s.V1EmptyDirVolumeSource())],
        node_selector=dict(L.node_selector) or None,
        tolerations=_tolerations(L.tolerations) or None,
        service_account_name=L.service_account,
        automount_service_account_token=False,   # training pods never call the Kubernetes API
        security_context=k8s.V1PodSecurityContext(
            run_as_non_root=True, run_as_user=RUN_AS, run_as_group=RUN_AS, fs_group=RUN_AS,
            seccomp_profile=k8s.V1SeccompProfile(type="RuntimeDefault")),
    )
    template = k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels=labels, annotations={"sidecar.istio.io/inject": "false"}),
        spec=pod)
    # Never restart a pod in place: a lone restarted rank cannot rejoin a static torchrun rendezvous.
    # Retries are whole-job (the pipeline step retries; the stage resumes from its checkpoint).
    replicas = {"Master": kf.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="Never", template=template)}
    if dist.nnodes > 1:
        replicas["Worker"] = kf.KubeflowOrgV1ReplicaSpec(replicas=dist.nnodes - 1, restart_policy="Never",
                                                          template=template)
    job = kf.KubeflowOrgV1PyTorchJob(
        api_version=f"{GROUP}/{VERSION}", kind=KIND,
        metadata=k8s.V1ObjectMeta(name=name, namespace=L.namespace, labels=dict(labels), annotations={}),
        spec=kf.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(dist.nproc_per_node),
            pytorch_replica_specs=replicas,
            run_policy=kf.KubeflowOrgV1RunPolicy(
                clean_pod_policy="None",     # keep finished pods: their logs and states explain failures
                backoff_limit=0,
                active_deadline_seconds=int(L.timeout_s)),
        ),
    )
    spec_dict = k8s.ApiClient().sanitize_for_serialization(job.spec)
    job.metadata.annotations[SPEC_HASH] = hashlib.sha256(
        json.dumps(spec_dict, sort_keys=True).encode()).hexdigest()[:16]
    return job


def manifest(job: kf.KubeflowOrgV1PyTorchJob) -> dict:
    """The JSON-ready dict the API server receives."""
    return k8s.ApiClient().sanitize_for_serialization(job)


def render(stage: str, config_uri: str, cfg: RunConfig, run_id: str) -> str:
    """The PyTorchJob as YAML (for docs and `kubectl apply --dry-run=server -f -`)."""
    import yaml

    return yaml.safe_dump(manifest(build_pytorchjob(stage, config_uri, cfg, run_id)), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Talking to the cluster
# ---------------------------------------------------------------------------------------------
class JobAPI:
    """The calls the launcher makes, on the kubernetes client's CustomObjectsApi and CoreV1Api."""

    def __init__(self, api_client: k8s.ApiClient, namespace: str):
        self.custom = k8s.CustomObjectsApi(api_client)
        self.core = k8s.CoreV1Api(api_client)
        self.ns = namespace

    def get(self, name: str) -> dict | None:
        try:
            return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, body: dict) -> dict:
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

    def delete(self, name: str) -> None:
        try:
            # Foreground: the job disappears only after its pods, so a new job of the same name
            # never meets the old pods.
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.ns, PLURAL, name, propagation_policy="Foreground")
        except ApiException as exc:
            if exc.status != 404:
                raise

    def pods(self, name: str) -> list[k8s.V1Pod]:
        return self.core.list_namespaced_pod(self.ns, label_selector=f"{JOB_LABEL}={name}").items

    def warning_events(self) -> list[k8s.CoreV1Event]:
        return self.core.list_namespaced_event(self.ns, field_selector="type=Warning").items

    def log_tail(self, pod: str, lines: int) -> str:
        return self.core.read_namespaced_pod_log(pod, self.ns, container=TRAINER, tail_lines=lines)

    def follow_log(self, pod: str, tail_lines: int | None) -> Iterator[str]:
        resp = self.core.read_namespaced_pod_log(pod, self.ns, container=TRAINER, follow=True,
                                                 tail_lines=tail_lines, _preload_content=False)
        buf = b""
        try:
            for chunk in resp.stream(4096):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    yield line.decode("utf-8", "replace")
            if buf:
                yield buf.decode("utf-8", "replace")
        finally:
            resp.release_conn()


def _api_client() -> k8s.ApiClient:
    from kubernetes import config as kconfig

    try:
        kconfig.load_incluster_config()
    except kconfig.ConfigException:
        try:
            kconfig.load_kube_config()
        except (kconfig.ConfigException, FileNotFoundError, TypeError) as exc:
            raise LaunchError(f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({exc}); "
                              "run inside the cluster or set KUBECONFIG") from None
    return k8s.ApiClient()


def _api_error(exc: ApiException, what: str, ns: str) -> LaunchError:
    if exc.status == 403:
        return LaunchError(f"{what}: forbidden in namespace {ns!r} ({exc.reason}); the pipeline runner's "
                           "service account needs the chart's Role (helm install r4b charts/r4b "
                           "--set rbac.runnerServiceAccounts[0].name=<sa>) or equivalent RBAC")
    if exc.status == 404:
        return LaunchError(f"{what}: the API server has no pytorchjobs.kubeflow.org/v1 in namespace {ns!r}; "
                           "install the Kubeflow Training Operator v1.9 (docs/kubernetes.md) or check "
                           "launcher.namespace")
    body = (exc.body or "")[:300] if isinstance(exc.body, str) else exc.body
    return LaunchError(f"{what}: HTTP {exc.status} {exc.reason}: {body}")


# ---------------------------------------------------------------------------------------------
# Status, failure reasons
# ---------------------------------------------------------------------------------------------
def job_state(obj: Mapping) -> str:
    """Succeeded / Failed once terminal, else the latest True condition (Created, Running, ...), or Pending."""
    conds = (obj.get("status") or {}).get("conditions") or []
    true = [c for c in conds if c.get("status") == "True"]
    for terminal in ("Failed", "Succeeded"):
        if any(c.get("type") == terminal for c in true):
            return terminal
    return true[-1]["type"] if true else "Pending"


def _container_lines(pod: k8s.V1Pod) -> list[str]:
    out = []
    statuses = [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]
    for cs in statuses:
        st = cs.state
        if st and st.terminated and (st.terminated.exit_code or st.terminated.reason not in (None, "Completed")):
            t = st.terminated
            out.append(f"  {pod.metadata.name}/{cs.name}: terminated {t.reason or ''} exit code "
                       f"{t.exit_code}{': ' + t.message.strip() if t.message else ''}")
        elif st and st.waiting and st.waiting.reason not in (None, "PodInitializing", "ContainerCreating"):
            w = st.waiting
            out.append(f"  {pod.metadata.name}/{cs.name}: waiting {w.reason}"
                       f"{': ' + w.message.strip() if w.message else ''}")
    return out


def _pod_summary(pods: list[k8s.V1Pod]) -> str:
    return ", ".join(f"{p.metadata.name.rsplit('-', 2)[-2]}-{p.metadata.name.rsplit('-', 1)[-1]} "
                     f"{p.status.phase}" for p in sorted(pods, key=lambda p: p.metadata.name)) or "no pods yet"


def _job_events(api: JobAPI, name: str, pods: list[k8s.V1Pod]) -> list[k8s.CoreV1Event]:
    names = {name, *(p.metadata.name for p in pods)}
    evs = [e for e in api.warning_events() if e.involved_object and e.involved_object.name in names]
    return sorted(evs, key=lambda e: str(e.last_timestamp or e.event_time or ""))


def failure_report(api: JobAPI, name: str, obj: Mapping | None, tail: int = 20) -> str:
    """Why the job did not succeed: condition, container states, Warning events, master log tail."""
    lines = []
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") in ("Failed", "Restarting") and c.get("status") == "True":
            lines.append(f"  condition {c['type']}: {c.get('reason', '')}: {c.get('message', '')}")
    try:
        pods = api.pods(name)
    except ApiException as exc:
        return "\n".join([*lines, f"  (pods unreadable: HTTP {exc.status} {exc.reason})"])
    for pod in sorted(pods, key=lambda p: p.metadata.name):
        lines += _container_lines(pod)
    try:
        for ev in _job_events(api, name, pods)[-8:]:
            lines.append(f"  event {ev.involved_object.name}: {ev.reason}: {(ev.message or '').strip()}")
    except ApiException as exc:
        lines.append(f"  (events unreadable: HTTP {exc.status} {exc.reason})")
    master = f"{name}-master-0"
    if any(p.metadata.name == master for p in pods):
        try:
            text = api.log_tail(master, tail)
            if text.strip():
                lines.append(f"  last {tail} log lines of {master}:")
                lines += ["    " + ln for ln in text.rstrip("\n").splitlines()[-tail:]]
        except ApiException:
            pass
    return "\n".join(lines) if lines else "  (no condition message, pod state or event explains it)"


# ---------------------------------------------------------------------------------------------
# Create, adopt, wait
# ---------------------------------------------------------------------------------------------
def _wait_gone(api: JobAPI, name: str, timeout_s: float, poll_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while api.get(name) is not None:
        if time.monotonic() > deadline:
            raise LaunchError(f"pytorchjob {name} still exists {timeout_s:.0f}s after deletion; check its "
                              f"finalizers: kubectl -n {api.ns} get pytorchjob {name} -o yaml")
        time.sleep(poll_s)


def get_or_create(api: JobAPI, body: dict, log: Callable[[str], None], poll_s: float) -> tuple[dict, str]:
    """Create the job, or adopt the one a previous attempt of this pipeline step created."""
    name = body["metadata"]["name"]
    try:
        existing = api.get(name)
        if existing is not None and existing["metadata"].get("deletionTimestamp"):
            log(f"pytorchjob {name} is being deleted; waiting before launching it again")
            _wait_gone(api, name, 600, poll_s)
            existing = None
        if existing is None:
            try:
                return api.create(body), "created"
            except ApiException as exc:
                if exc.status != 409:
                    raise
                existing = api.get(name)   # another attempt created it between our get and create
                if existing is None:
                    raise
        ours = body["metadata"]["annotations"].get(SPEC_HASH)
        theirs = (existing["metadata"].get("annotations") or {}).get(SPEC_HASH)
        state = job_state(existing)
        if state == "Failed":
            log(f"pytorchjob {name} from a previous attempt failed; deleting it and launching again "
                "(the stage resumes from its last checkpoint)")
            api.delete(name)
            _wait_gone(api, name, 600, poll_s)
            return api.create(body), "recreated"
        if ours != theirs:
            log(f"warning: pytorchjob {name} exists with spec hash {theirs} but this attempt renders {ours}; "
                f"the existing job wins (delete it to relaunch: kubectl -n {api.ns} delete pytorchjob {name})")
        return existing, ("already-succeeded" if state == "Succeeded" else "adopted")
    except ApiException as exc:
        raise _api_error(exc, f"creating pytorchjob {name}", api.ns) from None


class _LogFollower(threading.Thread):
    """Streams the master's trainer log to `log` once the pod has started; ends when the pod's log ends."""

    def __init__(self, api: JobAPI, name: str, log: Callable[[str], None], tail_lines: int | None):
        super().__init__(daemon=True, name=f"log-{name}")
        self.api, self.pod, self.log, self.tail = api, f"{name}-master-0", log, tail_lines
        self.started_streaming = threading.Event()

    def run(self) -> None:
        try:
            for line in self.api.follow_log(self.pod, self.tail):
                self.started_streaming.set()
                self.log(f"[master] {line}")
        except ApiException as exc:
            self.log(f"(master log not streamed: HTTP {exc.status} {exc.reason})")
        except Exception as exc:   # a broken stream must not break the launch; the status poll decides
            self.log(f"(master log stream ended: {type(exc).__name__}: {exc})")


def wait_for_job(api: JobAPI, name: str, timeout_s: float, poll_s: float, log: Callable[[str], None],
                 stream_logs: bool = True, tail_lines: int | None = None) -> dict:
    """Poll until Succeeded/Failed; stream the master log and print new Warning events meanwhile."""
    deadline = time.monotonic() + timeout_s
    last_state, seen_events, follower = None, set(), None
    while True:
        obj = api.get(name)
        if obj is None:
            raise LaunchError(f"pytorchjob {name} disappeared while waiting (deleted by someone?)")
        state = job_state(obj)
        try:
            pods = api.pods(name)
        except ApiException:
            pods = []
        if state != last_state:
            log(f"pytorchjob {name}: {state} ({_pod_summary(pods)})")
            last_state = state
        try:
            for ev in _job_events(api, name, pods):
                key = (ev.involved_object.name, ev.reason, ev.message)
                if key not in seen_events:
                    seen_events.add(key)
                    log(f"warning {ev.involved_object.name}: {ev.reason}: {(ev.message or '').strip()}")
        except ApiException:
            pass
        master = next((p for p in pods if p.metadata.name == f"{name}-master-0"), None)
        if (stream_logs and follower is None and master is not None
                and master.status.phase in ("Running", "Succeeded", "Failed")):
            follower = _LogFollower(api, name, log, tail_lines)
            follower.start()
        if state in ("Succeeded", "Failed"):
            if follower is not None:
                follower.join(timeout=30)
            return obj
        if time.monotonic() > deadline:
            raise PyTorchJobTimeout(
                f"pytorchjob {api.ns}/{name} not finished after {timeout_s:.0f}s (launcher.timeout_s); "
                f"state {state}, {_pod_summary(pods)}\n{failure_report(api, name, obj)}\n"
                f"  it keeps running until its activeDeadlineSeconds; stop it with: "
                f"kubectl -n {api.ns} delete pytorchjob {name}")
        time.sleep(poll_s)


def launch(stage: str, config_uri: str, run_cfg: RunConfig, run_id: str, api: k8s.ApiClient | None = None,
           *, extra_args: Sequence[str] | None = None, log: Callable[[str], None] = print,
           extra_env: Mapping[str, str] | None = None, init_model_uri: str | None = None) -> LaunchResult:
    """Run `stage` of pipeline run `run_id` as a PyTorchJob and wait for it (the KFP components' entry point).

    `api` is a kubernetes ApiClient (default: in-cluster config, else kubeconfig). `extra_args` go to
    the stage command (`r4b <stage> --config URI *extra_args`). Env named in FORWARDED_ENV is copied
    from this process unless `extra_env` is given. Raises PyTorchJobFailed, PyTorchJobTimeout or
    LaunchError (all R4BError) with the reason; returns a LaunchResult on success.
    """
    import os

    if extra_env is None:
        extra_env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    api = api or _api_client()
    run_cfg = chart_settings(run_cfg, api, log)
    job = build_pytorchjob(stage, config_uri, run_cfg, run_id, extra_env, extra_args, init_model_uri)
    body = manifest(job)
    L = run_cfg.launcher
    jobs = JobAPI(api, L.namespace)
    name, t0 = body["metadata"]["name"], time.monotonic()
    obj, action = get_or_create(jobs, body, log, L.poll_interval_s)
    log(f"pytorchjob {L.namespace}/{name}: {action} ({stage}, {getattr(run_cfg, stage).distributed.nnodes} "
        f"node(s), config {config_uri})")
    if action != "already-succeeded":
        try:
            obj = wait_for_job(jobs, name, L.timeout_s, L.poll_interval_s, log,
                               tail_lines=100 if action == "adopted" else None)
        except ApiException as exc:
            raise _api_error(exc, f"watching pytorchjob {name}", L.namespace) from None
    state = job_state(obj)
    conditions = (obj.get("status") or {}).get("conditions") or []
    if state == "Failed":
        report = failure_report(jobs, name, obj)
        if L.cleanup:
            jobs.delete(name)
        raise PyTorchJobFailed(f"pytorchjob {L.namespace}/{name} ({stage}) failed:\n{report}")
    if L.cleanup:
        jobs.delete(name)
        log(f"pytorchjob {name}: deleted (launcher.cleanup)")
    return LaunchResult(name=name, namespace=L.namespace, state=state, action=action,
                        seconds=round(time.monotonic() - t0, 3), conditions=conditions)


# ---------------------------------------------------------------------------------------------
# Command line: render (docs, dry runs) and fetch (the sidecar's init step)
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m r4b_core.launch.pytorchjob", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("render", help="print the PyTorchJob YAML of a stage")
    r.add_argument("--stage", required=True, choices=STAGES)
    r.add_argument("--config", required=True, help="run config YAML")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--config-uri", help="where pods read the config (default: <run>/config.yaml)")
    r.add_argument("--run-id", default="example-run")
    args = p.parse_args(argv)
    try:
        from r4b_core.config import load_config

        cfg = load_config(args.config, args.set)
        print(render(args.stage, args.config_uri or layout.config_uri(cfg), cfg, args.run_id), end="")
    except R4BError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
