#!/usr/bin/env bash
# `make images`: build the serve and train images of the Dockerfile (and, where the registry's base images cannot be
# pulled, first a local Python 3.11 base made from Debian packages plus local redis and prometheus images).
#
# Engine: Docker when its daemon answers, else podman (with runc, host network and explicit ulimits: what works on a
# machine whose kernel has hybrid cgroups and whose containers reach the package registries only through the host).
#
# Environment:
#   DARE_ENGINE=docker|podman   force an engine (default: detected as above)
#   DARE_LOCAL_BASE=auto|1|0    build the local Debian base: auto (default) = only when python:3.11-slim cannot be
#                               pulled; 1 = always; 0 = never (fail if the pull fails)
#   DARE_TORCH=cpu|cuda         the train image's torch: CPU build (default) or PyPI's CUDA build
#   DARE_TORCH_WHEELS=DIR       a folder holding torch-2.13.0*.whl to install from (default: /opt/wheels when it has
#                               one); its torch wheel is hard-linked into deploy/wheels/ (the build context)
#   DEBIAN_MIRROR=URL           debootstrap's mirror (default: the first `URIs:`/`deb` line of apt's sources)
#
# It writes var/images.env: the image names the local compose override (deploy/compose.local.yml) runs.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[images %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[images] error: %s\n' "$*" >&2; exit 1; }

TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' Dockerfile)
[ -n "$TORCH_VERSION" ] || die "no ARG TORCH_VERSION=... in the Dockerfile"

# ------------------------------------------------------------------------------------------------------ engine
ENGINE=${DARE_ENGINE:-}
if [ -z "$ENGINE" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    ENGINE=docker
  elif command -v podman >/dev/null 2>&1; then
    ENGINE=podman
  else
    die "neither a Docker engine (docker info fails) nor podman is available; on Debian: apt-get install podman runc"
  fi
fi
case "$ENGINE" in
  docker) RUN=(docker); BUILD=(docker build); ;;
  podman)
    # runc: crun fails on hybrid cgroups; --format docker keeps HEALTHCHECK (OCI images drop it).
    RUN=(podman --runtime runc)
    BUILD=(podman --runtime runc build --format docker --network host
           --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
    ;;
  *) die "DARE_ENGINE must be docker or podman, not $ENGINE" ;;
esac
log "engine: $ENGINE ($("${RUN[@]}" --version))"

# ------------------------------------------------------------------------------------------------- base image
PYTHON_IMAGE=python:3.11-slim
REDIS_IMAGE=redis:7.2-alpine
PROMETHEUS_IMAGE=prom/prometheus:v2.53.0
LOCAL_BASE=localhost/dare-python:3.11-bookworm
LOCAL_BASE_MODE=${DARE_LOCAL_BASE:-auto}

pull() { timeout 300 "${RUN[@]}" pull "$1" >/dev/null 2>&1; }

build_local_base() {
  command -v debootstrap >/dev/null 2>&1 || die "debootstrap is needed for the local base (apt-get install debootstrap)"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  local mirror=${DEBIAN_MIRROR:-}
  if [ -z "$mirror" ]; then
    mirror=$(grep -h -E '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
             | grep -m1 -E 'debian/?$|debian ' | sed -E 's/^URIs: *//; s/^deb (\[[^]]*\] )?//; s/ .*//') || true
    mirror=${mirror:-http://deb.debian.org/debian}
  fi
  local rootfs=var/images/rootfs
  rm -rf "$rootfs" && mkdir -p "$rootfs"
  log "local base: debootstrap --variant=minbase bookworm from $mirror (a few minutes)"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python3-dev,python-is-python3,ca-certificates,passwd \
    bookworm "$rootfs" "$mirror" > var/images/debootstrap.log 2>&1 \
    || { tail -20 var/images/debootstrap.log >&2; die "debootstrap failed (log: var/images/debootstrap.log)"; }
  # pip and apt inside trust what this machine trusts (a machine behind a TLS-inspecting proxy has its own CA).
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  # An image is its own environment: pip may install into the system Python (as in python:3.11-slim).
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  # The image's apt uses the same mirror; no package lists or caches in the image.
  printf 'deb %s bookworm main\n' "$mirror" > "$rootfs/etc/apt/sources.list"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  # As in Debian's official images: apt keeps no package caches in a layer.
  cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
  log "local base: importing as $LOCAL_BASE"
  tar -C "$rootfs" -c . | "${RUN[@]}" import \
    --change 'ENV LANG=C.UTF-8' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' - "$LOCAL_BASE" >/dev/null
  rm -rf "$rootfs"
}

USE_LOCAL=0
case "$LOCAL_BASE_MODE" in
  1) USE_LOCAL=1 ;;
  0) pull "$PYTHON_IMAGE" || die "cannot pull $PYTHON_IMAGE (DARE_LOCAL_BASE=0)" ;;
  auto)
    log "pulling $PYTHON_IMAGE"
    if pull "$PYTHON_IMAGE"; then
      log "pulled $PYTHON_IMAGE: official base, redis and prometheus images"
    else
      log "cannot pull $PYTHON_IMAGE from the registry: building a LOCAL base from Debian packages instead"
      USE_LOCAL=1
    fi
    ;;
  *) die "DARE_LOCAL_BASE must be auto, 1 or 0, not $LOCAL_BASE_MODE" ;;
