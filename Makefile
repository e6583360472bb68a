# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create ./.venv on first use (CPU jax; torch only for conversion and parity tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo lint test test-all gpu-wheels clean

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The main job on the built-in default (no download): build the built-in dataset, train
# the tiny tokenizer, cache its tokens, train an MVAR on them, draw a labelled sample grid
# and measure the samples (mvar_jax/demo.py). Running it again resumes where it stopped
# (or reports the demo complete).
DEMO_DIR ?= demo_out
demo: $(STAMP)
	$(PY) -m mvar_jax.demo --out $(DEMO_DIR)

# The CPU test suite (what CI runs): lint and format checks, then the tests on two
# workers; slow tests are opt-in with `make test-all`.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q -n 2 --durations=25 tests

test-all: lint
	$(PY) -m pytest -q -n 2 tests --runslow

# The wheels the GPU machine's image lacks, for `bash bench/gpu.sh` there (docs/benchmarks.md):
# the device call carries .whl. ml_collections (pure Python; configs/common.py, the train-step
# and cost benches) is all the benchmarks import beyond that image, whose absl-py and PyYAML it
# needs; setuptools builds the editable install of mvar_jax there, offline. Exact versions, one
# of each (pip refuses two); the platform flags match the machine's x86_64 Python 3.12.
GPU_WHEELS := ml-collections==1.1.0 setuptools==80.9.0
GPU_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
gpu-wheels:
	rm -rf .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_PLATFORMS)) -d .whl $(GPU_WHEELS)
	du -sh .whl && ls .whl

clean:
	rm -rf $(VENV) demo_out .pytest_cache
