# syntax=docker/dockerfile:1
# Two images from one file:
#   serve  the scoring service: what `dare serve` imports (core + the `serve` and `otel` extras: onnxruntime,
#          FastAPI/uvicorn, the Redis client, prometheus-client, OpenTelemetry); no torch, no plotting, no `dare load`.
#          Runs as a non-root user.
#   train  the one-shot trainer of docker-compose.yml: CPU torch + everything `dare demo --no-serve` needs
#          (the `train`, `serve` and `tools` extras: prepare, train, export, `dare load`, benches).
# In both, dependencies are installed from a lock file (requirements/serve.txt, requirements/train.txt: every
# dependency at one exact version, `make lock`) with --no-deps and checked with `pip check`, before the code is
# copied, so editing code re-runs only the last, cheap layers.
#
# Build args:
#   PYTHON_IMAGE  the base (default python:3.11-slim; `make images` passes a local Debian-built one where the
#                 registry cannot be pulled)
#   TORCH         train image only: `cpu` (default: the CPU wheel from deploy/wheels/ when `make images` put one
#                 there, else from PyTorch's CPU index) or `cuda` (PyPI's default wheel with the CUDA libraries,
#                 which torch's own metadata pins; everything else still from the lock)

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

# --------------------------------------------------------------------------------------------- serve
FROM base AS serve
# Core + the `serve` and `otel` extras only: the serving image must never carry torch (tests/shipping checks this).
COPY requirements/serve.txt ./requirements.txt
RUN pip install --no-cache-dir --no-deps -r requirements.txt && pip check
COPY pyproject.toml setup.py README.md ./
COPY dare_common ./dare_common
COPY dare ./dare
COPY service ./service
COPY training ./training
COPY loadtest ./loadtest
# --no-deps: the dependencies are already in the layer above; this installs the `dare` entry point and compiles
# the fused search kernel (service/_search.c) with a C compiler that is removed again in the same layer (exactly
# the packages this step added: a base that ships some of them, like a Debian-built one with python3-dev, keeps
# them). The check imports the kernel with `python -I`: without the working directory on sys.path, so it finds the
# installed package and not the copied source tree (which has no compiled module); the source tree is then
# removed, so nothing run from /app can import it instead of the installed package. Distro package versions are
# left to the base image's release (they are build tools, not part of what runs).
# hadolint ignore=DL3008,SC2086
RUN saved="$(apt-mark showmanual)" \
    && apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir --no-deps . \
    && python -I -c "import service._search" \
    && apt-mark auto '.*' > /dev/null && apt-mark manual ${saved} > /dev/null \
    && apt-get purge -y --auto-remove -o APT::AutoRemove::RecommendsImportant=false \
       -o APT::AutoRemove::SuggestsImportant=false \
    && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
    && rm -rf README.md pyproject.toml setup.py requirements.txt build dare service training loadtest \
              ./*.egg-info \
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
# torch is installed on its own first (its layer is the big one), then the rest of requirements/train.txt, the lock
# that pins torch's CPU build and every other dependency. TORCH=cpu (default): the CPU wheel that `make images` put
# into deploy/wheels/ when there is one, else PyTorch's CPU index. TORCH=cuda: PyPI's default wheel (with the CUDA
# libraries, several GB, at the versions torch pins), its other dependencies constrained to the lock. Keep
# TORCH_VERSION equal to the pin in pyproject.toml's `train` extra (tests/shipping checks this).
ARG TORCH_VERSION=2.13.0
ARG TORCH=cpu
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
COPY requirements/train.txt ./requirements.txt
# The wheel folder is bind-mounted for this step only, so the wheel itself never becomes a layer of the image.
# (DL3013: the local wheel's file name pins its version.)
# hadolint ignore=DL3013
RUN --mount=type=bind,source=deploy/wheels,target=/tmp/wheels \
    set -eu; \
    grep -v '^torch==' requirements.txt > requirements-no-torch.txt; \
    wheel=$(find /tmp/wheels -name "torch-${TORCH_VERSION}+cpu-*.whl" -print -quit); \
    case "${TORCH}" in \
      cpu) if [ -n "${wheel}" ]; then \
             pip install --no-cache-dir --no-deps "${wheel}"; \
           else \
             pip install --no-cache-dir --no-deps --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}+cpu"; \
           fi ;; \
      cuda) pip install --no-cache-dir -c requirements-no-torch.txt "torch==${TORCH_VERSION}" ;; \
      *) echo "TORCH must be cpu or cuda, not ${TORCH}" >&2; exit 1 ;; \
    esac
RUN pip install --no-cache-dir --no-deps -r requirements-no-torch.txt \
    && pip check \
    && rm requirements.txt requirements-no-torch.txt
COPY pyproject.toml setup.py README.md ./
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
CMD ["dare", "demo", "--no-serve", "--input", "data/taobao-sample/UserBehavior.csv.gz", "--att-dims", "16,32,64,128", \
     "--epochs", "1", "--models", "/models", "--work", "/app/var"]
