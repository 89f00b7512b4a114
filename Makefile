# sluice — two commands on a fresh machine:  make demo   |   make test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sluice-installed
# A CPU build of torch where no GPU is present (a bare `torch` can pull a multi-GB CUDA build).
TORCH_CPU_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# The suite runs on this many pytest-xdist processes, a test file per process at a time (its
# tests share fixtures and run in order); PYTEST_WORKERS=0 runs it in one process. The 15
# slowest tests are listed at the end.
PYTEST_WORKERS ?= 2
DEMO_ARGS ?=

.PHONY: setup demo test test-unit test-fast lint bench redis-server clean

setup: $(STAMP) redis-server

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sluice needs Python >= 3.11 (found " + sys.version.split()[0] + ")")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  echo "GPU found: installing the default torch build"; \
	else \
	  $(PY) -c 'import torch' >/dev/null 2>&1 || { echo "no GPU: installing CPU torch ($(TORCH_CPU_SPEC))"; $(PY) -m pip install -q "$(TORCH_CPU_SPEC)"; }; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server not found: installing it with the system package manager"; \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server >/dev/null; \
	  elif command -v dnf >/dev/null 2>&1; then sudo dnf install -y redis; \
	  elif command -v brew >/dev/null 2>&1; then brew install redis; \
	  fi; \
	  command -v redis-server >/dev/null 2>&1 || { echo "could not install redis-server: install Redis >= 6.2 (redis-server on PATH) and rerun"; exit 1; }; \
	}

demo: setup
	$(VENV)/bin/sluice demo $(DEMO_ARGS)
	@echo "the sluice command is in $(VENV)/bin: source $(VENV)/bin/activate (or call $(VENV)/bin/sluice)"

test: setup
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow and not faults" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/sluice bench buffer --json benchmarks/results/buffer.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
