# Development entry points. Each target creates the virtual environment on first use.
#   make demo    run the main job (a Calibri calibration of the shipped toy DiT; writes runs/demo)
#   make test    run the test suite
#   make bench   run the committed benchmarks
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned so pip takes the CPU build; an open range pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: venv demo test test-all bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

demo: venv
	$(VENV)/bin/calibri run examples/toy.yaml -o runs/demo --overwrite

test: venv
	$(PY) -m pytest -q

test-all: venv
	$(PY) -m pytest -q -m "slow or not slow"

bench: venv
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/dit_overhead.py
	$(PY) benchmarks/calibri_vs_naive.py
	$(PY) benchmarks/rewards_throughput.py
	$(PY) benchmarks/reward_server_overhead.py
	$(PY) benchmarks/cma_wrapping_parity.py

clean:
	rm -rf runs .pytest_cache
