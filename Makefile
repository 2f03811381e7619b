# infinitetalkd — the two everyday commands are `make run` and `make test`.
#
# TORCH: the torch requirement installed before everything else. torch==2.13.0 is a CPU build on
# machines that ship it locally (CI) and the regular CUDA build from PyPI elsewhere. If the venv
# already has a torch (for example your own CUDA build), it is left alone.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
CONFIG ?= config.yaml
DEMO   ?= demo
BIN     = $(VENV)/bin

.PHONY: venv run web test lint readme demo clean-demo bench

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

## make web: the web page and HTTP API on http://127.0.0.1:8787/ (config.yaml's web: section; no GPU)
web: venv
	$(BIN)/infinitetalkd web --config $(CONFIG)

## make test: the whole test suite (CPU only, tiny random models)
test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy daemon engine/api.py engine/recipes.py engine/settings.py engine/schema.py engine/sniff.py

## make readme: regenerate README.md's configuration, sidecar and exit-code tables from the schema
readme: venv
	$(BIN)/python -m daemon.readme README.md

## make bench: the benchmark suite on whatever this machine has (a GPU with >= 48 GiB: the released sizes;
## anything else: the tiny sizes, a smoke test), one table at the end; results in .bench/out/suite.json.
## BENCH_ARGS="--render" adds the whole-engine render at full size (writes a 36 GB models folder first).
BENCH_ARGS ?=
bench: venv
	$(BIN)/python -m bench $(BENCH_ARGS)

## make demo: the real daemon on a generated tiny models folder and a bundled sample.
## Tiny random weights make noise, not a face: this proves the plumbing, not the model.
## Each run drops a new job (fresh seed), so running it again renders again.
demo: venv
	$(BIN)/python -m daemon.demo --workdir $(DEMO)

## make clean-demo: remove everything make demo wrote (models, config, inbox, outbox, state)
clean-demo:
	rm -rf -- "$(DEMO)"
