# gmflow developer commands. `make toy` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast test-kernels lint toy bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip -c constraints.txt 2>/dev/null || true
	$(BIN)/python -m pip install -q -e '.[dev]' -c constraints.txt
	touch $(STAMP)

# The whole suite: everything, then the numba.cuda kernel tests in their own process under the
# CUDA simulator (NUMBA_ENABLE_CUDASIM must be set before numba is first imported).
test: setup
	$(BIN)/python -m pytest -m "not cudasim and not network" $(PYTEST_ARGS)
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -m "cudasim" $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not cudasim and not network and not slow" $(PYTEST_ARGS)

test-kernels: setup
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/python -m pytest -m "cudasim" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check gmflow gmflow_cli tests benchmarks
	$(BIN)/ruff format --check gmflow gmflow_cli tests benchmarks

toy: setup
	$(BIN)/gmflow toy

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
