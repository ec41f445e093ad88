# Everything goes through a project-local virtualenv built from constraints.txt (the versions CI
# was green with). `make test` and `make sweep` set it up on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast sweep benchmarks clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch and torchvision from the registry as a matching pair (their default builds run on CPU).
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

sweep: setup
	$(BIN)/python -m orchestrator run sweeps/component_ablation.yaml

benchmarks: setup
	$(BIN)/python benchmarks/model_overhead.py --scale small --batch-size 8

clean-venv:
	rm -rf $(VENV)
