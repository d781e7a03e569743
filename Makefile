# One command each, on a fresh machine: `make demo` (the main job) and `make test`.
# Both set up their own virtual environment: the CPU build of torch first, then sdlite.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: venv demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/sdlite demo --out runs/demo

# Tests run one intra-op thread each (tests/conftest.py), so one pytest-xdist worker per core; each
# file stays on one worker, so a module's fixtures (a trained base model) are built once.
test: venv
	$(BIN)/python -m pytest -q -n auto --dist loadfile

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf runs .pytest_cache
