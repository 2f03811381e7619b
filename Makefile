# infinitetalkd — the two everyday commands are `make run` and `make test`.
#
# TORCH: the torch requirement installed before everything else. torch==2.13.0 is a CPU build on
# machines that ship it locally (CI) and the regular CUDA build from PyPI elsewhere. If the venv
# already has a torch (for example your own CUDA build), it is left alone.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
CONFIG ?= config.yaml
BIN     = $(VENV)/bin

.PHONY: venv run test lint readme demo clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.installed

## make run: start the daemon on ./inbox -> ./outbox with config.yaml. When infinitetalkd exits non-zero
## (78: bad config or missing models), make reports "Error 78" and exits 2 itself.
run: venv
	$(BIN)/infinitetalkd run --config $(CONFIG)

## make test: the whole test suite (CPU only, tiny random models)
test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy daemon engine/api.py engine/recipes.py engine/settings.py engine/schema.py

## make readme: regenerate README.md's configuration, sidecar and exit-code tables from the schema
readme: venv
	$(BIN)/python -m daemon.readme README.md

## make demo: the real daemon on a generated tiny models folder and a bundled sample.
## Tiny random weights make noise, not a face: this proves the plumbing, not the model.
demo: venv
	$(BIN)/python -m daemon.demo --workdir demo
