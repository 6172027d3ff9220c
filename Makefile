# tokenwire: `make run` serves the app, `make test` runs every check. Both set up what they
# need on a fresh machine (a .venv, and as root Debian's chromium and redis-server).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_PACKAGES := chromium redis-server

NODE_STAMP := frontend/node_modules/.installed

.PHONY: run run-cluster bench test lint pytest venv frontend system-deps clean

run: venv frontend
	$(PY) -m backend

# Two nodes and a Redis on one machine: http://127.0.0.1:8001 and http://127.0.0.1:8002
# are one tokenwire (put any load balancer in front; no sticky sessions needed).
CLUSTER_REDIS_PORT ?= 6390
CLUSTER_SECRET ?= local-cluster-secret-change-me
run-cluster: venv frontend
	@command -v redis-server >/dev/null || { echo "install redis-server first (apt-get install redis-server)"; exit 1; }
	@set -e; dir=$$(mktemp -d); \
	redis-server --port $(CLUSTER_REDIS_PORT) --bind 127.0.0.1 --save '' --appendonly no --dir $$dir --daemonize no & redis=$$!; \
	trap 'kill $$redis $$a $$b 2>/dev/null; wait' INT TERM EXIT; \
	export TOKENWIRE_REDIS_URL=redis://127.0.0.1:$(CLUSTER_REDIS_PORT)/0 TOKENWIRE_SECRET=$(CLUSTER_SECRET); \
	PORT=8001 TOKENWIRE_NODE=node-a $(PY) -m backend & a=$$!; \
	PORT=8002 TOKENWIRE_NODE=node-b $(PY) -m backend & b=$$!; \
	wait $$a $$b

test: venv frontend system-deps lint pytest

# The benchmark: tokenwire against a bare websockets server and python-socketio, every
# figure in one run, into bench/results/ (results.md and PNGs). A full run takes a while;
# e.g. `make bench BENCH_ARGS="--only throughput,latency --repeat 1"`.
BENCH_ARGS ?=
bench: venv frontend system-deps
	$(PY) -m bench $(BENCH_ARGS)

venv: $(STAMP)

# PyScript and its interpreters, exactly as pinned in frontend/package-lock.json.
frontend: $(NODE_STAMP)

$(NODE_STAMP): frontend/package.json frontend/package-lock.json
	npm ci --prefix frontend --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian's chromium (e2e tests) and redis-server (multi-node tests), installed when missing.
system-deps:
	@missing=""; \
	for p in $(SYSTEM_PACKAGES); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "tokenwire: the tests need$$missing; install with: sudo apt-get install$$missing" >&2; exit 1; \
	  fi; \
	fi

lint: venv
	$(VENV)/bin/ruff check backend tests e2e bench harness
	$(VENV)/bin/ruff format --check backend tests e2e bench harness
	$(VENV)/bin/mypy

pytest: venv
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache frontend/node_modules
