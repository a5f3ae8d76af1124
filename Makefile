# Every target sets itself up: a venv at .venv with everything installed, re-done only when
# pyproject.toml or requirements-nodeps.txt change (the stamp records their hash).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements-nodeps.txt | sha256sum | cut -c1-16)
RUN ?= runs/demo

.PHONY: setup demo test test-all bench lint clean-venv

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

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	for f in bench/*.py; do $(BIN)/python $$f || exit 1; done

lint: setup
	$(BIN)/ruff check src tests bench

clean-venv:
	rm -rf $(VENV)
