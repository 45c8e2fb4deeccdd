"""Where the server time of one ``acquire`` goes; a tool for working on the Lua scripts.

    python -m benchmarks._script_cost [--redis-url URL] [--calls N] [--rounds N]

Not part of ``python -m benchmarks`` (its name starts with ``_``). For the 1-bucket and
3-bucket decisions, allowed and denied, it measures with ``INFO commandstats``, interleaved:

- ``fcall_us``: the decision as shipped, the Functions library (FCALL);
- ``evalsha_us``: the same code as a script with the library prepended (EVALSHA: what a
  server without Functions runs; it rebuilds the library and plans every call);
- ``commands``: the Redis commands the FCALL makes per decision, and their microseconds;
- ``floor_us``: EVALSHA of ``return 1``.

What is left of ``fcall_us`` once its commands are taken out is Lua execution and the
marshalling of ``redis.call`` arguments and replies. For figures that machine noise cannot
move, run the server under ``valgrind --tool=callgrind`` and compare instructions per call
(docs/benchmarks.md). Prints JSON on stdout, a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import redis

from queue_ratelimit import Limit, Limiter
from queue_ratelimit._scripts import Scripts, script_source

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


Call = Callable[[], object]


def _measure(
    client: redis.Redis, calls_by_name: dict[str, Call], calls: int, rounds: int
) -> dict[str, tuple[float, dict[str, float]]]:
    """For each way of calling, interleaved over rounds: median server microseconds per
    call of the script itself, and its nested commands' calls and microseconds per call."""
    for call in calls_by_name.values():
        for _ in range(100):
            call()
    totals: dict[str, list[float]] = {name: [] for name in calls_by_name}
    nested: dict[str, dict[str, float]] = {name: {} for name in calls_by_name}
    for _ in range(rounds):
        for name, call in calls_by_name.items():
            reset_command_stats(client)
            for _ in range(calls):
                call()
            stats = command_stats(client)
            script = next(st for cmd, st in stats.items() if cmd in SCRIPT_COMMANDS)
            totals[name].append(script.usec / calls)
            for cmd, st in stats.items():
                if cmd not in SCRIPT_COMMANDS:
                    n = nested[name]
                    n[f"{cmd}_calls"] = st.calls / calls
                    n[f"{cmd}_us"] = n.get(f"{cmd}_us", 0.0) + st.usec / calls / rounds
    return {name: (median(totals[name]), nested[name]) for name in calls_by_name}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._script_cost")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.redis_url:
        parser.error("no Redis: pass --redis-url or set REDIS_URL")

    client = redis.Redis.from_url(args.redis_url)
    scripts = Scripts(client)
    scripts.load()
    if scripts.transport != "fcall":
        parser.error("this server has no Redis Functions (or refuses them)")
    function = scripts.functions["acquire.lua"]
    evalsha = client.register_script(script_source("acquire.lua"))
    floor = client.register_script("return 1")

    out: dict[str, Any] = {}
    for name, (buckets, denied) in PATHS.items():
        keys, call_args = _call_args(args.redis_url, buckets, denied)
        m = _measure(
            client,
            {
                "fcall": partial(client.fcall, function, len(keys), *keys, *call_args),
                "evalsha": partial(evalsha, keys=keys, args=call_args),
                "floor": floor,
            },
            args.calls,
            args.rounds,
        )
        total, nested = m["fcall"]
        commands_us = sum(v for k, v in nested.items() if k.endswith("_us"))
        row: dict[str, Any] = {
            "fcall_us": sig(total),
            "evalsha_us": sig(m["evalsha"][0]),
            "floor_us": sig(m["floor"][0]),
            "commands_us": sig(commands_us),
            "redis_calls": {k[:-6]: sig(v) for k, v in nested.items() if k.endswith("_calls")},
            "lua_and_marshalling_us": sig(total - commands_us),
        }
        out[name] = row
        log(f"{name:15} " + "  ".join(f"{k}={v}" for k, v in row.items() if k != "redis_calls"))
        log(f"{'':15} redis.call per decision: {row['redis_calls']}")
    client.flushdb()
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
