# Post Office — every entry point a developer, CI or an operator needs.
# `make run` and `make test` install whatever is missing on a fresh machine.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install os-deps browser run test test-fast lint typecheck bench up down lock clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements.lock requirements-dev.lock pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "Python 3.11+ is required (found $$($(PYTHON) --version))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# The exact pins of the lock, installed without hash checking: a machine's wheel cache or
	@# package mirror may hold a rebuilt wheel of a pinned release (same version, other hash).
	@# The image build (compose/Dockerfile) installs the lock with --require-hashes.
	sed -e '/--hash=/d' -e 's/ \\$$//' requirements-dev.lock > $(VENV)/pins.txt
	$(PY) -m pip install -q -r $(VENV)/pins.txt
	@touch $(STAMP)

install: $(STAMP) os-deps  ## venv with the pinned deps, plus redis-server from the OS packages

os-deps:  ## redis-server, redis-sentinel and promtool from the OS packages when missing
	@scripts/ensure-os-package.sh redis-server redis-server
	@scripts/ensure-os-package.sh promtool prometheus
	@scripts/ensure-os-package.sh redis-sentinel redis-sentinel

browser:  ## Chromium from the OS packages (the browser test drives it)
	@scripts/ensure-os-package.sh chromium chromium

run: install  ## the whole stack: private redis, 4 services, 2 gateways, demo agent
	$(PY) -m scripts.run_stack

test: install browser  ## the whole suite against real redis-server and service processes
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install  ## the suite without the browser test
	$(PY) -m pytest -q -m "not browser" $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)  ## mypy (strict)
	$(VENV)/bin/mypy shared services post_office_client agents scripts bench

bench: install  ## benchmarks (bench/), figures printed and written to bench/results/
	$(PY) -m bench.run_all

COMPOSE := docker compose -f compose/docker-compose.yml

up:  ## the full stack in Docker Compose (first run: compose/.env with fresh random secrets)
	@docker compose version >/dev/null 2>&1 || \
		{ echo "make up needs Docker with the compose plugin ('docker compose'): see docs/deployment.md"; exit 1; }
	@$(PYTHON) compose/gen_env.py
	$(COMPOSE) up --build --detach --wait
	@echo "edge: http://localhost/ (chat page; /ws, /v1)  grafana: http://127.0.0.1:3000  prometheus: http://127.0.0.1:9090  jaeger: http://127.0.0.1:16686  consul: http://127.0.0.1:8500"

down:  ## stop the Docker Compose stack (each service drains on SIGTERM; volumes are kept)
	$(COMPOSE) down

lock: $(STAMP)  ## re-pin both hashed lock files after changing pyproject.toml (scripts/lock.sh)
	scripts/lock.sh

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .run
