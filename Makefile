# plantstream — the two commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=
# The local services' state (configuration, data, logs, pid files) stays in the checkout's .local/; without
# it, an installed plantstream uses the per-user $XDG_STATE_HOME/plantstream (~/.local/state/plantstream).
export PLANTSTREAM_LOCAL_DIR ?= $(CURDIR)/.local

.PHONY: setup test test-unit test-integration test-e2e faults demo bench lint format typecheck services-up services-down services-status clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,opcua,bacnet,influx]'
	@rm -f $(VENV)/.installed-*; touch $@

## setup: virtualenv with the package and its tools; Debian packages and Kafka jars for the local services
setup: $(STAMP)
	$(PY) -c 'from localservices import harness; harness.install(); harness.install_browser()'

## services-up / services-down / services-status: the local Kafka, PostgreSQL, Mosquitto, InfluxDB
services-up: setup
	$(VENV)/bin/plantstream services up

services-down:
	$(VENV)/bin/plantstream services down

services-status:
	$(VENV)/bin/plantstream services status

## test: everything — unit, integration (real services), end to end, the fault scenarios short
## (two lanes, tests/lanes.sh: the fault scenarios, which mostly wait on private services, beside the rest)
test: services-up
	PY=$(PY) tests/lanes.sh $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

test-integration: services-up
	$(PY) -m pytest tests/integration -q $(PYTEST_ARGS)

test-e2e: services-up
	$(PY) -m pytest tests/e2e -q $(PYTEST_ARGS)

## faults: the fault-injection suite at full length (ten-minute outages; about an hour), with the attack and crash tests; `make test` runs it short
faults: services-up
	PLANTSTREAM_FAULTS=full $(PY) -m pytest tests -m faults -v -p no:cacheprovider --durations=30 $(PYTEST_ARGS)

## demo: services, the demo topology, simulator + connector + worker, and a live table of aggregates
demo: services-up
	$(VENV)/bin/plantstream demo topologies/demo.yaml

## bench: throughput and latency on this machine (results in bench/results/)
bench: services-up
	$(PY) -m bench.run $(BENCH_ARGS)

## lint: ruff, formatting, mypy, and the import contracts (one direction of dependency)
lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline connectors localservices tests bench
	$(VENV)/bin/ruff format --check pipeline connectors localservices tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff format pipeline connectors localservices tests bench
	$(VENV)/bin/ruff check --fix pipeline connectors localservices tests bench

clean:
	@test -n "$(PLANTSTREAM_LOCAL_DIR)" || { echo "clean: PLANTSTREAM_LOCAL_DIR is empty" >&2; exit 1; }
	rm -rf "$(PLANTSTREAM_LOCAL_DIR)/worker" "$(PLANTSTREAM_LOCAL_DIR)/demo" "$(PLANTSTREAM_LOCAL_DIR)/run"
