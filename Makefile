# streamd: `make run` and `make test` are the whole set-up on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= ./data
LISTEN ?= 127.0.0.1:50051

.PHONY: install run test test-fast check bench proto clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/streamd serve --data-dir $(DATA_DIR) --listen $(LISTEN)

# Everything; the 20 slowest tests are listed so a slow one is seen when it creeps in.
test: install
	$(BIN)/python -m pytest -q --durations=20

# The inner loop: unit and property tests only (no servers, no sleeps), on every core.
test-fast: install
	$(BIN)/python -m pytest -q -n auto tests/unit tests/property

# Lint and types: ruff over the tree, mypy as [tool.mypy] in pyproject.toml says.
check: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench

# Regenerate the committed stubs from proto/ (tests/unit/test_generated.py checks for drift).
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/streamd/v1/streamd.proto
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. streamd/wire.proto

clean:
	rm -rf $(VENV) build *.egg-info
