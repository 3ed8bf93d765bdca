# One command for every chore, the same on a developer's machine and in CI.
#   make demo   - set up a virtual environment and run the live demo (embedded broker + SQLite, no servers)
#   make test   - set up the virtual environment and run the tests
#   make bench  - the benchmarks (see README)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/goldenhour demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/goldenhour bench codec

clean:
	rm -rf $(VENV) var artifacts .pytest_cache
