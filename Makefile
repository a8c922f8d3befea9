# geodino: `make demo` sets up .venv (first run only) and runs the built-in demo; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup demo test lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --retries 10 --upgrade pip
	# the CUDA wheels are large: resume an interrupted download instead of failing the install
	$(BIN)/python -m pip install --retries 10 --resume-retries 20 -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/geodino demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) geodino-out .pytest_cache .ruff_cache
