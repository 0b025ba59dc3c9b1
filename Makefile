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
	@# Build the C kernels now (a few seconds with gcc) rather than on the first decode.
	$(BIN)/python -c "from lmforge import native; print('native kernels:', 'built' if native.kernels() else 'not available (no C compiler?): decoding runs on PyTorch alone')"
	touch $(STAMP)

demo: install
	$(BIN)/lmforge quickstart

# What only the tests need beyond `.[dev]`: headless Chromium for the web-page tests, and
# llama.cpp's Python binding (built from source, ~5 min the first time) to run our GGUF exports.
TEST_STAMP := $(VENV)/.test-deps
test-deps: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	bash scripts/install-chromium.sh
	$(BIN)/pip install -q llama-cpp-python==0.3.36
	touch $(TEST_STAMP)

test: install test-deps
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
