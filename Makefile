# The README's two commands: `make demo` and `make test`. Everything installs into ./.venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned, so pip takes the local CPU build instead of resolving a CUDA one.
	$(BIN)/python -m pip install --quiet --progress-bar on "torch==2.13.0"
	$(BIN)/python -m pip install --quiet --progress-bar on -e ".[train,serve,dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/dare demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf var/ .pytest_cache
