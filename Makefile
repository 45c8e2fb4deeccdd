# Every target installs what it needs into .venv, so a fresh clone needs only Python 3.11+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CHECKSUM := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(CHECKSUM)
# The demo needs the package and the embedded engine only (fakeredis + lupa), not the
# whole dev toolchain: a venv that has the dev extra already serves it as it is.
DEMO_STAMP := $(VENV)/.demo-$(CHECKSUM)

.PHONY: help install demo test faults lint typecheck bench soak rq-suite celery-suite wheel-check clean screenshot

help:
	@echo "make demo   - run the multi-tenant demo (embedded engine unless REDIS_URL is set)"
	@echo "make test   - lint, type-check and run the whole test suite against a real Redis"
	@echo "make bench  - run the benchmarks (JSON on stdout, see docs/benchmarks.md)"
	@echo "make soak   - patterned load through real workers for SOAK_SECONDS (default 600; docs/reliability.md)"
	@echo "make faults - the fault scenarios through real workers (about 3.5 minutes; not in make test)"
	@echo "make rq-suite - RQ's own test suite, stock and with our classes (README, RQ)"
	@echo "make screenshot - redraw docs/top.svg, the top dashboard at 80x24 (no Redis needed)"
	@echo "make celery-suite - Celery's canvas and task integration tests, stock and with the"
	@echo "                plugin under a binding limit (README, Celery; about 20 minutes)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -e $(STAMP) || $(PY) -m pip install --quiet -e '.[embedded]'
	rm -f $(VENV)/.demo-*
	touch $@

demo: $(DEMO_STAMP)
	$(VENV)/bin/queue-ratelimit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check queue_ratelimit tests benchmarks examples
	$(VENV)/bin/ruff format --check queue_ratelimit tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The short soak (tests/test_soak.py, 45 s of load) and the fault scenarios (`make faults`,
# about 2 minutes) stay out of `make test` to keep CI within its 15 minutes: `make soak`
# runs the long soak, PYTEST_ARGS="-m soak" the short one (a later -m replaces the first).
# tests/run_with_redis.sh reuses $REDIS_URL or a server on 127.0.0.1:6379, else starts a
# throwaway redis-server on a free loopback port for the run.
test: lint typecheck
	tests/run_with_redis.sh $(PY) -m pytest -m "not soak and not faults" $(PYTEST_ARGS)

# The fault scenarios through real workers (tests/test_faults.py: SIGSTOP, restarts,
# CLIENT KILL, FUNCTION FLUSH, a killed worker; and one broker's variant of three Celery
# scenarios that make test runs on the other: tests/test_celery_e2e.py,
# FAULTS_ON_ONE_BROKER; about 3.5 minutes; docs/reliability.md).
faults: $(STAMP)
	tests/run_with_redis.sh $(PY) -m pytest -m faults $(PYTEST_ARGS)

# `top` at 80x24 on the embedded engine, as shown in the README.
screenshot: $(STAMP)
	$(PY) -m queue_ratelimit.tui --screenshot docs/top.svg

bench: $(STAMP)
	tests/run_with_redis.sh $(PY) -m benchmarks

# Patterned load through real Celery and RQ workers (benchmarks/soak.py; SOAK_* settings).
# The limiter gets a redis-server of the soak's own; records and the broker the throwaway one.
soak: $(STAMP)
	tests/run_with_redis.sh $(PY) -m benchmarks soak

# RQ's own tests (the installed version's, from PyPI) stock and with queue_ratelimit.rq's
# classes in place of RQ's; fails if a test passing stock fails swapped. Each run gets a
# private Redis on its own localhost (Linux namespaces); see tests/rq_suite/run.py.
rq-suite: $(STAMP)
	$(PY) tests/rq_suite/run.py $(RQ_SUITE_ARGS)

celery-suite: $(STAMP)
	$(PY) tests/celery_suite/run.py $(CELERY_SUITE_ARGS)

clean:
	rm -rf $(VENV) dist build .pytest_cache .mypy_cache .ruff_cache .rq-suite .celery-suite
