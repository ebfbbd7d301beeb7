# lpcompile — set up, run the demo, run the tests. `make help` lists targets.
PY ?= python3
PIP = $(PY) -m pip

.PHONY: help install install-dev demo test test-all lint wheel-check bench-smoke examples

help:
	@echo "make demo       install and compile the embedded digits model at 4.5 bits"
	@echo "make test       install dev dependencies and run the test suite (CI runs this)"
	@echo "make test-all   also run the slow model tests (-m slow)"
	@echo "make lint       ruff check"

install:
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e .

install-dev: install
	$(PIP) install -q -e '.[dev,tvm,view,mlir,ray]'

demo: install
	lpcompile demo

test: install-dev
	$(PY) -m pytest -q

test-all: install-dev
	$(PY) -m pytest -q -m "slow or not slow"

lint:
	ruff check .
	$(PY) .ci/check_imports.py

wheel-check:
	.ci/wheel_check.sh

examples:
	$(PY) examples/build_digits.py --out examples/models
