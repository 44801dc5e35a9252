# streampipe: two commands do all the set-up on a fresh Debian/Ubuntu machine.
#   make demo   installs what is missing (Mosquitto included) and runs the demo
#   make test   installs the test extras and runs the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast deps install install-test lint clean

deps:
	./scripts/install-deps.sh

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: deps $(BIN)/python
	$(BIN)/pip install -q -e .

install-test: deps $(BIN)/python
	$(BIN)/pip install -q -e '.[test]'

demo: install
	$(BIN)/streampipe demo

test: install-test
	$(BIN)/python -m pytest

test-fast: install-test
	$(BIN)/python -m pytest -m 'not slow'

lint: install-test
	$(BIN)/ruff check streampipe tests benchmarks
	$(BIN)/ruff format --check streampipe tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
