# The README's two commands: `make demo` and `make test`. Everything installs into ./.venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install lock bench clean ci-tools images compose-test

# Every dependency at the exact version of requirements/dev.txt (the lock of all extras; `make lock` writes it),
# --no-deps so nothing unpinned slips in, then `pip check` that the set is complete. torch is its CPU build,
# 2.13.0+cpu: a local wheel (pip's find-links) or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
$(STAMP): pyproject.toml setup.py service/_search.c requirements/dev.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar on --no-deps -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	@touch $(STAMP)

install: $(STAMP)

# Re-compile requirements/{serve,train,dev}.txt from pyproject.toml (uv pip compile, from PyPI); a test fails
# while they are stale (deploy/lock.py --check).
lock: $(STAMP)
	$(BIN)/python deploy/lock.py

# DEMO_ARGS passes options through, e.g. `make demo DEMO_ARGS=--exit-after-score` (stop after the first score).
demo: $(STAMP)
	$(BIN)/dare demo $(DEMO_ARGS)

# What some tests need from Debian, installed here only in CI (CI=true, as root, with apt-get), each package only
# when its command is missing: promtool (package `prometheus`: checks deploy/prometheus/prometheus.yml) and chromium
# (loads /docs and /redoc offline). A failed install is not an error: those tests then skip, saying why.
ci-tools:
	@if [ -n "$$CI" ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  missing=""; \
	  command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	  command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then \
	    apt-get update -qq >/dev/null 2>&1; \
	    for pkg in $$missing; do \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkg >/dev/null 2>&1 \
	        || echo "$$pkg could not be installed; the tests that need it will be skipped"; \
	    done; \
	  fi; \
	fi

test: $(STAMP) ci-tools
	$(BIN)/python -m pytest -q

# The benchmark (about 9 minutes on the 2-core machine): JSON, markdown table and chart in docs/bench/, which the docs quote.
bench: $(STAMP)
	$(BIN)/dare bench --out docs/bench/bench.json

# The container images of docker-compose.yml (docs/deploy.md): serve (dare-api:local) and train (dare-trainer:local),
# with Docker or podman. Where python:3.11-slim cannot be pulled it first builds a local Python 3.11 base from
# Debian packages (debootstrap, as root) and local redis and prometheus images, and says so.
images:
	bash deploy/images.sh

# The stack of docker-compose.yml, up for real and checked end to end, then torn down (docs/deploy.md). Needs
# `make images` first; uses `docker compose` where a Docker engine answers, else podman-compose (from the venv).
compose-test: $(STAMP)
	$(BIN)/python deploy/compose_test.py

clean:
	rm -rf var/ .pytest_cache
