# `make demo` and `make test` do everything on a fresh machine: venv, install, data, run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data browser demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# pip byte-compiles what it installs (~45 s on 2 cores). Never --no-compile: where
	# PYTHONDONTWRITEBYTECODE is set (this VM, many CI images) no .pyc is ever written afterwards,
	# and every process (each Ray worker, each test subprocess) compiles torch, Ray and MLflow from
	# source: 29 against 11 s per import (benchmarks/import_cost.py).
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Fashion-MNIST from Debian's package where apt exists; elsewhere set data.root (see README).
data:
	@if [ -f $(FMNIST) ] || [ -n "$$CONMIM_FASHION_MNIST" ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q dataset-fashion-mnist); \
	else echo "Fashion-MNIST not found: set CONMIM_FASHION_MNIST or data.root (see README)"; fi

# Chromium for the MLflow UI's browser test (tests/test_mlflow_ui.py), from Debian's package like the data set.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get install -y -q chromium >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q chromium); \
	else echo "chromium not found: the browser test (tests/test_mlflow_ui.py) needs /usr/bin/chromium"; fi

# The ablation study's protocol on one seed (the full study, 5 seeds: README, "Sweeps").
demo: install data
	rm -rf runs/demo
	$(BIN)/conmim sweep sweeps/ablations.yaml --set seeds=[0] --set name=demo --set only=[scratch,no_stop_grad] --set selection=null \
	    --set storage=runs --set mlflow.tracking_uri=sqlite:///$(CURDIR)/runs/mlflow.db

# Two test processes (pytest-xdist), each test file on one of them: most of the suite waits on Ray
# and MLflow start-ups, so two overlap on 2 cores (14.7-17.3 min of tests instead of 18.6 serial, 2-core VM).
TEST_WORKERS ?= 2
test: install data browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The fast tier (<= 120 s): unit tests of every module, no Ray, no whole trial (tests/conftest.py).
# Two processes as well: 93.5 s against 141 s in one, back to back on the 2-core VM (2026-12-07).
test-fast: install data
	$(BIN)/python -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile --durations=10

bench: install data
	$(BIN)/python benchmarks/step.py

clean:
	rm -rf runs ray_results mlflow.db mlruns .pytest_cache