esac

mkdir -p var/images
if [ "$USE_LOCAL" = 1 ]; then
  if "${RUN[@]}" image exists "$LOCAL_BASE" 2>/dev/null || "${RUN[@]}" image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
    log "local base $LOCAL_BASE exists (remove it to rebuild: $ENGINE rmi $LOCAL_BASE)"
  else
    build_local_base
  fi
  PYTHON_IMAGE=$LOCAL_BASE
  REDIS_IMAGE=localhost/dare-redis:bookworm
  PROMETHEUS_IMAGE=localhost/dare-prometheus:bookworm
  log "local redis image $REDIS_IMAGE: Debian's redis-server on the local base"
  "${BUILD[@]}" --build-arg "BASE_IMAGE=$LOCAL_BASE" -f deploy/local/redis.Dockerfile -t "$REDIS_IMAGE" deploy/local
  log "local prometheus image $PROMETHEUS_IMAGE: Debian's prometheus on the local base"
  "${BUILD[@]}" --build-arg "BASE_IMAGE=$LOCAL_BASE" -f deploy/local/prometheus.Dockerfile -t "$PROMETHEUS_IMAGE" \
    deploy/local
else
  pull "$REDIS_IMAGE" || die "cannot pull $REDIS_IMAGE"
  pull "$PROMETHEUS_IMAGE" || die "cannot pull $PROMETHEUS_IMAGE"
fi

# ------------------------------------------------------------------------------------------------ torch wheel
TORCH=${DARE_TORCH:-cpu}
case "$TORCH" in cpu|cuda) ;; *) die "DARE_TORCH must be cpu or cuda, not $TORCH" ;; esac
rm -f deploy/wheels/torch-*.whl
if [ "$TORCH" = cpu ]; then
  WHEELS=${DARE_TORCH_WHEELS:-/opt/wheels}
  wheel=$(ls "$WHEELS"/torch-"$TORCH_VERSION"+cpu-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$wheel" ]; then
    ln "$wheel" deploy/wheels/ 2>/dev/null || cp "$wheel" deploy/wheels/
    log "train image: torch from the local wheel $wheel"
  elif [ -n "${DARE_TORCH_WHEELS:-}" ]; then
    die "DARE_TORCH_WHEELS=$WHEELS holds no torch-$TORCH_VERSION+cpu-*.whl"
  else
    log "train image: torch from PyTorch's CPU index (no local wheel in $WHEELS)"
  fi
else
  log "train image: torch from PyPI (the CUDA build, several GB)"
fi

# --------------------------------------------------------------------------------------------- serve + train
log "building dare-api:local (target serve) on $PYTHON_IMAGE"
"${BUILD[@]}" --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" --target serve -t dare-api:local .
log "building dare-trainer:local (target train, TORCH=$TORCH) on $PYTHON_IMAGE"
"${BUILD[@]}" --build-arg "PYTHON_IMAGE=$PYTHON_IMAGE" --build-arg "TORCH=$TORCH" --target train \
  -t dare-trainer:local .
rm -f deploy/wheels/torch-*.whl

cat > var/images.env <<EOF
# Written by \`make images\` ($(date -u +%Y-%m-%dT%H:%M:%SZ)): the images deploy/compose.local.yml runs.
DARE_ENGINE=$ENGINE
DARE_PYTHON_IMAGE=$PYTHON_IMAGE
DARE_REDIS_IMAGE=$REDIS_IMAGE
DARE_PROMETHEUS_IMAGE=$PROMETHEUS_IMAGE
DARE_API_IMAGE=dare-api:local
DARE_TRAINER_IMAGE=dare-trainer:local
EOF

size() { "${RUN[@]}" image inspect --format '{{.Size}}' "$1" | awk '{printf "%.0f MB", $1/1e6}'; }
log "images (sizes as $ENGINE reports them):"
for image in "$PYTHON_IMAGE" dare-api:local dare-trainer:local "$REDIS_IMAGE" "$PROMETHEUS_IMAGE"; do
  printf '  %-40s %s\n' "$image" "$(size "$image")"
done
[ "$USE_LOCAL" = 1 ] && log "NOTE: built on the LOCAL Debian base $LOCAL_BASE (the registry's python:3.11-slim could not be pulled)"
log "done"
