"""An in-memory Kubernetes API server for tests (no kube-apiserver runs here; tests/kind covers a
real cluster). The real `kubernetes` client talks HTTP to it on 127.0.0.1.

It keeps what r4b touches on a cluster:

- pytorchjobs (kubeflow.org/v1) with pods, pod logs (followed, chunked) and events, answering
  404/409/403 like the real server, and playing the Training Operator: each GET of a job advances
  it one step along a scripted `life` (Created -> Running -> Succeeded, or Failed with an
  OOM-killed master, or stuck Pending) -- tests/unit/test_pytorchjob.py;
- configmaps and deployments (GET, strategic-merge PATCH of annotations, recorded in `patches`)
  for the deploy step that restarts the chart's serving Deployment -- tests/integration/test_serving.py.

    cluster = FakeCluster("succeed", configmaps={("ml", "r4b-defaults"): {"KEY": "value"}},
                          deployments={("ml", "r4b-serving"): deployment_dict})
    api = cluster.api()              # kubernetes.client.ApiClient pointed at it
    ...
    cluster.close()
"""

from __future__ import annotations

import copy
import json
import re
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from kubernetes import client as k8s

from r4b_core.launch import pytorchjob as pj

CONFIG_URI = "s3://r4b-test/runs/t/config.yaml"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def status(code: int, reason: str, message: str) -> dict:
    """A Kubernetes `Status` failure body."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeCluster:
    """pytorchjobs + pods + logs + events, configmaps + deployments over HTTP; `life` scripts what
    the operator does per GET of a job."""

    def __init__(self, life: str = "succeed", *, configmaps: dict | None = None, deployments: dict | None = None,
                 config_uri: str = CONFIG_URI):
        self.life = life
        self.config_uri = config_uri
        self.configmaps: dict[tuple[str, str], dict] = dict(configmaps or {})  # (ns, name) -> data
        self.deployments: dict[tuple[str, str], dict] = {k: copy.deepcopy(v) for k, v in (deployments or {}).items()}
        self.patches: list[tuple[str, str, dict]] = []  # (path, content type, body) of every PATCH
        self.jobs: dict[str, dict] = {}
        self.pods: dict[str, dict] = {}
        self.logs: dict[str, list[str]] = {}
        self.events: list[dict] = []
        self.steps: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.forbid_create = False
        self.crd_installed = True
        self.race = False           # another attempt creates the job between our GET and POST
        self.cond = threading.Condition()
        cluster = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, code: int, obj: dict):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def do_GET(self):
                cluster.route(self, "GET")

            def do_POST(self):
                cluster.route(self, "POST")

            def do_DELETE(self):
                cluster.route(self, "DELETE")

            def do_PATCH(self):
                cluster.route(self, "PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def api(self) -> k8s.ApiClient:
        conf = k8s.Configuration()
        conf.host = self.url
        return k8s.ApiClient(conf)

    def close(self):
        with self.cond:
            for pod in self.pods.values():
                pod["status"]["phase"] = "Succeeded"
            self.cond.notify_all()
        self.server.shutdown()

    # -- the operator's script -------------------------------------------------------------
    def _pod(self, job: dict, rtype: str, i: int, phase: str) -> dict:
        name = f"{job['metadata']['name']}-{rtype}-{i}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": job["metadata"]["namespace"],
                            "labels": {pj.JOB_LABEL: job["metadata"]["name"],
                                       "training.kubeflow.org/replica-type": rtype}},
               "spec": {"containers": [{"name": "pytorch", "image": "x"}]},
               "status": {"phase": phase}}
        self.pods[name] = pod
        return pod

    def _condition(self, job: dict, ctype: str, reason: str, message: str):
        conds = job.setdefault("status", {}).setdefault("conditions", [])
        for c in conds:
            if c["type"] in ("Running", "Created") and ctype in ("Running", "Succeeded", "Failed"):
                c["status"] = "False" if c["type"] == "Running" else c["status"]
        conds.append({"type": ctype, "status": "True", "reason": reason, "message": message,
                      "lastTransitionTime": _now()})

    def _event(self, obj_name: str, reason: str, message: str):
        self.events.append({"apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": reason,
                            "message": message, "lastTimestamp": _now(),
                            "metadata": {"name": f"{obj_name}.{len(self.events)}", "namespace": "r4b"},
                            "involvedObject": {"kind": "Pod", "name": obj_name, "namespace": "r4b"}})

    def advance(self, name: str):
        job = self.jobs[name]
        if job["metadata"].get("deletionTimestamp"):
            # foreground deletion: the pods go first, the job on the next look
            for pod in [p for p in self.pods if p.startswith(name + "-")]:
                del self.pods[pod]
            del self.jobs[name]
            self.steps.pop(name, None)
            return
        step = self.steps.get(name, 0)
        self.steps[name] = step + 1
        workers = job["spec"]["pytorchReplicaSpecs"].get("Worker", {}).get("replicas", 0)
        master = f"{name}-master-0"
        with self.cond:
            if step == 0:
                self._condition(job, "Created", "PyTorchJobCreated", f"PyTorchJob {name} is created.")
                self._pod(job, "master", 0, "Pending")
                for i in range(workers):
                    self._pod(job, "worker", i, "Pending")
                if self.life == "pending":
                    self._event(master, "FailedScheduling",
                                "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
            elif self.life == "pending":
                pass
            elif step == 1:
                self._condition(job, "Running", "PyTorchJobRunning", f"PyTorchJob {name} is running.")
                for pod in self.pods.values():
                    if pod["metadata"]["name"].startswith(name + "-"):
                        pod["status"]["phase"] = "Running"
                self.logs[master] = ["rank 0: loading config " + self.config_uri, "step 1 loss 2.31"]
            elif step == 2:
                self.logs[master].append("step 2 loss 1.97")
                if self.life == "succeed":
                    self.logs[master].append("anneal done: model saved")
                    self._condition(job, "Succeeded", "PyTorchJobSucceeded", f"PyTorchJob {name} is successfully completed.")
                    for pod in self.pods.values():
                        if pod["metadata"]["name"].startswith(name + "-"):
                            pod["status"]["phase"] = "Succeeded"
                else:   # oom
                    self.logs[master].append("Killed")
                    self._condition(job, "Failed", "PyTorchJobFailed",
                                    f"PyTorchJob {name} is failed because 1 Master replica(s) failed.")
                    pod = self.pods[master]
                    pod["status"]["phase"] = "Failed"
                    pod["status"]["containerStatuses"] = [{
                        "name": "pytorch", "image": "x", "imageID": "", "ready": False, "restartCount": 0,
                        "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]
                    self._event(master, "Evicted", "The node was low on resource: memory.")
            self.cond.notify_all()

    # -- HTTP routing ------------------------------------------------------------------------
    def route(self, h, method: str):
        url = urlparse(h.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.requests.append((method, url.path))
        m = re.fullmatch(r"/apis/kubeflow.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/]+))?", url.path)
        if m:
            return self.jobs_route(h, method, m.group(1), m.group(2))
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", url.path)
        if m:
            return self.log_route(h, m.group(2), q)
        if re.fullmatch(r"/api/v1/namespaces/[^/]+/pods", url.path):
            key, _, value = q.get("labelSelector", "").partition("=")
            items = [p for p in self.pods.values() if p["metadata"]["labels"].get(key) == value]
            return h._send(200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items})
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/configmaps/([^/]+)", url.path)
        if m and method == "GET":
            if m.groups() not in self.configmaps:
                return h._send(404, status(404, "NotFound", f'configmaps "{m.group(2)}" not found'))
            return h._send(200, {"apiVersion": "v1", "kind": "ConfigMap",
                                 "metadata": {"name": m.group(2), "namespace": m.group(1)},
                                 "data": self.configmaps[m.groups()]})
        m = re.fullmatch(r"/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)", url.path)
        if m:
            return self.deployment_route(h, method, m.groups())
        if re.fullmatch(r"/api/v1/namespaces/[^/]+/events", url.path):
            items = [e for e in self.events if q.get("fieldSelector") != "type=Warning" or e["type"] == "Warning"]
            return h._send(200, {"apiVersion": "v1", "kind": "EventList", "metadata": {}, "items": items})
        h._send(404, status(404, "NotFound", f"no route {url.path}"))

    def jobs_route(self, h, method, ns, name):
        if not self.crd_installed:
            return h._send(404, status(404, "NotFound", "the server could not find the requested resource"))
        if method == "POST":
            body = h._body()
            name = body["metadata"]["name"]
            if self.forbid_create:
                return h._send(403, status(403, "Forbidden", f'pytorchjobs.kubeflow.org is forbidden: User '
                                            f'"system:serviceaccount:{ns}:pipeline-runner" cannot create resource'))
            if self.race and name not in self.jobs:
                self.race = False
                self.jobs[name] = json.loads(json.dumps(body))
                self.advance(name)   # the other attempt's job exists (Created)
            if name in self.jobs:
                return h._send(409, status(409, "AlreadyExists", f'pytorchjobs.kubeflow.org "{name}" already exists'))
            body["metadata"].update(uid=f"uid-{len(self.jobs)}", creationTimestamp=_now())
            self.jobs[name] = body
            return h._send(201, body)
        if name not in self.jobs:
            return h._send(404, status(404, "NotFound", f'pytorchjobs.kubeflow.org "{name}" not found'))
        if method == "GET":
            self.advance(name)
            if name not in self.jobs:
                return h._send(404, status(404, "NotFound", f'pytorchjobs.kubeflow.org "{name}" not found'))
            return h._send(200, self.jobs[name])
        if method == "DELETE":
            self.jobs[name]["metadata"]["deletionTimestamp"] = _now()
            return h._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}})
        h._send(405, status(405, "MethodNotAllowed", method))

    def deployment_route(self, h, method, key):
        if key not in self.deployments:
            return h._send(404, status(404, "NotFound", f'deployments.apps "{key[1]}" not found'))
        if method == "PATCH":
            body = h._body()
            self.patches.append((h.path, h.headers["Content-Type"], body))
            _merge(self.deployments[key], body)
        elif method != "GET":
            return h._send(405, status(405, "MethodNotAllowed", method))
        h._send(200, self.deployments[key])

    def log_route(self, h, pod, q):
        if pod not in self.pods:
            return h._send(404, status(404, "NotFound", f'pods "{pod}" not found'))
        lines = self.logs.get(pod, [])
        if q.get("follow", "").lower() != "true":   # the python client sends "True"; Go ParseBool takes both
            tail = int(q["tailLines"]) if "tailLines" in q else len(lines)
            data = "".join(line + "\n" for line in lines[-tail:]).encode()
            h.send_response(200)
            h.send_header("Content-Type", "text/plain")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
            return
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        sent = 0
        with self.cond:
            while True:
                lines = self.logs.get(pod, [])
                for line in lines[sent:]:
                    data = (line + "\n").encode()
                    h.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                sent = len(lines)
                h.wfile.flush()
                if pod not in self.pods or self.pods[pod]["status"]["phase"] in ("Succeeded", "Failed"):
                    break
                self.cond.wait(timeout=5)
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()


def _merge(target: dict, patch: dict) -> None:
    """A strategic merge patch as far as maps go (enough for annotations and labels)."""
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
