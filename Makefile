# The few verbs people type.  Every target sets up .venv itself first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# What `make run` needs: the package and its runtime dependencies only (no test/dev extras,
# no Playwright).  A full install (STAMP) includes it.
RUN_STAMP := $(VENV)/.run-installed

.PHONY: install run test test-redis-versions lint bench bench-quick bench-memory bench-sizing clean screenshots

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	touch $(STAMP) $(RUN_STAMP)

install: $(STAMP)

# The demo: gateway on :3000 plus the built-in mock upstream on :3001, one process.
# Uses $PROXY_ACCESS_KEY / $ADMIN_ACCESS_KEY when set, else makes them up and prints them.
# Runs on $(DATA_DIR)/channels.json, copied from channels.example.json the first time, so
# console edits (and their backups/) stay out of the repository; members and usage go to
# $(DATA_DIR)/ccx.db.  Other ports:
#   make run PORT=8080 MOCK_PORT=8081
DATA_DIR  ?= data
PORT      ?= 3000
MOCK_PORT ?= 3001
KEYGEN = $(BIN)/python -c 'import secrets, sys; print(sys.argv[1] + secrets.token_urlsafe(24))'
run: $(RUN_STAMP)
	@mkdir -p "$(DATA_DIR)"
	@test -f "$(DATA_DIR)/channels.json" || { cp channels.example.json "$(DATA_DIR)/channels.json" && \
		echo "created $(DATA_DIR)/channels.json from channels.example.json"; }
	DATA_DIR="$(DATA_DIR)" \
	PROXY_ACCESS_KEY="$${PROXY_ACCESS_KEY:-$$($(KEYGEN) ccx-)}" \
	ADMIN_ACCESS_KEY="$${ADMIN_ACCESS_KEY:-$$($(KEYGEN) admin-)}" \
		$(BIN)/ccx-proxy serve --with-mock-upstream --config "$(DATA_DIR)/channels.json" \
		--port $(PORT) --mock-port $(MOCK_PORT)

# Coverage is measured on every run: fail_under in pyproject.toml for the whole package,
# 90% for the upstream layer (src/ccx_proxy/upstream/).
test: $(STAMP)
	$(BIN)/python -m pytest -q --cov --cov-report=term
	$(BIN)/coverage report --include='*/ccx_proxy/upstream/*' --fail-under=90

# The Redis client code against the oldest redis-py that pyproject.toml allows and the last one
# before 8.1 (whose pool changed what it accepts): each installed beside .venv, put first on
# the path, and the connection, limits and health tests run on it (a real redis-server).
REDIS_PY_VERSIONS ?= 5.3.1 8.0.1
test-redis-versions: $(STAMP)
	@for v in $(REDIS_PY_VERSIONS); do \
		dir=$(VENV)/redis-py-$$v; \
		test -d $$dir || $(BIN)/python -m pip install -q --target $$dir "redis==$$v" || exit 1; \
		echo "redis-py $$v:"; \
		PYTHONPATH=$$dir $(BIN)/python -c "import redis, sys; sys.exit(redis.__version__ != '$$v')" || exit 1; \
		PYTHONPATH=$$dir $(BIN)/python -m pytest -q -p no:cacheprovider --no-cov \
			tests/shared/test_client.py tests/shared/test_limits.py tests/shared/test_health.py || exit 1; \
	done

# Re-take the admin console screenshots in docs/ (the browser test, kept images).
screenshots: $(STAMP)
	CCX_SCREENSHOT_DIR=docs $(BIN)/python -m pytest -q tests/test_admin_browser.py tests/test_admin_team_browser.py tests/test_admin_overview_browser.py

# Benchmarks: the gateway vs the same upstream direct, side by side (bench/run.py; the
# README's Performance section).  apt-get installs wrk when missing; the "bench" extra
# (matplotlib) draws the PNG and is optional.  Results: bench/results/.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]' || echo "matplotlib unavailable: the bench will skip its PNG"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Gateway RSS per idle connection / active stream / stalled stream, and drift per request,
# side by side with another tree: make bench-memory BENCH_ARGS="--baseline 3c70b95"
bench-memory: $(STAMP)
	$(BIN)/python bench/memory.py $(BENCH_ARGS)

# deploy/README.md's sizing note: one worker's RSS and CPU with N open streams (~1.5 minutes).
bench-sizing: $(STAMP)
	$(BIN)/python bench/sizing.py $(BENCH_ARGS)

# A few seconds, for CI: checks that the harness works, not how fast anything is.
bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick --no-install

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .coverage .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist src/*.egg-info
