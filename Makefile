# Every target installs what it needs into .venv, so a fresh clone needs only Python 3.11+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: help install demo test lint typecheck bench soak rq-suite wheel-check clean

help:
	@echo "make demo   - run the multi-tenant demo (embedded engine unless REDIS_URL is set)"
	@echo "make test   - lint, type-check and run the whole test suite against a real Redis"
	@echo "make bench  - run the benchmarks (JSON on stdout, see docs/benchmarks.md)"
	@echo "make soak   - patterned load through real workers for SOAK_SECONDS (default 600; docs/reliability.md)"
	@echo "make rq-suite - RQ's own test suite, stock and with our classes (README, RQ)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/queue-ratelimit demo

lint: $(STAMP)
	$(VENV)/bin/ruff check queue_ratelimit tests benchmarks examples
	$(VENV)/bin/ruff format --check queue_ratelimit tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# tests/run_with_redis.sh reuses $REDIS_URL or a server on 127.0.0.1:6379, else starts a
# throwaway redis-server on a free loopback port for the run.
test: lint typecheck
	tests/run_with_redis.sh $(PY) -m pytest $(PYTEST_ARGS)

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

clean:
	rm -rf $(VENV) dist build .pytest_cache .mypy_cache .ruff_cache .rq-suite
