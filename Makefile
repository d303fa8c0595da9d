# The README's two commands: `make run` and `make test`. Both install into .venv first if needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Throwaway values for local work only; production reads real ones from the environment.
LOCAL_ENV := DJANGO_DEBUG=1 DJANGO_SECRET_KEY=local-dev-only-not-secret-0123456789abcdefghijklmnop
TEST_ENV := DJANGO_SECRET_KEY=test-only-not-secret-0123456789abcdefghijklmnopqrstuvwxyz

.PHONY: install run test lint fmt migrate bench reliability launch clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

migrate: install
	$(LOCAL_ENV) $(PY) manage.py migrate --no-input

## make run: migrate, create the demo logins, start the whole local pipeline on http://127.0.0.1:8000
run: install
	@mkdir -p var
	@# A stack already running (its pid file in var/, or its ports taken): say so, touch nothing.
	@$(LOCAL_ENV) $(PY) manage.py run_local_stack --check
	$(LOCAL_ENV) $(PY) manage.py migrate --no-input
	$(LOCAL_ENV) $(PY) manage.py seed_demo
	$(LOCAL_ENV) $(PY) manage.py setup_stripe_webhook
	$(LOCAL_ENV) $(PY) manage.py run_local_stack

## make lint: ruff, then mypy (strict; settings are imported by the Django plugin, so it needs the test env)
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(TEST_ENV) $(PY) -m mypy

fmt: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

## make test: lint, check that models and migrations agree, run the suite. On PostgreSQL whenever
## one answers: DATABASE_URL if set, else postgres://postgres@127.0.0.1:5432/agent_provisioning_test
## (created if missing); SQLite only when none answers (the last line then says what was skipped).
test: install lint
	@mkdir -p var
	@url="$$($(PY) tests/database.py)" || exit 1; \
	if [ -n "$$url" ]; then export DATABASE_URL="$$url"; else unset DATABASE_URL; fi; \
	set -x; \
	$(TEST_ENV) $(PY) manage.py makemigrations --check --dry-run && \
	$(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

## make bench: every path against its ceiling in one run (PostgreSQL at 127.0.0.1:5432); writes bench/RESULTS.md
BENCH_DEPS := 'procrastinate>=3,<4' 'schemathesis>=4,<5'
bench: install
	$(PY) -m pip install -q $(BENCH_DEPS)
	$(TEST_ENV) $(PY) bench/run.py $(BENCH_ARGS)

## make reliability: storms, kills and restarts against the real stack (PostgreSQL; DATABASE_URL defaults to a local one)
reliability: install
	$(PY) -m pip install -q $(BENCH_DEPS)
	DATABASE_URL="$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/agent_provisioning_reliability}" \
	  $(TEST_ENV) $(PY) -m pytest -p no:randomly -p no:cacheprovider --timeout 900 --durations=0 bench/reliability $(PYTEST_ARGS)

## make launch: launch day simulated (1,000 orders, 20 runner slots, GitHub and Hetzner budgets) against
## the real server and workers on PostgreSQL; prints one table. Its own database, dropped and recreated:
## LAUNCH_DATABASE_URL (default below). LAUNCH_ARGS: e.g. --factor 40 --orders 1000 --record
launch: install
	LAUNCH_DATABASE_URL="$${LAUNCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/agent_provisioning_launch}" \
	  $(TEST_ENV) $(PY) -m bench.launch $(LAUNCH_ARGS)

clean:
	rm -rf var/db.sqlite3* var/runner-logs
