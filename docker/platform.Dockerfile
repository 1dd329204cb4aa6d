# syntax=docker/dockerfile:1
# The r4b platform image: r4b_core, the KFP components and pipelines, and the trainer's dependencies
# (torch, transformers, DeepSpeed, MLflow, kfp, kubeflow-training) at the versions of constraints.txt.
# It runs the KFP tasks, the PyTorchJob trainer pods, the BPO sidecar's weight-fetch step, the
# serving Deployment's init container, and (in kind tests) the MLflow server.
#
#   docker build -f docker/platform.Dockerfile -t r4b-platform:dev .                      # CPU torch
#   docker build -f docker/platform.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                -t ghcr.io/r4b-project/r4b-platform:0.1.0 .                                 # GPU nodes
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG UID=1000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DS_BUILD_OPS=0 \
    TOKENIZERS_PARALLELISM=false \
    HOME=/tmp

# uid 1000 is what the launcher and the chart run as (runAsUser); a passwd entry keeps tools that
# look the user up (getpass, torch's caches) working.
RUN groupadd --gid ${UID} r4b && useradd --uid ${UID} --gid ${UID} --home-dir /tmp --no-create-home \
    --shell /usr/sbin/nologin r4b

WORKDIR /opt/r4b
COPY pyproject.toml constraints.txt README.md ./
# torch and torchvision first, from the index that matches the nodes (their local version tags,
# +cpu / +cu128, are left out of the constraints); DeepSpeed's setup imports torch, hence no build
# isolation for it.
RUN grep -vE '^(torch|torchvision)==' constraints.txt > /tmp/constraints.txt \
 && pip install --index-url ${TORCH_INDEX_URL} "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && pip install -c /tmp/constraints.txt setuptools wheel \
 && pip install --no-build-isolation -c /tmp/constraints.txt deepspeed
COPY r4b_core ./r4b_core
COPY components ./components
COPY pipelines ./pipelines
COPY r4b_kfp ./r4b_kfp
RUN pip install -c /tmp/constraints.txt . && rm /tmp/constraints.txt \
 && python -c "import r4b_core, r4b_kfp.pipelines.r4b_pipeline, kfp, kubeflow.training, mlflow, torch; print('r4b', r4b_core.__version__, 'torch', torch.__version__)"

USER ${UID}:${UID}
CMD ["r4b", "--help"]
