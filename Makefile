# Two commands on a fresh machine:  `make run` (the main job) and `make test` (the whole suite).
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of this version is on local disk; any other version pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# The chat page's browser test runs Debian's chromium through Playwright (no browser download of its own).
CHROMIUM := /usr/bin/chromium
CHROMIUM_INSTALL := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	--no-install-recommends chromium

.PHONY: setup run test lint browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	$(VENV)/bin/dsv3 train --overwrite

test: setup browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .

# Without root or sudo this only says what to run: the rest of the suite still runs, and the browser test
# fails with the same advice.
browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ]; then sh -c '$(CHROMIUM_INSTALL)'; \
	  elif command -v sudo >/dev/null 2>&1; then sudo sh -c '$(CHROMIUM_INSTALL)'; \
	  else echo "make: the chat page's test needs chromium at $(CHROMIUM); as root run: $(CHROMIUM_INSTALL)" >&2; fi; }
