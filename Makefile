# The two commands of the README: `make run` (main job) and `make test` (test suite).
# Both set everything up first on a fresh Linux machine (Python 3.11, apt for the
# football engine's system packages; sudo is used when not root).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.marl-shared-installed

.PHONY: setup run test test-slow doctor clean

setup: $(STAMP)

$(STAMP): pyproject.toml envs/install_grf.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	PYTHON=$(BIN)/python bash envs/install_grf.sh
	touch $(STAMP)

run: setup
	$(BIN)/marl-shared train $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: setup
	$(BIN)/python -m pytest -q -m slow $(ARGS)

doctor: setup
	$(BIN)/marl-shared doctor

clean:
	rm -rf $(VENV) .pytest_cache
