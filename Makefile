# `make demo` and `make test` each create .venv when it is missing.
# TORCH_SPEC picks the torch build: the CPU build by default; a GPU user can pass e.g.
#   make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" venv
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv sandbox-deps demo test test-fast lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

# The sandbox prefers bubblewrap: install it where we can (root with apt-get). Never fails without
# it: the sandbox then builds the same jail through util-linux unshare, or, with no namespaces at
# all, refuses to run agent code (see sandbox/__init__.py); its tests say which backend they ran.
sandbox-deps:
	@command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -q bubblewrap >/dev/null 2>&1 || \
	    { timeout 300 apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -q bubblewrap >/dev/null 2>&1; }; }; } || \
	  echo "bubblewrap not installed: the sandbox uses its unshare fallback"

demo: venv
	$(BIN)/weightsmith demo

test: venv sandbox-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: venv sandbox-deps
	$(BIN)/python -m pytest -q -m "not slow"

# ruff checks the line length too (pyproject.toml); CI runs this before the tests.
lint: venv
	$(BIN)/ruff check server tools training_core sandbox tests benchmarks examples

bench: venv
	$(BIN)/python benchmarks/sft_throughput.py

clean:
	rm -rf $(VENV) .weightsmith
