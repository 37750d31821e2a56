# syntax=docker/dockerfile:1
# alexnet-dist: one image for the Ray head, the Ray GPU workers and the dispatcher.
#
# CUDA: the torch 2.14.1 wheel from PyPI (+cu130) brings the CUDA 13.0 runtime, cuDNN and NCCL as
# nvidia-* wheels, so a slim Python base is enough; the host provides the driver (>= 580, CUDA 13)
# through the NVIDIA container toolkit (`docker run --gpus all`, or the runtime Ray's cluster launcher
# picks, or the device plugin on Kubernetes). Build and check: see cluster/README.md.
#
# Layers go from rarely to often changed: OS packages, the dependency install (torch, Ray: ~6 GB,
# rebuilt only when pyproject.toml or the pins change), then the package source.
# No credentials are baked in: S3 keys, the Redis URL and the Ray auth token come from the
# environment at run time (IAM roles, Kubernetes Secrets, compose env).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
FROM ${PYTHON_IMAGE}

# NVIDIA_*: the container toolkit injects the driver only into containers that ask for it; the
# nvidia/cuda images set these, our slim base must too.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# rsync: Ray's cluster launcher syncs files into the container with `rsync -e 'docker exec'`.
# redis-server: lets the head of a small cluster run the job store itself (cluster/ray-aws.yaml).
# tini: reaps the processes Ray spawns when the container's main process is a shell.
# gcc, libc6-dev, libjpeg-dev: build the CPU kernels once, at install (alexnet_dist/kernels/csrc).
RUN apt-get update \
    && apt-get install -y --no-install-recommends rsync redis-server tini gcc libc6-dev libjpeg-dev \
    && rm -rf /var/lib/apt/lists/*

# Non-root user; uid 1000 and the name `ray` match Ray's own images, so Ray's docs' paths
# (/home/ray, ~/ray_bootstrap_config.yaml) hold here too.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray \
    && python -m venv /opt/venv

WORKDIR /opt/alexnet-dist

# Dependencies: their own layer, keyed on pyproject.toml and the pins only.
COPY pyproject.toml ./
COPY cluster/install.sh cluster/constraints.txt cluster/check_requirements.py ./cluster/
RUN cluster/install.sh deps

# The package (--no-deps) with its C kernels built, and a check that it imports, meets every pin,
# its CLI runs and its kernels load.
COPY README.md ./
COPY alexnet_dist ./alexnet_dist
RUN cluster/install.sh package check \
    && rm -rf build alexnet_dist.egg-info

# Job specs users submit from inside the cluster (dataset manifests live on S3 beside the shards).
COPY jobs ./jobs

USER ray
WORKDIR /home/ray
# 6379 Ray GCS, 8265 Ray dashboard + Jobs API, 10001 Ray client, 6380 Redis when run on the head.
EXPOSE 6379 8265 10001 6380
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["alexnet-dist", "--help"]
