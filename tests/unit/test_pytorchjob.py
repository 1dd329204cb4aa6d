"""The PyTorchJob launcher (r4b_core/launch/pytorchjob.py), offline.

Rendering: the job validates against the Training Operator v1.9.4 CRD schema (vendored in tests/data,
made strict so a field the API server would silently prune is an error) plus the operator webhook's
rules; every pod template validates with kubernetes-validate (strict) for Kubernetes 1.29 and 1.37.

Launching: the real kubernetes client (ApiClient, CustomObjectsApi, CoreV1Api, its REST layer and
model deserialization) talks HTTP to `FakeCluster` (tests/fake_kube.py), an in-memory API server on 127.0.0.1 that keeps
pytorchjobs, pods, pod logs (followed, chunked) and events, answers 404/409/403 like the real one,
and plays the operator: each GET of a job advances it one step along a scripted life
(Created -> Running -> Succeeded, or Failed with an OOM-killed master, or stuck Pending).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fake_kube import FakeCluster
from hypothesis import given, settings
from hypothesis import strategies as st

from r4b_core.config import DEFAULT_CREDENTIALS_SECRET, DEFAULT_PLATFORM_IMAGE, ConfigError, RunConfig
from r4b_core.launch import pytorchjob as pj
from r4b_core.rollout.vllm_server import WORKER_EXTENSION

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "tests/data/crds/kubeflow.org_pytorchjobs.v1.9.4.yaml"
RUN_ID = "3f2b9c1e-7d4a-4e8b-9a51-2c6f0e8d1b77"
CONFIG_URI = "s3://r4b-test/runs/t/config.yaml"


def make_cfg(**launcher) -> RunConfig:
    data = {
        "name": "t",
        "storage": {"root": "s3://r4b-test/runs", "s3_endpoint_url": "http://r4b-objectstore.r4b:8333"},
        "tracking": {"uri": "http://r4b-mlflow.r4b:5000"},
        "bpo": {"engine": "vllm", "distributed": {"nnodes": 2, "nproc_per_node": 2}},
        "anneal": {"distributed": {"nnodes": 1, "nproc_per_node": 1}},
        "vllm": {"python": "python3"},
        "launcher": {"kind": "pytorchjob", "namespace": "r4b", "poll_interval_s": 0.01, "timeout_s": 20,
                     **launcher},
    }
    return RunConfig.model_validate(data)


def gpu_cfg(**launcher) -> RunConfig:
    cfg = make_cfg(gpus_per_node=2, sidecar_gpus=1, node_selector={"nvidia.com/gpu.product": "H100"},
                   tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                   **launcher)
    return cfg


# ---------------------------------------------------------------------------------------------
# Schema validation helpers
# ---------------------------------------------------------------------------------------------
def _strict(schema):
    """The API server prunes fields a structural schema does not declare, silently; make them errors."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_strict(v) if k != "properties" else {n: _strict(s) for n, s in v.items()})
           for k, v in schema.items()}
    if (out.get("type") == "object" and "properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validator():
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def webhook_errors(job: dict) -> list[str]:
    """The Training Operator v1.9 admission webhook's rules (pkg/webhooks/pytorch), restated."""
    errs = []
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", job["metadata"]["name"]) or len(job["metadata"]["name"]) > 63:
        errs.append("metadata.name is not DNS-1035")
    for rtype, spec in job["spec"]["pytorchReplicaSpecs"].items():
        if rtype not in ("Master", "Worker"):
            errs.append(f"replica type {rtype}")
        names = [c["name"] for c in spec["template"]["spec"]["containers"]]
        if "pytorch" not in names:
            errs.append(f"{rtype}: no container named pytorch")
        if any(not c.get("image") for c in spec["template"]["spec"]["containers"]):
            errs.append(f"{rtype}: container without image")
        if rtype == "Master" and spec.get("replicas") != 1:
            errs.append("Master replicas must be 1")
        if rtype == "Worker" and spec.get("replicas", 1) < 1:
            errs.append("Worker replicas must be >= 1")
    return errs


def as_pod(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **template["metadata"]},
            "spec": template["spec"]}


