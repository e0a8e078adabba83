# bpfproxy: `make demo` and `make test` work as the very first command on Debian 12 (root).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.bpfproxy-installed

.PHONY: install proto demo test unit integration e2e lint bench bench-quick clean

install: $(STAMP) proto
$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh

proto: $(STAMP)
	$(PY) -m agent.api.codegen

demo: install
	$(PY) -m examples.demo

test: install
	$(PY) -m pytest -q tests

unit: install
	$(PY) -m pytest -q tests/unit

integration: install
	$(PY) -m pytest -q tests/integration tests/e2e

lint: install
	$(VENV)/bin/ruff check agent tests examples

clean:
	rm -rf $(VENV) agent/api/generated .pytest_cache
