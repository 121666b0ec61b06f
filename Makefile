# slimkit: two commands on a fresh machine with Python and make.
#   make demo   - create .venv, install pinned torch/torchvision + slimkit with extras, run the demo
#   make test   - same install, run the test suite (slow end-to-end tests: make test-slow)
# The torch/torchvision pins live in constraints.txt, the only place they are written.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.slimkit-installed

.PHONY: install demo test test-slow test-docs lint bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt torch torchvision
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/slimkit demo

test: install
	$(BIN)/python -m pytest -q -n 2

test-slow: install
	$(BIN)/python -m pytest -q -m slow

test-docs: install
	$(BIN)/python -m pytest -q -m docs tests/docs

lint: install
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/bandit -q -r src

bench: install
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .slimkit-cache
