# Two commands on a fresh machine:  `make run` (the main job) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of this version is on local disk; any other version pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup run test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	$(VENV)/bin/dsv3 train --overwrite

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
