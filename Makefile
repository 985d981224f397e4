# Two commands for a newcomer: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all lint bench clean

setup: $(STAMP)

# Reinstall only when the dependency pins change; constraints.txt makes the resolve exact.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/cssl demo

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/cssl bench ingest
	$(BIN)/cssl bench train

# ruff (lint + format) and mypy (types; settings in pyproject.toml) over the packages.
lint: setup
	$(BIN)/ruff check cssl_core pipelines benchmarks tests
	$(BIN)/ruff format --check cssl_core pipelines benchmarks tests
	$(BIN)/mypy

clean:
	rm -rf .cssl .pytest_cache .mypy_cache
