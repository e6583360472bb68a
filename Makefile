# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create ./.venv on first use (CPU jax; torch only for conversion and parity tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-all clean

$(STAMP): requirements.txt requirements-dev.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

setup: $(STAMP)

# The main job on the built-in default: a small MVAR training run on the built-in
# dataset (generated locally, no download), then a sample grid from the exported model.
# Running it again resumes the run (or reports it complete) instead of restarting.
DEMO_DIR ?= demo_out
demo: $(STAMP)
	$(PY) train.py --config configs/tiny_cpu.py --workdir $(DEMO_DIR)
	$(PY) sample.py --checkpoint $(DEMO_DIR)/model --labels 0,1,2,3,4,5,6,7,8,9 \
	    --num_per_class 2 --cfg 1.5 --seed 0 --out $(DEMO_DIR)/samples.png

# The CPU test suite (what CI runs); slow tests are opt-in with `make test-all`.
test: $(STAMP)
	$(PY) -m pytest -q tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests --runslow

clean:
	rm -rf $(VENV) demo_out .pytest_cache
