# plantstream — the two commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: setup test test-unit test-integration test-e2e demo bench lint format typecheck services-up services-down services-status clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,opcua,bacnet,influx]'
	@rm -f $(VENV)/.installed-*; touch $@

## setup: virtualenv with the package and its tools; Debian packages and Kafka jars for the local services
setup: $(STAMP)
	$(PY) -c 'from pipeline import services; services.install()'

## services-up / services-down / services-status: the local Kafka, PostgreSQL, Mosquitto, InfluxDB
services-up: setup
	$(VENV)/bin/plantstream services up

services-down:
	$(VENV)/bin/plantstream services down

services-status:
	$(VENV)/bin/plantstream services status

## test: everything — unit, integration (real services), end to end
test: services-up
	$(PY) -m pytest tests/unit tests/integration tests/e2e -q -p no:cacheprovider $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q $(PYTEST_ARGS)

test-integration: services-up
	$(PY) -m pytest tests/integration -q $(PYTEST_ARGS)

test-e2e: services-up
	$(PY) -m pytest tests/e2e -q $(PYTEST_ARGS)

## demo: services, the demo topology, simulator + connector + worker, and a live table of aggregates
demo: services-up
	$(VENV)/bin/plantstream demo topologies/demo.yaml

## bench: throughput and latency on this machine (results in bench/results/)
bench: services-up
	$(PY) -m bench.run $(BENCH_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline connectors tests bench
	$(VENV)/bin/ruff format --check pipeline connectors tests bench
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff format pipeline connectors tests bench
	$(VENV)/bin/ruff check --fix pipeline connectors tests bench

clean:
	rm -rf .local/worker .local/demo .local/run
