# Two commands do all the set-up on a fresh machine: `make train` and `make test`.
# Both create .venv when it is missing and install the project into it; a second run skips that.
PYTHON ?= python3
VENV ?= .venv
# The CPU machines this project is developed on keep a CPU build of torch 2.13.0 on disk; on a GPU
# machine set TORCH_SPEC to the CUDA build you want (or "torch" to keep an installed one).
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test lint clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/fsa-train fit --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q --durations=15 tests  # the slowest tests: CI has 10 minutes

lint: $(STAMP)
	$(PY) -m ruff check fsa_train tests benchmarks

clean-venv:
	rm -rf $(VENV)
