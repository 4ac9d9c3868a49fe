# The two commands of the quick start: `make demo` and `make test`.
# Both create the virtual environment on first use. torch is pinned in the same pip
# command as everything that depends on it (constraints.txt), so pip never replaces the
# CPU build with a multi-GB CUDA one.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check \
		-c constraints.txt "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/polytask compare configs/demo.yaml

# pytest-xdist: TEST_WORKERS processes with one torch thread each keep every core busy
# (single-threaded Python between the small tensor operations of most tests)
TEST_WORKERS ?= 2

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
