# syntax=docker/dockerfile:1
# The r4b vLLM image: the vLLM OpenAI server plus r4b's server assets (r4b_core/assets: the worker
# extension that reloads pushed weights in place and refreshes a tied output layer, the serving plugin).
# It runs the BPO rollout sidecar and the serving Deployment; the chat template comes with the model
# folder / the sidecar's fetch step.
#
#   docker build -f docker/vllm.Dockerfile -t r4b-vllm:dev .
#   docker build -f docker/vllm.Dockerfile --build-arg VLLM_IMAGE=<a vLLM CPU image> -t r4b-vllm:cpu .
ARG VLLM_IMAGE=vllm/vllm-openai
ARG VLLM_VERSION=v0.32.0
FROM ${VLLM_IMAGE}:${VLLM_VERSION}

ARG UID=1000
USER root
# a passwd entry for uid 1000 (torch's compile caches look the user up) and a `python` next to python3
RUN (getent passwd ${UID} >/dev/null || useradd --uid ${UID} --home-dir /tmp --no-create-home \
        --shell /usr/sbin/nologin r4b) \
 && (command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python)

# r4b_core/launch/pytorchjob.py VLLM_ASSETS_DIR
COPY r4b_core/assets/ /opt/r4b/assets/
ENV PYTHONPATH=/opt/r4b/assets \
    HOME=/tmp \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

USER ${UID}
ENTRYPOINT ["python3", "-m", "vllm.entrypoints.openai.api_server"]
