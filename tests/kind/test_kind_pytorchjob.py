"""End to end on a real Kubernetes (kind): Training Operator + our chart + the tiny anneal as a
CPU PyTorchJob launched by r4b_core.launch.pytorchjob, then MLflow must hold the run.

    make test-kind                      # needs Docker, kind, kubectl (helm comes from `make helm`)

Opt-in (`-m kind`); collected everywhere and skipped with the reason when Docker, kind or kubectl
are missing. What it does:
1. create the kind cluster `$R4B_KIND_CLUSTER` (default r4b-kind), or reuse it if it exists;
2. install the Kubeflow Training Operator v1.9.4 (standalone overlay) and wait for it;
3. build `r4b-platform:kind` (docker/platform.Dockerfile) unless it exists, `kind load` it;
4. `helm install` charts/r4b with ci/kind-values.yaml (SeaweedFS + MLflow on SQLite), `helm test`;
5. on this machine, through port-forwards: `r4b prepare` and `r4b curate` write the run's config,
   data, base model and SFT set to the in-cluster object store;
6. `launch("anneal", ...)`: a 2-node CPU PyTorchJob (master + worker, gloo) must succeed; its
   manifest must be in S3 and MLflow must have a FINISHED anneal run with metrics;
7. uninstall, delete the namespace, and the cluster if this test created it (keep it with
   R4B_KIND_KEEP=1).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = os.environ.get("R4B_KIND_CLUSTER", "r4b-kind")
NAMESPACE = "r4b-kind"
IMAGE = "r4b-platform:kind"
OPERATOR = "github.com/kubeflow/trainer.git/manifests/overlays/standalone?ref=v1.9.4"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "r4b-kind", "AWS_SECRET_ACCESS_KEY": "r4b-kind-secret"}   # throwaway store

pytestmark = [pytest.mark.kind, pytest.mark.timeout(3600)]


def _missing() -> list[str]:
    missing = [f"{tool} not on PATH" for tool in ("docker", "kind", "kubectl") if not shutil.which(tool)]
    if shutil.which("docker"):
        proc = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
        if proc.returncode:
            missing.append("Docker daemon not reachable (" + (proc.stderr.strip().splitlines() or ["?"])[-1] + ")")
    return missing


def _helm() -> str | None:
    for cand in (os.environ.get("R4B_HELM"), str(REPO / ".tools/helm"), shutil.which("helm")):
        if cand and Path(cand).is_file():
            return cand
    return None


def sh(*cmd: str, env: dict | None = None, timeout: float = 900, check: bool = True, input: str | None = None):
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env=env, timeout=timeout, capture_output=True, text=True, input=input)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortForward:
    def __init__(self, kubeconfig: str, target: str, port: int):
        self.local = _free_port()
        self.proc = subprocess.Popen(["kubectl", "--kubeconfig", kubeconfig, "-n", NAMESPACE, "port-forward",
                                      target, f"{self.local}:{port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.local)) == 0:
                    break
            assert self.proc.poll() is None, f"port-forward {target} exited: {self.proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, f"port-forward {target} not ready"
            time.sleep(0.5)
        self.url = f"http://127.0.0.1:{self.local}"

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = _missing()
    if not _helm():
        missing.append("no helm (run `make helm` or put helm on PATH)")
    if missing:
        pytest.skip("kind tests need Docker, kind, kubectl and helm: " + "; ".join(missing))
    created = False
    if CLUSTER not in sh("kind", "get", "clusters").stdout.split():
        sh("kind", "create", "cluster", "--name", CLUSTER, "--wait", "180s", timeout=600)
        created = True
    kubeconfig = str(tmp_path_factory.mktemp("kind") / "kubeconfig")
    Path(kubeconfig).write_text(sh("kind", "get", "kubeconfig", "--name", CLUSTER).stdout)
    yield kubeconfig
    if created and not os.environ.get("R4B_KIND_KEEP"):
        sh("kind", "delete", "cluster", "--name", CLUSTER, check=False, timeout=300)


@pytest.fixture(scope="module")
def platform(cluster):
    kc = ["kubectl", "--kubeconfig", cluster]
    sh(*kc, "apply", "--server-side", "-k", OPERATOR, timeout=600)
    sh(*kc, "-n", "kubeflow", "wait", "deployment/training-operator", "--for=condition=Available",
       "--timeout=600s", timeout=660)
    if sh("docker", "image", "inspect", IMAGE, check=False).returncode:
        sh("docker", "build", "-f", "docker/platform.Dockerfile", "-t", IMAGE, str(REPO), timeout=3000)
    sh("kind", "load", "docker-image", IMAGE, "--name", CLUSTER, timeout=1200)

    sh(*kc, "create", "namespace", NAMESPACE, check=False)
    secret = sh(*kc, "-n", NAMESPACE, "create", "secret", "generic", "r4b-credentials", "--dry-run=client",
                "-o", "yaml", *[f"--from-literal={k}={v}" for k, v in S3_KEYS.items()]).stdout
    sh(*kc, "apply", "-f", "-", input=secret)
    helm = [_helm(), "--kubeconfig", cluster, "-n", NAMESPACE]
    sh(*helm, "upgrade", "--install", "r4b", str(REPO / "charts/r4b"), "-f",
       str(REPO / "charts/r4b/ci/kind-values.yaml"), "--wait", "--timeout", "15m", timeout=1000)
    proc = sh(*helm, "test", "r4b", "--logs", timeout=600)
    assert "mlflow API answers" in proc.stdout
    yield cluster
    sh(*helm, "uninstall", "r4b", "--wait", check=False, timeout=600)
    sh(*kc, "delete", "namespace", NAMESPACE, "--wait=true", check=False, timeout=600)


def test_tiny_anneal_runs_as_a_pytorchjob_and_reaches_mlflow(platform, tmp_path):
    from kubernetes.config import new_client_from_config
    from mlflow.tracking import MlflowClient

    from r4b_core import layout
    from r4b_core.config import load_config
    from r4b_core.launch.pytorchjob import launch
    from r4b_core.storage import Store

    kubeconfig = platform
    s3 = PortForward(kubeconfig, "svc/r4b-objectstore", 8333)
    mlflow = PortForward(kubeconfig, "svc/r4b-mlflow", 5000)
    try:
        name = f"kind-{uuid.uuid4().hex[:6]}"
        cfg_data = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
        cfg_data.update(name=name)
        # endpoints stay out of the config: here they come from the env (port-forwards), in the pods
        # from the chart's defaults ConfigMap (AWS_ENDPOINT_URL_S3, MLFLOW_TRACKING_URI)
        cfg_data["storage"] = {"root": "s3://r4b/runs"}
        cfg_data["tracking"] = {"uri": None, "experiment": "r4b-kind", "registered_model": "r4b-kind"}
        cfg_data["data"]["synthetic"].update(train_size=160, rl_size=16, eval_size=16)
        cfg_data["model"]["pretrain"] = {"steps": 2, "arithmetic_items": 16}
        cfg_data["curate"].update(annotator="base", num_samples=2, annotator_train_steps=10, max_new_tokens=16)
        cfg_data["anneal"].update(steps=6, checkpoint_every=3, log_every=1, compliance_samples=4,
                                  distributed={"nnodes": 2, "nproc_per_node": 1, "backend": "gloo"})
        cfg_data["launcher"] = {"kind": "pytorchjob", "namespace": NAMESPACE, "image": IMAGE, "memory": "3Gi",
                                "cpu": "500m", "shm_size": "256Mi", "secret_name": "r4b-credentials",
                                "defaults_configmap": "r4b-defaults", "poll_interval_s": 5, "timeout_s": 1800,
                                "cleanup": True}
        cfg_path = tmp_path / "kind.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg_data))
        env = {**os.environ, **S3_KEYS, "AWS_ENDPOINT_URL_S3": s3.url, "MLFLOW_TRACKING_URI": mlflow.url,
               "HF_HUB_OFFLINE": "1"}
        r4b = str(Path(sys.executable).with_name("r4b"))
        sh(r4b, "prepare", "--config", str(cfg_path), env=env, timeout=900)
        sh(r4b, "curate", "--config", str(cfg_path), env=env, timeout=1200)

        cfg = load_config(cfg_path)
        os.environ.update({**S3_KEYS, "AWS_ENDPOINT_URL_S3": s3.url})
        result = launch("anneal", layout.config_uri(cfg), cfg, run_id=f"kind-{uuid.uuid4()}",
                        api=new_client_from_config(config_file=kubeconfig))
        assert result.state == "Succeeded" and result.action == "created"

        manifest = Store(s3_endpoint_url=s3.url).read_manifest(layout.model_dir(cfg, "anneal"))
        assert manifest is not None, "the anneal job succeeded but wrote no manifest"

        client = MlflowClient(tracking_uri=mlflow.url)
        exp = client.get_experiment_by_name("r4b-kind")
        assert exp is not None, "MLflow has no r4b-kind experiment"
        runs = client.search_runs([exp.experiment_id], filter_string="tags.`r4b.stage` = 'anneal'")
        assert runs, "MLflow has no anneal run"
        assert runs[0].info.status == "FINISHED" and runs[0].data.metrics, runs[0].info
        print(f"anneal PyTorchJob {result.name}: {result.seconds:.0f} s; MLflow run {runs[0].info.run_id} "
              f"metrics {sorted(runs[0].data.metrics)[:8]}")
    finally:
        s3.close()
        mlflow.close()