def all_env(container: dict) -> dict:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------
def test_job_name_is_deterministic_and_dns1035():
    a = pj.job_name(RUN_ID, "bpo")
    assert a == pj.job_name(RUN_ID, "bpo")
    assert a != pj.job_name(RUN_ID, "anneal")
    assert a != pj.job_name(RUN_ID.replace("3", "4"), "bpo")
    assert a.startswith("r4b-bpo-") and len(a) <= pj.MAX_NAME
    # the operator names pods/services <job>-worker-<i>: they must stay valid DNS-1035 labels
    assert len(f"{a}-worker-999") <= 63


def test_bpo_and_its_grpo_control_get_separate_jobs():
    bpo_cfg, grpo_cfg = make_cfg(), make_cfg()
    grpo_cfg.bpo.algorithm = "grpo"
    args = ["--set", "bpo.algorithm=grpo"]
    bpo = pj.manifest(pj.build_pytorchjob("bpo", CONFIG_URI, bpo_cfg, RUN_ID))
    grpo = pj.manifest(pj.build_pytorchjob("bpo", CONFIG_URI, grpo_cfg, RUN_ID, extra_args=args))
    assert bpo["metadata"]["name"].startswith("r4b-bpo-") and grpo["metadata"]["name"].startswith("r4b-grpo-")
    cmd = grpo["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[-5:] == ["bpo", "--config", CONFIG_URI, "--set", "bpo.algorithm=grpo"]
    assert pj.job_name(RUN_ID, "bpo", ["--set", "x=1"]) != pj.job_name(RUN_ID, "bpo")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=200), st.sampled_from(pj.STAGES))
def test_job_name_valid_for_any_run_id(run_id, stage):
    name = pj.job_name(run_id, stage)
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    assert len(name) <= pj.MAX_NAME
    label = pj._label_value(run_id)
    assert len(label) <= 63 and (label == "" or re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?", label))


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stage,cfg_fn", [("bpo", gpu_cfg), ("bpo", make_cfg), ("anneal", make_cfg),
                                          ("anneal", gpu_cfg)])
