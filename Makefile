# streampipe: two commands do all the set-up on a fresh Debian/Ubuntu machine.
#   make demo   installs what the demo needs if missing (Mosquitto, .venv) and runs it
#   make test   also installs what the tests need (Prometheus, Mosquitto's clients and
#               the test extras) and runs the tests
# Each installs only what is missing: pip runs again only when pyproject.toml changed
# or .venv is new (a stamp file in .venv records the last install).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast deps deps-demo deps-test install install-test lint clean

deps: deps-test

deps-demo:
	@./scripts/install-deps.sh --for demo

deps-test:
	@./scripts/install-deps.sh --for test

$(VENV)/pyvenv.cfg:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(VENV)/pyvenv.cfg
	$(BIN)/pip install -q -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/pyvenv.cfg
	$(BIN)/pip install -q -e '.[test]'
	@touch $@ $(VENV)/.installed

install: deps-demo $(VENV)/.installed

install-test: deps-test $(VENV)/.installed-test

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
