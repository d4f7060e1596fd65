# Two commands for a fresh machine (see README):
#   make demo   - create .venv if needed, install everything, run the demo
#   make test   - create .venv if needed, install everything, run the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast clean-venv

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) examples/demo.py

# Whole suite, slow end-to-end engine tests included (this is what CI runs).
test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Pure tests only (no vLLM engine start-up).
test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
