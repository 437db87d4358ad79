# The two commands of the README: `make demo` and `make test`.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test bench lint services clean-venv

# The virtualenv, created once with the system Python.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installs are redone only when the dependencies change; -q keeps them quiet,
# errors are still printed and stop make.
$(VENV)/.installed-run: $(BIN)/python pyproject.toml requirements.lock
	$(PIP) -c requirements.lock -e .
	@touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml requirements.lock
	$(PIP) -c requirements.lock -e '.[test]'
	@touch $@ $(VENV)/.installed-run

## demo: the main job end to end on the embedded default (no servers needed)
demo: $(VENV)/.installed-run
	$(BIN)/progress-reset demo

## test: install, check the layout's dependency rule (lint), make sure PostgreSQL, Redis and RabbitMQ answer, run the tests
test: lint
	$(BIN)/python -m tests.services
	$(BIN)/python -m pytest -q

## services: only make sure PostgreSQL, Redis and RabbitMQ answer (starting or installing them)
services: $(VENV)/.installed-test
	$(BIN)/python -m tests.services

## bench: the benchmark (PostgreSQL + Redis)
bench: $(VENV)/.installed-test
	$(BIN)/python -m tests.services
	$(BIN)/python -m bench

## lint: byte-compile everything, then check the dependency direction (import-linter contracts in pyproject.toml)
lint: $(VENV)/.installed-test
	$(BIN)/python -m compileall -q models tasks workers producer tests bench
	$(BIN)/lint-imports

clean-venv:
	rm -rf $(VENV)
