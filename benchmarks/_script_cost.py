"""Where the server time of one ``acquire`` goes; a tool for working on the Lua scripts.

    python -m benchmarks._script_cost [--buckets ALT_BUCKETS.lua ...] [--redis-url URL]

Not part of ``python -m benchmarks`` (its name starts with ``_``). For the 1-bucket and
3-bucket decisions, allowed and denied, it measures with ``INFO commandstats``:

- ``evalsha_us``: the whole script, as shipped (``lua/buckets.lua`` + ``lua/acquire.lua``);
- ``commands_us``: the part of it spent executing the Redis commands it calls, and how many;
- ``prologue_us``: a script that defines the library and returns at once (the price of
  sending the library with every EVALSHA: ~20 closures and tables built per call);
- ``floor_us``: ``return 1``;
- for each ``--buckets`` file: the same decision with that file in place of
  ``lua/buckets.lua`` (same ``acquire.lua``), to compare a candidate optimisation.

What is left once commands and prologue are taken out is Lua execution and the marshalling of
``redis.call`` arguments and replies. Prints JSON on stdout, a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import redis

from queue_ratelimit import Limit, Limiter
from queue_ratelimit._scripts import script_source

from ._common import SCRIPT_COMMANDS, command_stats, log, median, reset_command_stats, sig

HIGH = Limit(1_000_000, per=1.0)
TIGHT = Limit(1, per=3600.0)
PATHS = {
    "1bucket": (1, False),
    "1bucket_denied": (1, True),
    "3bucket": (3, False),
    "3bucket_denied": (3, True),
}


def _call_args(url: str, buckets: int, denied: bool) -> tuple[list[str], list[Any]]:
    limiter = Limiter.from_url(url, namespace=f"qrlcost{buckets}{'d' if denied else ''}")
    if buckets == 1:
        limiter.set_limit("tenant:*", TIGHT if denied else HIGH)
        queue = None
    else:
        limiter.set_limit("global", HIGH)
        limiter.set_limit("tenant:*", HIGH)
        limiter.set_limit("tenant:*:queue:emails", TIGHT if denied else HIGH)
        queue = "emails"
    limiter.acquire("acme", queue)
    call = limiter._core.decision_call("acquire", "acme", queue, None, 1)
    limiter.close()
    return call.keys, call.args


def _measure(
    client: redis.Redis,
    sources: dict[str, str],
    keys: list[str],
    args: list[Any],
    calls: int,
    rounds: int,
) -> dict[str, tuple[float, dict[str, float]]]:
    """For each source, interleaved over rounds: median script microseconds per call, and
    its nested commands' calls and microseconds per call."""
    scripts = {name: client.register_script(src) for name, src in sources.items()}
    for script in scripts.values():
        for _ in range(100):
            script(keys=keys, args=args)
    totals: dict[str, list[float]] = {name: [] for name in scripts}
    nested: dict[str, dict[str, float]] = {name: {} for name in scripts}
    for _ in range(rounds):
        for name, script in scripts.items():
            reset_command_stats(client)
            for _ in range(calls):
                script(keys=keys, args=args)
            stats = command_stats(client)
            totals[name].append(stats["evalsha"].usec / calls)
            for cmd, st in stats.items():
                if cmd not in SCRIPT_COMMANDS:
                    n = nested[name]
                    n[f"{cmd}_calls"] = st.calls / calls
                    n[f"{cmd}_us"] = n.get(f"{cmd}_us", 0.0) + st.usec / calls / rounds
    return {name: (median(totals[name]), nested[name]) for name in scripts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._script_cost")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--buckets", nargs="*", default=[], help="alternative buckets.lua files")
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.redis_url:
        parser.error("no Redis: pass --redis-url or set REDIS_URL")

    client = redis.Redis.from_url(args.redis_url)
    shipped, library = script_source("acquire.lua"), script_source("buckets.lua")
    if not shipped.startswith(library):
        parser.error("acquire.lua is no longer prefixed with buckets.lua; update this tool")
    body = shipped[len(library) :]
    variants = {Path(p).name: Path(p).read_text(encoding="utf-8") + body for p in args.buckets}
    prologue = library + "\ndo return 1 end\n" + body

    out: dict[str, Any] = {}
    for name, (buckets, denied) in PATHS.items():
        keys, call_args = _call_args(args.redis_url, buckets, denied)
        sources = {"shipped": shipped, "prologue": prologue, "floor": "return 1", **variants}
        m = _measure(client, sources, keys, call_args, args.calls, args.rounds)
        total, nested = m["shipped"]
        commands_us = sum(v for k, v in nested.items() if k.endswith("_us"))
        row: dict[str, Any] = {
            "evalsha_us": sig(total),
            "commands_us": sig(commands_us),
            "redis_calls": {k[:-6]: sig(v) for k, v in nested.items() if k.endswith("_calls")},
            "prologue_us": sig(m["prologue"][0]),
            "floor_us": sig(m["floor"][0]),
            "lua_and_marshalling_us": sig(total - commands_us - m["prologue"][0]),
        }
        for vname in variants:
            row[f"{vname}_us"] = sig(m[vname][0])
            row[f"{vname}_vs_shipped"] = sig(m[vname][0] / total)
        out[name] = row
        log(f"{name:15} " + "  ".join(f"{k}={v}" for k, v in row.items() if k != "redis_calls"))
        log(f"{'':15} redis.call per decision: {row['redis_calls']}")
    client.flushdb()
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
