# Development entry points. Each target creates its virtual environment on first use.
#   make demo         run the main job (a Calibri calibration of the shipped toy DiT; writes runs/demo)
#   make test         run the test suite on the locked versions (requirements/constraints.txt; what CI runs)
#   make test-latest  the suite on the newest versions pyproject.toml allows (.venv-latest)
#   make test-oldest  the suite on the oldest versions it claims (requirements/oldest.txt; .venv-oldest)
#   make lock         re-resolve requirements/constraints.txt to the newest allowed versions
#   make bench        run the committed benchmarks
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= requirements/constraints.txt
# torch is pinned so pip takes the CPU build; an open range pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: venv demo test test-all test-latest test-oldest lock bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade -c $(CONSTRAINTS) pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) "$(TORCH)"
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $@

demo: venv
	$(VENV)/bin/calibri run examples/toy.yaml -o runs/demo --overwrite

test: venv
	$(PY) -m pytest -q

test-all: venv
	$(PY) -m pytest -q -m "slow or not slow"

# The newest versions the ranges allow (torch stays on the CPU build).
.venv-latest/.installed: pyproject.toml
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet "$(TORCH)"
	.venv-latest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[test]"
	touch $@

test-latest: .venv-latest/.installed
	.venv-latest/bin/python -m pytest -q

lock: .venv-latest/.installed
	.venv-latest/bin/python -m pip freeze --all --exclude-editable \
	  | grep -v -e '^torch==' -e '^setuptools==' -e '^wheel==' > $(CONSTRAINTS).new
	echo "$(TORCH)" >> $(CONSTRAINTS).new
	{ grep '^#' $(CONSTRAINTS); sort -f $(CONSTRAINTS).new; } > $(CONSTRAINTS).tmp
	mv $(CONSTRAINTS).tmp $(CONSTRAINTS) && rm $(CONSTRAINTS).new
	@echo "updated $(CONSTRAINTS): run 'make test' and commit it"

# The floors pyproject.toml claims (diffusers, transformers, ...), the rest resolved.
.venv-oldest/.installed: pyproject.toml requirements/oldest.txt
	rm -rf .venv-oldest
	$(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install --quiet --upgrade pip
	.venv-oldest/bin/python -m pip install --quiet -c requirements/oldest.txt "$(TORCH)"
	.venv-oldest/bin/python -m pip install --quiet -c requirements/oldest.txt -e ".[test]"
	touch $@

test-oldest: .venv-oldest/.installed
	.venv-oldest/bin/python -m pytest -q

bench: venv
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/dit_overhead.py
	$(PY) benchmarks/calibri_vs_naive.py
	$(PY) benchmarks/rewards_throughput.py
	$(PY) benchmarks/reward_server_overhead.py
	$(PY) benchmarks/cma_wrapping_parity.py
	$(PY) benchmarks/dask_executor.py

clean:
	rm -rf runs .pytest_cache
