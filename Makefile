# Tollgate: `make run` serves on 127.0.0.1:8080, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two stamps: `make run` installs only what serving needs; test, lint and bench add the
# dev tools (which include the service). Either may come first.
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
# Extra pytest arguments: `make test PYTEST_ARGS="tests/integration -x"`.
PYTEST_ARGS ?=
CHROMIUM ?= /usr/bin/chromium

.PHONY: install install-dev run test test-fast test-install test-contract test-faults iproute check-deploy lint bench wrk browser clean

install: $(RUN_STAMP)

install-dev: $(DEV_STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit("Tollgate needs Python 3.11 or newer") if sys.version_info < (3, 11) else None'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(RUN_STAMP)

run: install
	$(BIN)/tollgate serve

# The browser tests drive Debian's Chromium: as root, install it when it is missing.
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	  else \
	    echo "make browser: $(CHROMIUM) is missing; as root: apt-get install chromium" >&2; \
	  fi; \
	fi

test: install-dev browser
	$(BIN)/pytest -q $(PYTEST_ARGS)

# The unit tier alone: the rules and the protocol core over an in-memory log, in seconds.
test-fast: install-dev
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

# The running service against its OpenAPI document (schemathesis), about a minute.
test-contract: install-dev
	$(BIN)/pytest -q -m contract tests/contract $(PYTEST_ARGS)

# The fault suite: PostgreSQL killed and stalled, SMTP down and refusing, the service
# SIGKILLed, a slow-body flood, the parent of two workers killed; each under load, each
# checking afterwards that every acknowledged write is in the log. And a host cut off from
# the network while it holds the projections' locks, and the service cut off from PostgreSQL
# (network namespaces: root). A few minutes.
test-faults: install-dev iproute
	$(BIN)/pytest -q -m faults tests/faults $(PYTEST_ARGS)

# The partition faults build network namespaces with iproute2's `ip` (Debian's iproute2):
# as root, install it when it is missing; without root they are skipped.
iproute:
	@command -v ip >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y iproute2; \
	  fi; }

# promtool on the alert rules in deploy/ (installs Debian's prometheus package when missing).
check-deploy:
	deploy/check

# The install checks (a wheel in a clean virtualenv, a fresh copy in a private folder):
# a few minutes of pip, so not part of `make test`.
test-install: install-dev
	$(BIN)/pytest -q -m install tests/install $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The HTTP benchmarks drive load with wrk, a C load generator (Debian's): as root, install
# it when it is missing.
wrk:
	@command -v wrk >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y wrk; \
	  else \
	    echo "make bench: wrk is missing; as root: apt-get install wrk" >&2; exit 1; \
	  fi; }

bench: install-dev wrk
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
