# The two commands: `make bench` (the main job) and `make test`. Each does its own set-up on a
# fresh machine: a .venv that reuses an installed torch (--system-site-packages, so a GPU
# machine's CUDA torch is kept) or installs the CPU build torch==2.13.0, then the package with
# its C++ extension. OFFLINE=1 installs without resolving dependencies (machines without a network).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsemem-installed
OFFLINE ?= 0
PIP_DEPS := $(if $(filter 1,$(OFFLINE)),--no-deps,)
# Only what the compiled extension is built from: Python (kernels/ included) is installed editable.
SOURCES := pyproject.toml setup.py $(shell find csrc -type f 2>/dev/null)

.PHONY: setup test bench bench-ops lint format clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -c "import setuptools, wheel, ninja" 2>/dev/null || $(PY) -m pip install setuptools wheel ninja
	$(PY) -m pip install $(PIP_DEPS) --no-build-isolation -e '.[test]'
	$(PY) -c "import sparsemem; sparsemem.backends()"
	touch $@

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# Triton kernels run on the CPU through the interpreter in tests; pytest exits 5 when it
# collects nothing, which fails this target like any other failure.
test: lint
	TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_ARGS)

# The scaling profiler (bench/scaling.py): BENCH_ARGS="--full" or "--device cuda" pass through.
bench: $(STAMP)
	$(PY) -m bench.scaling $(BENCH_ARGS)

bench-ops: $(STAMP)
	$(PY) -m bench.ops.bench_ops

clean:
	rm -rf $(VENV) build *.egg-info sparsemem/_C*.so
