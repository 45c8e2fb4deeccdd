"""Benchmarks for queue-ratelimit, run with ``python -m benchmarks`` (or ``make bench``).

Every benchmark is a module of this package exposing ``run(redis_url: str) -> dict``; the
runner (``benchmarks.__main__``) collects their results into one JSON object on stdout and
writes progress to stderr. See ``docs/benchmarks.md`` for the figures and how to read them.
"""
