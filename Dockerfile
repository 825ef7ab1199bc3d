# syntax=docker/dockerfile:1
# Two images from one file:
#   serve  the scoring service: slim Python, onnxruntime, Redis client; no torch. Runs as a non-root user.
#   train  the one-shot trainer of docker-compose.yml: CPU torch + everything `dare demo --no-serve` needs.
# In both, dependencies are installed from pyproject.toml's pins before the code is copied, so editing code
# re-runs only the last, cheap layers.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------- base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A fixed uid/gid, so files the containers write into named volumes have one owner across images.
RUN groupadd --system --gid 10001 dare \
    && useradd --system --uid 10001 --gid dare --home-dir /app --shell /usr/sbin/nologin dare
WORKDIR /app
COPY pyproject.toml setup.py deploy/requirements.py ./

# --------------------------------------------------------------------------------------------- serve
FROM base AS serve
# Core + the `serve` extra only: the serving image must never carry torch (tests/shipping checks this).
RUN python requirements.py serve > requirements-serve.txt \
    && pip install --no-cache-dir -r requirements-serve.txt
COPY README.md ./
COPY dare_common ./dare_common
COPY dare ./dare
COPY service ./service
COPY training ./training
COPY loadtest ./loadtest
# --no-deps: the dependencies are already in the layer above; this installs the `dare` entry point and compiles
# the fused search kernel (service/_search.c) with a C compiler that is
# removed again in the same layer. Distro
# package versions are left to the base image's release (they are build tools, not part of what runs).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir --no-deps . \
    && python -c "import service._search" \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /models /app/var \
    && chown 10001:10001 /models /app/var
USER 10001:10001
ENV DARE_MODELS_DIR=/models
EXPOSE 8000
# /readyz is true once the store answers and at least one model is loaded. No curl in the slim image:
# urlopen raises on a non-2xx answer or a timeout, which makes python exit non-zero.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2)"]
CMD ["dare", "serve", "--models", "/models", "--host", "0.0.0.0", "--port", "8000"]

# --------------------------------------------------------------------------------------------- train
FROM base AS train
# torch is installed on its own first: pass --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> to get the
# small CPU-only wheel instead of the default one with CUDA libraries. Keep TORCH_VERSION equal to the pin in
# pyproject.toml's `train` extra (tests/shipping checks this).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}"; \
    fi
RUN python requirements.py --exclude torch train serve > requirements-train.txt \
    && pip install --no-cache-dir -r requirements-train.txt
COPY README.md ./
COPY data/taobao-sample ./data/taobao-sample
COPY dare_common ./dare_common
COPY dare ./dare
COPY service ./service
COPY training ./training
COPY loadtest ./loadtest
RUN pip install --no-cache-dir --no-deps . \
    && mkdir -p /models /app/var \
    && chown 10001:10001 /models /app/var
USER 10001:10001
ENV DARE_MODELS_DIR=/models
# Prepare the bundled sample, train + export DARE at four attention dims into /models, load Redis; then exit.
# Every step is skipped when its output already exists and is valid, so a re-run of the stack is quick.
CMD ["dare", "demo", "--no-serve", "--sample", "data/taobao-sample/UserBehavior.csv.gz", "--att-dims", "16,32,64,128", \
     "--models", "/models", "--work", "/app/var"]
