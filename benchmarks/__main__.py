"""Run the benchmarks: ``python -m benchmarks [NAME ...]`` prints one JSON object on stdout.

Each benchmark is a module of this package with ``run(redis_url: str) -> dict``; its result
appears under its name (``{"decisions": {...}, ...}``). Progress goes to stderr. The Redis
server comes from ``--redis-url`` or ``$REDIS_URL`` (``make bench`` starts a throwaway one);
benchmarks may flush its database.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import benchmarks

from ._common import log

# Run order when no names are given; modules found in the package but not listed here run
# after these, in alphabetical order. A module is a benchmark if it defines ``run``.
ORDER = (
    "decisions",
    "fairness",
    "concurrency",
    "celery",
    "celery_throughput",
    "rq",
    "rq_throughput",
    "worker_fairness",
    "shards",
)

# Run only when named (``make soak``): minutes long, and not a benchmark of speed.
ON_REQUEST = ("soak",)

Runner = Callable[[str], dict[str, Any]]


def discover() -> dict[str, str]:
    """Benchmark names -> module names (modules of this package not starting with ``_``)."""
    found = sorted(
        m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_")
    )
    ordered = [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]
    return {name: f"benchmarks.{name}" for name in ordered}


def load(module_name: str) -> Runner | None:
    module = importlib.import_module(module_name)
    runner = getattr(module, "run", None)
    return runner if callable(runner) else None


def main(argv: list[str] | None = None) -> int:
    available = discover()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run queue-ratelimit benchmarks; one JSON object on stdout.",
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all of {list(available)} but {list(ON_REQUEST)})",
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL"), help="default: $REDIS_URL"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help="timed seconds per measurement (sets QRL_BENCH_SECONDS; each benchmark has a default)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="rounds of measurements (sets QRL_BENCH_ROUNDS; each benchmark has a default)",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--indent", type=int, default=2, help="JSON indentation (0: one line)")
    args = parser.parse_args(argv)

    if args.list:
        print("\n".join(available))
        return 0
    unknown = [n for n in args.names if n not in available]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {list(available)}")
    if not args.redis_url:
        parser.error("no Redis: pass --redis-url or set REDIS_URL (make bench starts a server)")
    if args.seconds is not None:
        os.environ["QRL_BENCH_SECONDS"] = str(args.seconds)
    if args.rounds is not None:
        os.environ["QRL_BENCH_ROUNDS"] = str(args.rounds)

    results: dict[str, Any] = {}
    failed = False
    for name in args.names or [n for n in available if n not in ON_REQUEST]:
        runner = load(available[name])
        if runner is None:
            if name in args.names:
                parser.error(f"benchmarks.{name} has no run(redis_url) function")
            continue
        log(f"== {name}")
        started = time.perf_counter()
        try:
            results[name] = runner(args.redis_url)
        except Exception as exc:  # one broken benchmark must not lose the others' results
            traceback.print_exc(file=sys.stderr)
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed = True
        log(f"== {name} done in {time.perf_counter() - started:.1f} s")

    json.dump(results, sys.stdout, indent=args.indent or None)
    sys.stdout.write("\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
