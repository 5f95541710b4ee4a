# Two commands on a fresh machine: `make run` (the whole pipeline on embedded defaults) and `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
# CPU wheel of torch (no CUDA downloads). On a GPU machine: make install TORCH_SPEC="torch" (see README).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test test-fast test-flow test-services test-crash dvc-repro bench bench-serving clean-state

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

run: install
	$(VENV)/bin/langops run

# Test tiers (pytest markers, one per test; README "Tests"): unit, data, model, flow, services.
# Two pytest-xdist workers, a test file each at a time (module fixtures are built once): most tests wait on
# servers and subprocesses as much as they compute, so two at once finish in about 60% of the time on 2 cores.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# No server processes; under 3 minutes on 2 cores.
test-fast: install
	$(PY) -m pytest -m "unit or data or model"

# Real Prefect and MLflow stores: the whole pipeline, dvc repro, `langops run`.
test-flow: install
	$(PY) -m pytest -m flow

# PostgreSQL, Chromium and several processes: langops up, DDP, Dask sweeps, model servers.
test-services: install
	$(PY) -m pytest -m services

# `langops run` killed with SIGKILL at each crash point, then run again: nothing lost, nothing left behind.
test-crash: install
	$(PY) -m pytest -m crash

dvc-repro: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/dvc repro

bench: install
	$(PY) benchmarks/pipeline_sst2.py

bench-serving: install
	$(PY) benchmarks/serving.py

clean-state:
	-$(VENV)/bin/langops stop
	rm -rf .langops data/prepared models reports
