# bpfproxy: `make demo` and `make test` work as the very first command on Debian 12 (root).
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python

.PHONY: install proto demo test unit integration e2e lint bench bench-quick clean

# Always runs the script: its checks are cheap and it repairs what a reboot or a
# removed package undid (kernel header links, bpffs); pip runs only when needed.
install:
	bash scripts/install.sh

proto: install

demo: install
	$(PY) -m examples.demo

test: install
	$(PY) -m pytest -q tests

unit: install
	$(PY) -m pytest -q tests/unit

integration: install
	$(PY) -m pytest -q tests/integration tests/e2e

bench: install
	$(PY) -m bench.run

bench-quick: install
	$(PY) -m bench.run --quick

lint: install
	$(VENV)/bin/ruff check agent tests examples

# A kind cluster without kube-proxy, bpfproxy in it, a test app through it (needs Docker
# and kind; each target says so at once when they are missing). KIND_CLUSTER, BPFPROXY_IMAGE.
.PHONY: kind-up kind-deploy kind-test kind-down
kind-up:
	bash scripts/kind.sh up

kind-deploy:
	bash scripts/kind.sh deploy

kind-test:
	bash scripts/kind.sh test

kind-down:
	bash scripts/kind.sh down

clean:
	rm -rf $(VENV) agent/api/generated .pytest_cache
