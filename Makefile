# Developer entry points. `make run` and `make test` work on a fresh machine with Python 3.11+.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install run test lint clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is required; set PYTHON=python3.11 (or newer).")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

## run: start every process locally (embedded Redis unless REDIS_URL is set) until Ctrl-C
run: install
	$(BIN)/ztcqrs up

## test: every test, against real Redis, SQLite and uvicorn processes the tests start themselves
test: install
	$(BIN)/pytest $(PYTEST_ARGS)

## lint: ruff and mypy (strict) over the services and tests
lint: install
	$(BIN)/ruff check services tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
