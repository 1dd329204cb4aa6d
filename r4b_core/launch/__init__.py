"""How a training stage runs.

- in-process / torchrun on this machine (the local launcher, `launcher.kind: local`);
- `r4b_core.launch.pytorchjob`: a Kubeflow PyTorchJob on Kubernetes (`launcher.kind: pytorchjob`),
  with the vLLM rollout server as a native sidecar for BPO. It is the only module of r4b_core that
  imports the kubernetes / kubeflow-training clients, so import it explicitly:

      from r4b_core.launch.pytorchjob import launch
"""

from r4b_core.errors import R4BError

# Labels by which the Helm chart's NetworkPolicies admit a pod to MLflow and the dev object store
# (charts/r4b/templates/_helpers.tpl, r4b.clientLabels): on PyTorchJob pods and pipeline task pods.
CLIENT_LABELS = {"r4b.dev/mlflow-client": "true", "r4b.dev/objectstore-client": "true"}


class LaunchError(R4BError):
    """A stage cannot be launched, or its launch failed; the message says why and what to change."""