def test_rendered_job_validates_against_crd_webhook_and_pod_schemas(stage, cfg_fn, crd_validator):
    job = pj.manifest(pj.build_pytorchjob(stage, CONFIG_URI, cfg_fn(), RUN_ID))
    errors = sorted(crd_validator.iter_errors(job), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
    assert webhook_errors(job) == []
    n = 0
    for spec in job["spec"]["pytorchReplicaSpecs"].values():
        for version in ("1.29", "1.37"):
            kubernetes_validate.validate(as_pod(spec["template"]), version, strict=True)
            n += 1
    assert n == 2 * len(job["spec"]["pytorchReplicaSpecs"])


def test_crd_validation_is_live(crd_validator):
    """The validator rejects what the API server would: a wrong type and a field it would prune."""
    job = pj.manifest(pj.build_pytorchjob("bpo", CONFIG_URI, gpu_cfg(), RUN_ID))
    bad_type = json.loads(json.dumps(job))
    bad_type["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = "one"
    assert any("replicas" in list(e.path) for e in crd_validator.iter_errors(bad_type))
    pruned = json.loads(json.dumps(job))
    pruned["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["initContainers"][1]["restartPolicyy"] = "Always"
    assert list(crd_validator.iter_errors(pruned))
    no_pytorch = json.loads(json.dumps(job))
    no_pytorch["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    assert "Master: no container named pytorch" in webhook_errors(no_pytorch)


def test_bpo_pods_carry_the_vllm_native_sidecar():
    cfg = gpu_cfg()
    job = pj.manifest(pj.build_pytorchjob("bpo", CONFIG_URI, cfg, RUN_ID))
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1   # nnodes 2
    assert job["spec"]["nprocPerNode"] == "2"
    for rtype in ("Master", "Worker"):
        pod = specs[rtype]["template"]["spec"]
        fetch, vllm = pod["initContainers"]                 # order matters: weights before the server
        (trainer,) = pod["containers"]
        assert fetch["name"] == pj.FETCH and "restartPolicy" not in fetch
        assert fetch["command"][3:] == ["serve", "--config", CONFIG_URI, "--model", "s3://r4b-test/runs/t/anneal/model",
                                        "--fetch-only", "--out", pj.SIDECAR_MODEL_DIR]
        assert vllm["restartPolicy"] == "Always"          # native sidecar: the job ends with the trainer
        cmd = vllm["command"]
        assert cmd[:3] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
        assert cmd[cmd.index("--model") + 1] == pj.SIDECAR_MODEL_DIR
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1"     # dev-mode routes stay inside the pod
        assert cmd[cmd.index("--worker-extension-cls") + 1] == "r4b_vllm_worker.R4BWorkerExtension"
        assert cmd[cmd.index("--chat-template") + 1] == pj.SIDECAR_CHAT_TEMPLATE
        assert cmd[cmd.index("--dtype") + 1] == cfg.model.dtype
        # what the BPO client relies on, same as the local sidecar: logprobs under the sampling distribution
        assert cmd[cmd.index("--logprobs-mode") + 1] == "processed_logprobs"
        assert all_env(vllm)["PYTHONPATH"] == pj.VLLM_ASSETS_DIR
        assert "ports" not in vllm                              # nothing to put behind a Service
        assert all_env(vllm)["VLLM_SERVER_DEV_MODE"] == "1"
        assert "VLLM_SERVER_DEV_MODE" not in all_env(trainer)
        for probe in ("startupProbe", "readinessProbe"):
            code = vllm[probe]["exec"]["command"][-1]
            assert "http://127.0.0.1:8100/health" in code
        assert vllm["startupProbe"]["failureThreshold"] * vllm["startupProbe"]["periodSeconds"] >= cfg.vllm.startup_timeout_s
        assert "livenessProbe" not in vllm
        assert vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "2"
        # /dev/shm is one memory-backed emptyDir mounted by all three containers
        (shm,) = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
        for c in (fetch, vllm, trainer):
            assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        env = all_env(trainer)
        assert env["R4B_VLLM_URL"] == "http://127.0.0.1:8100" and env["R4B_SHM_DIR"] == pj.SHM_DIR


def test_cpu_sidecar_gets_the_local_sidecars_thread_settings():
    """A CPU sidecar runs vllm.cpu_threads unpinned OpenMP threads, as the local one does (pinned
    threads on a shared core starve); null leaves vLLM to bind one thread per granted core."""
    def sidecar_env(cfg):
        pod = pj.manifest(pj.build_pytorchjob("bpo", CONFIG_URI, cfg, RUN_ID))["spec"]["pytorchReplicaSpecs"]
        return all_env(pod["Master"]["template"]["spec"]["initContainers"][1])

    cfg = make_cfg()
    env = sidecar_env(cfg)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind" and env["OMP_NUM_THREADS"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == str(cfg.vllm.kv_cache_gib)
    cfg.vllm.cpu_threads = 3
    assert sidecar_env(cfg)["OMP_NUM_THREADS"] == "3"
    cfg.vllm.cpu_threads = None
    assert not {"VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS"} & set(sidecar_env(cfg))
    # a GPU sidecar gets none of the CPU settings
    assert not {"VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE"} & set(sidecar_env(gpu_cfg()))


def test_trainer_pod_spec():
    job = pj.manifest(pj.build_pytorchjob("bpo", CONFIG_URI, gpu_cfg(cpu="4", service_account="r4b-train"), RUN_ID))
    tmpl = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    pod = tmpl["spec"]
    (trainer,) = pod["containers"]
    assert trainer["name"] == "pytorch"
    assert trainer["command"] == ["torchrun", "--nproc-per-node=2", "-m", "r4b_core.cli", "bpo", "--config", CONFIG_URI]
    assert trainer["ports"] == [{"containerPort": 23456, "name": "pytorchjob-port", "protocol": "TCP"}]
    assert trainer["resources"]["requests"] == {"memory": "8Gi", "cpu": "4"}
    assert tmpl["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert tmpl["metadata"]["labels"]["app.kubernetes.io/component"] == "trainer"   # the chart's NetworkPolicy
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["serviceAccountName"] == "r4b-train" and pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
        assert sc["readOnlyRootFilesystem"] is True
        # credentials only by Secret reference, never as literal env values; the sidecar gets none
        if c["name"] == pj.SIDECAR:
            assert "envFrom" not in c
        else:
            assert {"secretRef": {"name": "r4b-credentials"}} in c["envFrom"]
        for e in c.get("env", []):
            assert not re.search(r"SECRET|PASSWORD|(^|_)TOKEN($|_)|ACCESS_KEY", e["name"]), e
    env = all_env(trainer)
    assert env["AWS_ENDPOINT_URL_S3"] == "http://r4b-objectstore.r4b:8333"
    assert env["MLFLOW_TRACKING_URI"] == "http://r4b-mlflow.r4b:5000"
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 20
    assert job["metadata"]["annotations"][pj.SPEC_HASH]


def test_single_node_anneal_has_no_workers_and_no_sidecar():
    job = pj.manifest(pj.build_pytorchjob("anneal", CONFIG_URI, make_cfg(), RUN_ID))
    assert set(job["spec"]["pytorchReplicaSpecs"]) == {"Master"}
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert "initContainers" not in pod
    assert "R4B_VLLM_URL" not in all_env(pod["containers"][0])
    # BPO with the in-process engine has no sidecar either
    cfg = make_cfg()
    cfg.bpo.engine = "hf"
    pod = pj.manifest(pj.build_pytorchjob("bpo", CONFIG_URI, cfg, RUN_ID))["spec"]["pytorchReplicaSpecs"]["Master"]
    assert "initContainers" not in pod["template"]["spec"]


@pytest.mark.parametrize("change,expected", [
    (lambda c: setattr(c.launcher, "gpus_per_node", 1), r"bpo.distributed.nproc_per_node: 2 processes but launcher.gpus_per_node is 1"),
    (lambda c: setattr(c.storage, "root", "./runs"), r"storage.root: './runs' is a local path"),
    (lambda c: setattr(c.vllm, "python", ".venv-vllm/bin/python"), r"vllm.python: '.venv-vllm/bin/python' is a path"),
    (lambda c: setattr(c.bpo.distributed, "backend", "nccl"), r"backend: 'nccl' needs GPUs"),
    (lambda c: setattr(c.launcher, "shm_size", "2 gigs"), r"launcher.shm_size: '2 gigs' is not a Kubernetes quantity"),
    (lambda c: (setattr(c.launcher, "gpus_per_node", 2), setattr(c.launcher, "sidecar_gpus", 0)),
     r"launcher.sidecar_gpus: 0 while trainer pods have GPUs"),
    (lambda c: setattr(c.launcher, "tolerations", [{"key": "a", "efect": "NoSchedule"}]),
     r"launcher.tolerations\[0\].efect: unknown key"),
])
def test_render_rejects_what_cannot_work_in_a_pod(change, expected):
    cfg = make_cfg()
    change(cfg)
    with pytest.raises(ConfigError, match=expected):
        pj.build_pytorchjob("bpo", CONFIG_URI, cfg, RUN_ID)


def test_render_rejects_local_config_uri_and_unknown_stage():
    with pytest.raises(ConfigError, match="not readable from a pod"):
        pj.build_pytorchjob("anneal", "configs/tiny.yaml", make_cfg(), RUN_ID)
    with pytest.raises(pj.LaunchError, match="choose one of anneal, bpo"):
        pj.build_pytorchjob("eval", CONFIG_URI, make_cfg(), RUN_ID)


def test_docs_show_the_current_rendering():
    """docs/kubernetes.md pastes the 2-node BPO job; it must be what the launcher renders today."""
    from r4b_core.config import load_config

    doc = (REPO / "docs/kubernetes.md").read_text()
    m = re.search(r"<!-- rendered: (.*?) -->\n```yaml\n(.*?)```", doc, re.S)
    assert m, "docs/kubernetes.md lost its rendered PyTorchJob block"
    args = m.group(1).split()
    opts = dict(zip(args[::2], args[1::2]))
    cfg = load_config(REPO / opts["--config"], [s for k, s in zip(args[::2], args[1::2]) if k == "--set"])
    assert cfg.bpo.distributed.nnodes == 2 and cfg.bpo.engine == "vllm"
    rendered = pj.render("bpo", opts["--config-uri"], cfg, opts["--run-id"])
    assert m.group(2) == rendered, ("docs/kubernetes.md is stale; regenerate with: python -m "
                                    f"r4b_core.launch.pytorchjob render --stage bpo {m.group(1)}")


# What the chart's defaults ConfigMap publishes (charts/r4b/templates/configmap.yaml) in namespace r4b.
CHART = {"R4B_PLATFORM_IMAGE": "registry.example/r4b-platform:1.2",
         "R4B_VLLM_IMAGE": "registry.example/r4b-vllm:1.2", "R4B_CREDENTIALS_SECRET": "team-s3"}


@pytest.fixture
def cluster(request):
    c = FakeCluster(getattr(request, "param", "succeed"), config_uri=CONFIG_URI,
                    configmaps={("r4b", "r4b-defaults"): CHART})
    yield c
    c.close()


class Log(list):
    def __call__(self, line: str):
        self.append(line)

    def text(self) -> str:
        return "\n".join(self)


def _posts(cluster: FakeCluster) -> int:
    return sum(1 for m, p in cluster.requests if m == "POST")


# ---------------------------------------------------------------------------------------------
# Launching
# ---------------------------------------------------------------------------------------------
def test_launch_creates_waits_and_streams_the_master_log(cluster):
    log = Log()
    res = pj.launch("bpo", CONFIG_URI, make_cfg(), RUN_ID, api=cluster.api(), log=log, extra_env={})
    assert res.state == "Succeeded" and res.action == "created"
    assert res.name == pj.job_name(RUN_ID, "bpo") and res.namespace == "r4b"
    assert _posts(cluster) == 1
    stored = cluster.jobs[res.name]
    assert stored["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    text = log.text()
    for line in ("[master] rank 0: loading config", "[master] step 2 loss 1.97", "[master] anneal done: model saved"):
        assert line in text
    assert f"pytorchjob {res.name}: Running" in text and "Succeeded" in text
    assert [c["type"] for c in res.conditions][-1] == "Succeeded"
    assert res.name in cluster.jobs            # cleanup is off by default


def test_launch_is_idempotent_after_success(cluster):
    cfg = make_cfg()
    pj.launch("anneal", CONFIG_URI, cfg, RUN_ID, api=cluster.api(), log=Log(), extra_env={})
    log = Log()
    res = pj.launch("anneal", CONFIG_URI, cfg, RUN_ID, api=cluster.api(), log=log, extra_env={})
    assert res.action == "already-succeeded" and res.state == "Succeeded"
    assert _posts(cluster) == 1


def test_retry_adopts_the_running_job(cluster):
    cfg = make_cfg()
    body = pj.manifest(pj.build_pytorchjob("anneal", CONFIG_URI, pj.fill_launcher(cfg, CHART), RUN_ID, {}))
    cluster.jobs[body["metadata"]["name"]] = body
    cluster.advance(body["metadata"]["name"])   # Created
    log = Log()
    res = pj.launch("anneal", CONFIG_URI, cfg, RUN_ID, api=cluster.api(), log=log, extra_env={})
    assert res.action == "adopted" and res.state == "Succeeded"
    assert _posts(cluster) == 0
    assert "spec hash" not in log.text()        # same spec: adopted silently
    assert "[master] step 2 loss 1.97" in log.text()


def test_adopting_a_job_with_another_spec_says_which_wins(cluster):
    body = pj.manifest(pj.build_pytorchjob("anneal", CONFIG_URI, make_cfg(), RUN_ID, {}))
    body["metadata"]["annotations"][pj.SPEC_HASH] = "0000000000000000"
    cluster.jobs[body["metadata"]["name"]] = body
    log = Log()
    res = pj.launch("anneal", CONFIG_URI, make_cfg(), RUN_ID, api=cluster.api(), log=log, extra_env={})
    assert res.action == "adopted"
    assert "exists with spec hash 0000000000000000" in log.text() and "the existing job wins" in log.text()


def test_create_conflict_adopts_instead_of_failing(cluster):
    cluster.race = True
    res = pj.launch("anneal", CONFIG_URI, make_cfg(), RUN_ID, api=cluster.api(), log=Log(), extra_env={})
    assert res.action == "adopted" and res.state == "Succeeded"
    assert len(cluster.jobs) == 1


@pytest.mark.parametrize("cluster", ["oom"], indirect=True)
def test_failed_previous_attempt_is_deleted_and_relaunched(cluster):
    cfg = make_cfg()
    with pytest.raises(pj.PyTorchJobFailed):
        pj.launch("anneal", CONFIG_URI, cfg, RUN_ID, api=cluster.api(), log=Log(), extra_env={})
    cluster.life = "succeed"
    log = Log()
    res = pj.launch("anneal", CONFIG_URI, cfg, RUN_ID, api=cluster.api(), log=log, extra_env={})
    assert res.action == "recreated" and res.state == "Succeeded"
    assert ("DELETE", f"/apis/kubeflow.org/v1/namespaces/r4b/pytorchjobs/{res.name}") in cluster.requests
    assert "previous attempt failed; deleting it" in log.text()
    assert _posts(cluster) == 2


@pytest.mark.parametrize("cluster", ["oom"], indirect=True)
def test_failure_reason_names_condition_container_event_and_log(cluster):
    with pytest.raises(pj.PyTorchJobFailed) as err:
        pj.launch("bpo", CONFIG_URI, make_cfg(cleanup=True), RUN_ID, api=cluster.api(), log=Log(), extra_env={})
    msg = str(err.value)
    name = pj.job_name(RUN_ID, "bpo")
    assert f"pytorchjob r4b/{name} (bpo) failed" in msg
    assert "1 Master replica(s) failed" in msg
    assert f"{name}-master-0/pytorch: terminated OOMKilled exit code 137" in msg
    assert "Evicted: The node was low on resource: memory." in msg
    assert "Killed" in msg.split("log lines of")[1]
    assert ("DELETE", f"/apis/kubeflow.org/v1/namespaces/r4b/pytorchjobs/{name}") in cluster.requests   # cleanup


@pytest.mark.parametrize("cluster", ["pending"], indirect=True)
def test_timeout_reports_why_pods_are_pending(cluster):
    log = Log()
    with pytest.raises(pj.PyTorchJobTimeout) as err:
        pj.launch("anneal", CONFIG_URI, make_cfg(timeout_s=0.3), RUN_ID, api=cluster.api(), log=log, extra_env={})
    msg = str(err.value)
    assert "not finished after 0s" in msg or "not finished after 1s" in msg
    assert "FailedScheduling: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu." in msg
    assert "kubectl -n r4b delete pytorchjob" in msg
    # the warning was also printed live, once
    assert log.text().count("Insufficient nvidia.com/gpu") == 1


def test_forbidden_create_explains_the_rbac_fix(cluster):
    cluster.forbid_create = True
    with pytest.raises(pj.LaunchError, match=r"forbidden in namespace 'r4b'.*rbac.runnerServiceAccounts"):
        pj.launch("anneal", CONFIG_URI, make_cfg(), RUN_ID, api=cluster.api(), log=Log(), extra_env={})


def test_missing_crd_explains_the_operator_install(cluster):
    cluster.crd_installed = False
    with pytest.raises(pj.LaunchError, match=r"no pytorchjobs.kubeflow.org/v1.*Training Operator v1.9"):
        pj.launch("anneal", CONFIG_URI, make_cfg(), RUN_ID, api=cluster.api(), log=Log(),
                  extra_env={})


def test_kfp_mlflow_env_is_forwarded(monkeypatch, cluster):
    monkeypatch.setenv("MLFLOW_RUN_ID", "abc123")
    res = pj.launch("anneal", CONFIG_URI, make_cfg(), RUN_ID, api=cluster.api(), log=Log())
    (trainer,) = cluster.jobs[res.name]["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    assert all_env(trainer)["MLFLOW_RUN_ID"] == "abc123"


def _images_and_secret(job: dict) -> tuple[set, set]:
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    containers = pod["containers"] + pod.get("initContainers", [])
    secrets = {e["secretRef"]["name"] for c in containers for e in c.get("envFrom", []) if "secretRef" in e}
    return {c["image"] for c in containers}, secrets


def test_jobs_land_in_the_charts_namespace_with_its_images_and_secret(cluster, tmp_path, monkeypatch):
    """Before: launcher.namespace defaulted to `kubeflow` and nothing read the chart's ConfigMap, so
    jobs ran where the chart's training NetworkPolicy does not apply."""
    own = tmp_path / "namespace"
    own.write_text("r4b\n")                         # the pipeline task's pod runs in r4b
    monkeypatch.setattr(pj, "SA_NAMESPACE_FILE", str(own))
    log = Log()
    res = pj.launch("bpo", CONFIG_URI, make_cfg(namespace=None), RUN_ID, api=cluster.api(), log=log, extra_env={})
    assert res.namespace == "r4b" and ("POST", "/apis/kubeflow.org/v1/namespaces/r4b/pytorchjobs") in cluster.requests
    images, secrets = _images_and_secret(cluster.jobs[res.name])
    assert images == {CHART["R4B_PLATFORM_IMAGE"], CHART["R4B_VLLM_IMAGE"]} and secrets == {"team-s3"}
    assert "wins over" not in log.text()
    # a config that names its own image wins, and says so
    log = Log()
    cfg = make_cfg(namespace=None, image="mine/platform:9")
    pj.launch("anneal", CONFIG_URI, cfg, "run-2", api=cluster.api(), log=log, extra_env={})
    assert (f"launcher.image: 'mine/platform:9' (config) wins over the chart's "
            f"R4B_PLATFORM_IMAGE={CHART['R4B_PLATFORM_IMAGE']!r}") in log.text()


def test_a_namespace_without_the_chart_is_refused_before_anything_is_created(cluster, tmp_path, monkeypatch):
    own = tmp_path / "namespace"
    own.write_text("kubeflow")                       # single-user KFP: tasks run in kubeflow, the chart in r4b
    monkeypatch.setattr(pj, "SA_NAMESPACE_FILE", str(own))
    with pytest.raises(pj.LaunchError) as err:
        pj.launch("anneal", CONFIG_URI, make_cfg(namespace=None), RUN_ID, api=cluster.api(), log=Log(), extra_env={})
    assert str(err.value).startswith("namespace 'kubeflow' has no readable ConfigMap r4b-defaults (HTTP 404")
    assert "its training NetworkPolicy would not cover the jobs; set launcher.namespace" in str(err.value)
    assert _posts(cluster) == 0
    # not in a pod and no launcher.namespace: one line with the fix
    monkeypatch.setattr(pj, "SA_NAMESPACE_FILE", str(tmp_path / "absent"))
    with pytest.raises(pj.LaunchError, match=r"launcher.namespace is not set and this process is not in a pod"):
        pj.launch("anneal", CONFIG_URI, make_cfg(namespace=None), RUN_ID, api=cluster.api(), log=Log(), extra_env={})
    # without the chart on purpose (defaults_configmap: null): nothing checked, built-in images and Secret
    res = pj.launch("anneal", CONFIG_URI, make_cfg(namespace="elsewhere", defaults_configmap=None), RUN_ID,
                    api=cluster.api(), log=Log(), extra_env={})
    assert res.namespace == "elsewhere"
    images, secrets = _images_and_secret(cluster.jobs[res.name])
    assert images == {DEFAULT_PLATFORM_IMAGE} and secrets == {DEFAULT_CREDENTIALS_SECRET}


# ---------------------------------------------------------------------------------------------
# The sidecar's init step, as the pod runs it
# ---------------------------------------------------------------------------------------------
def test_fetch_step_copies_weights_and_writes_the_chat_template(tmp_path):
    """The sidecar's init step is the serving pod's (`r4b serve --fetch-only`): run the command the
    job carries, on a local config, folder and target."""
    import subprocess
    import sys

    import numpy as np
    from safetensors.numpy import save_file

    from r4b_core.models.tokenizer import chat_template

    cfg = gpu_cfg()
    job = pj.manifest(pj.build_pytorchjob("bpo", CONFIG_URI, cfg, RUN_ID, init_model_uri="s3://r4b-test/x/model"))
    fetch = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["initContainers"][0]
    assert fetch["command"][fetch["command"].index("--model") + 1] == "s3://r4b-test/x/model"   # the stage's input
    local_cfg = tmp_path / "cfg.yaml"
    local_cfg.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "runs")}}))
    src = tmp_path / "anneal" / "model"
    src.mkdir(parents=True)
    save_file({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(src / "model.safetensors"))
    (src / "config.json").write_text("{}")

    def run(model: Path, out: Path):
        cmd = list(fetch["command"])
        for flag, value in (("--config", local_cfg), ("--model", model), ("--out", out)):
            cmd[cmd.index(flag) + 1] = str(value)
        return subprocess.run([sys.executable, *cmd[1:]], capture_output=True, text=True, timeout=120)

    out = tmp_path / "shm" / "model"
    proc = run(src, out)
    assert proc.returncode == 0, proc.stderr
    assert "fetched" in proc.stdout
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert (out / Path(pj.SIDECAR_CHAT_TEMPLATE).name).read_text() == chat_template()
    assert [p.name for p in out.parent.iterdir()] == ["model"]      # no staging folder left
    # a folder without weights is refused with the fix, and nothing half-written is left as the model
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    proc = run(empty, tmp_path / "shm2" / "model")
    assert proc.returncode == 2
    assert "no *.safetensors weights" in proc.stderr
    assert not (tmp_path / "shm2" / "model").exists()


def test_images_match_what_the_pods_expect():
    """docker/ cannot be built here; check its contract with the launcher and chart instead."""
    platform = (REPO / "docker/platform.Dockerfile").read_text()
    vllm = (REPO / "docker/vllm.Dockerfile").read_text()
    # both run as the uid the pod security contexts demand
    assert f"ARG UID={pj.RUN_AS}" in platform and f"ARG UID={pj.RUN_AS}" in vllm
    assert "USER ${UID}" in platform and "USER ${UID}" in vllm
    # the sidecar's PYTHONPATH holds the assets, which include the worker extension it names
    assert f"COPY r4b_core/assets/ {pj.VLLM_ASSETS_DIR}/" in vllm and f"PYTHONPATH={pj.VLLM_ASSETS_DIR}" in vllm
    module = WORKER_EXTENSION.split(".")[0]
    assert (REPO / "r4b_core/assets" / f"{module}.py").is_file()
    # every path the platform image copies exists, and its pins come from constraints.txt
    for src in re.findall(r"^COPY (\S+) ", platform, re.M):
        if not src.startswith("--"):
            assert (REPO / src).exists(), src
    assert "-c /tmp/constraints.txt" in platform
    pinned = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().split() if "==" in line)
    assert re.search(r"ARG TORCH_VERSION=(\S+)", platform).group(1) == pinned["torch"].split("+")[0]
    assert re.search(r"ARG PYTHON_VERSION=3\.11", platform)


def test_prepare_refuses_what_cannot_run_in_a_pod_before_anything_is_made(tmp_path):
    """Bad launcher settings fail in the pipeline's first task, all at once, not when the anneal job
    is built after data, base model and curation."""
    from r4b_core.prepare import run_prepare

    cfg = RunConfig.model_validate({"storage": {"root": str(tmp_path / "runs")}, "bpo": {"engine": "vllm"},
                                    "vllm": {"python": ".venv-vllm/bin/python"},
                                    "launcher": {"kind": "pytorchjob", "memory": "lots"}})
    with pytest.raises(ConfigError) as err:
        run_prepare(cfg)
    lines = str(err.value).splitlines()
    assert any(x.startswith("storage.root:") for x in lines)
    assert any(x.startswith("launcher.memory: 'lots'") for x in lines)
    assert any(x.startswith("vllm.python:") for x in lines)
    assert len(lines) == len(set(lines))                    # a problem of both stages is said once
    assert not (tmp_path / "runs").exists()
