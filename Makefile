# Isthmus — the entry points. `make run` and `make test` work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.PHONY: run test check lint types docs bench bench-deps system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

## run: create the virtualenv, install Isthmus, start it with the embedded default (./isthmus-data)
run: $(STAMP)
	$(BIN)/isthmus serve

## system-deps: Debian packages the tests and benchmarks need (installed only when missing; needs root)
system-deps:
	@missing=""; \
	for pair in curl:curl wrk:wrk openssl:openssl mosquitto:mosquitto mosquitto_pub:mosquitto-clients; do \
	  cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; \
	done; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 \
	  || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || { echo "could not install$$missing"; exit 1; }; \
	  else echo "missing Debian packages:$$missing (run 'sudo make system-deps')"; exit 1; fi; \
	fi

## test: install everything the tests need and run them all
test: $(STAMP) system-deps
	$(BIN)/python -X dev -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

types: $(STAMP)
	$(BIN)/mypy

## docs: regenerate the CLI and configuration references (a test fails when the checked-in copy is stale)
docs: $(STAMP)
	$(BIN)/python -m isthmus.cli.docs > docs/cli.md
	$(BIN)/python -m isthmus.config > docs/configuration.md

## check: lint + types + tests (the tests include the docs check)
check: lint types test

## bench-deps: the MQTT benchmark's reference servers, Debian mosquitto and nats-server (installed only when missing)
bench-deps:
	@missing=""; \
	for cmd in mosquitto nats-server; do command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$cmd"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || { echo "could not install$$missing"; exit 1; }; \
	  else echo "missing Debian packages:$$missing (run 'sudo make bench-deps')"; exit 1; fi; \
	fi

## bench: HTTP and MQTT ingest benchmarks against references (Starlette; mosquitto, nats-server); about 10 minutes
bench: $(STAMP) system-deps bench-deps
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache
