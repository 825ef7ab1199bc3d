# The README's two commands: `make demo` and `make test`. Everything installs into ./.venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean ci-tools images compose-test

$(STAMP): pyproject.toml setup.py service/_search.c
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned, so pip takes the local CPU build instead of resolving a CUDA one.
	$(BIN)/python -m pip install --quiet --progress-bar on "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --progress-bar on -e ".[train,serve,tools,dev,otel]"
	@touch $(STAMP)

install: $(STAMP)

# DEMO_ARGS passes options through, e.g. `make demo DEMO_ARGS=--exit-after-score` (stop after the first score).
demo: $(STAMP)
	$(BIN)/dare demo $(DEMO_ARGS)

# promtool (Debian package `prometheus`) lets tests/shipping check deploy/prometheus/prometheus.yml. Only in CI
# (CI=true, as root, with apt-get) is it installed here; a failed install is not an error: that check then skips.
ci-tools:
	@if [ -n "$$CI" ] && ! command -v promtool >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
	    && [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus) >/dev/null 2>&1 || echo "promtool could not be installed; its check will be skipped"; \
	fi

test: $(STAMP) ci-tools
	$(BIN)/python -m pytest -q

# The benchmark (about 4 minutes on the 2-core machine): JSON, markdown table and chart in docs/bench/, which the docs quote.
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
