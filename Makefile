# `make demo` and `make test` each create .venv when it is missing.
# TORCH_SPEC picks the torch build: the CPU build by default; a GPU user can pass e.g.
#   make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" venv
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-fast lint bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: venv
	$(BIN)/weightsmith demo

test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: venv
	$(BIN)/python -m pytest -q -m "not slow"

lint: venv
	$(BIN)/ruff check server tools training_core sandbox tests benchmarks examples

bench: venv
	$(BIN)/python benchmarks/sft_throughput.py

clean:
	rm -rf $(VENV) .weightsmith
