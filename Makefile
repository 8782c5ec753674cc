# Fresh machine: `make run` (the main job on the bundled example) and
# `make test` (the test suite) set everything up themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO_STATE ?= .lbc-demo

.PHONY: setup run test bench docs lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(STAMP)

# The main job: the example backends and lbc in front of them on
# examples/pool.yaml, in the foreground; Ctrl-C drains and stops everything.
run: setup
	$(BIN)/python examples/demo.py --state $(DEMO_STATE)

test: setup
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/config_speed.py

# Regenerate the README's config and CLI references (a test checks them).
docs: setup
	$(BIN)/python -m lbc.docgen --write README.md

lint: setup
	$(BIN)/pip install --quiet ruff
	$(BIN)/ruff check lbc workers tests bench

clean:
	rm -rf $(VENV) $(DEMO_STATE) build *.egg-info
