# make train : set up .venv, train the default model (digits, small CNN, CPU), evaluate it
# make test  : set up .venv, run the test suite (the slow tests too when CI=true)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: setup train eval test test-slow lint benchmarks clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

train: setup
	$(BIN)/cycleml train
	$(BIN)/cycleml eval ckpt_path=$$(ls -td logs/train/runs/*/ | head -n 1)

test: setup
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/run_tests.sh

test-slow: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -m slow

lint: setup
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff format --check src tests scripts benchmarks

benchmarks: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf logs outputs multirun .pytest_cache
