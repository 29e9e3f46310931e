# PulmoMed Edge — two commands do all the set-up on a fresh machine:
#   make run    set up, fetch + verify the default models, build the index if stale, serve
#   make test   set up, fetch + verify the test models, lint, run the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test setup models models-test index lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# reinstall only when the dependency pins change
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

models: setup
	$(BIN)/pulmomed-edge models fetch

models-test: setup
	$(BIN)/pulmomed-edge models fetch --test

index: models
	$(BIN)/pulmomed-edge index build --if-stale

run: index
	$(BIN)/pulmomed-edge serve

lint: setup
	$(BIN)/ruff check pulmomed_edge tests
	$(BIN)/ruff format --check pulmomed_edge tests

format: setup
	$(BIN)/ruff format pulmomed_edge tests
	$(BIN)/ruff check --fix pulmomed_edge tests

test: models-test lint
	$(BIN)/python -m pytest

bench: index
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/pulmomed-edge bench --spawn --baseline --ceiling --stream --json bench-results/latest.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
