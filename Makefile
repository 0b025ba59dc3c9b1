# The two commands: `make demo` and `make test`. Both set everything up first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test-deps demo test clean

install: $(STAMP)

# torch is installed first and pinned so that pip takes the CPU wheel on disk
# instead of resolving a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/lmforge quickstart

# What only the tests need outside Python: headless Chromium for the web-page tests.
test-deps:
	bash scripts/install-chromium.sh

test: install test-deps
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
