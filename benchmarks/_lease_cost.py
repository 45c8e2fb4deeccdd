"""Server cost of the scheduler calls that touch leases, against the Lua of an earlier
revision, in one run; a tool for working on ``scheduler.lua``.

    python -m benchmarks._lease_cost [--redis-url URL] [--calls N] [--rounds N]

Not part of ``python -m benchmarks`` (its name starts with ``_``). The Lua at
``QRL_BENCH_BASE`` (a git revision, default ``main``) is loaded as a Functions library of
its own beside the current one (as ``benchmarks.credits`` does), and each call is made
through both, in interleaved slices of ``--calls`` calls over ``--rounds`` rounds, timed with
``INFO commandstats`` (median server microseconds per call; ratios are medians of per-round
ratios, current / base):

- ``dispatch_ack``: ``dispatch(max_items=1)`` with a 60 s lease from a backlog of one
  tenant (``tenant:*`` at a rate that never denies), then ``ack`` of what it handed out:
  one job's round trip through the backlog (two calls);
- ``extend``: renewing the lease of an item in flight;
- ``reap``: ``reap`` finding nothing to take back (the fixed cost of a lease call).

Prints JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import redis

from queue_ratelimit import FairScheduler, Limit, Limiter
from queue_ratelimit._scheduler import SubmitItem

from ._common import SCRIPT_COMMANDS, command_stats, log, median, reset_command_stats, sig
from .credits import beside_base

HIGH = Limit(1_000_000)
QUEUE, TENANT = "default", "acme"


class Version:
    """One version's calls, in a namespace of its own, through the FCALL function ``fn``."""

    def __init__(self, client: redis.Redis, namespace: str, fn: str) -> None:
        self.client = client
        self.fn = fn
        limiter = Limiter(client, namespace=namespace)
        limiter.set_limit("tenant:*", HIGH)
        self.scheduler = FairScheduler(limiter, lease=60)
        self.serial = 0
        self.fill(1)
        held = self.scheduler.dispatch_result(self.fcall(*self.scheduler.dispatch_call([QUEUE])))
        (item,) = held.items
        s = self.scheduler
        self.extend_call = (s._keys, s._args("extend", [item.id, s.lease_ms, item.lease]))
        self.reap_call = (s._keys, s._args("reap", []))

    def fcall(self, keys: list[str], args: list[Any]) -> Any:
        return self.client.execute_command("FCALL", self.fn, len(keys), *keys, *args)

    def fill(self, count: int) -> None:
        """Queue ``count`` more items (untimed: before the slice's statistics are reset)."""
        pipe = self.client.pipeline(transaction=False)
        for _ in range(count):
            self.serial += 1
            keys, args = self.scheduler._submit_call(SubmitItem(TENANT, f"j{self.serial}"), 0)
            pipe.execute_command("FCALL", self.fn, len(keys), *keys, *args)
        pipe.execute()

    def dispatch_ack(self) -> None:
        batch = self.scheduler.dispatch_result(self.fcall(*self.scheduler.dispatch_call([QUEUE])))
        (item,) = batch.items
        assert self.fcall(*self.scheduler.settle_call(item, "ack", 0)) == 1

    def extend(self) -> None:
        assert self.fcall(*self.extend_call) == 1

    def reap(self) -> None:
        assert self.fcall(*self.reap_call) == 0


def _slice(admin: redis.Redis, version: Version, call: str, calls: int) -> float:
    """Server microseconds per call (``dispatch_ack``: per pair) over ``calls`` calls."""
    if call == "dispatch_ack":
        version.fill(calls)
    run: Callable[[], None] = getattr(version, call)
    reset_command_stats(admin)
    for _ in range(calls):
        run()
    stats = command_stats(admin)
    return sum(st.usec for cmd, st in stats.items() if cmd in SCRIPT_COMMANDS) / calls


def run(redis_url: str, calls: int = 1000, rounds: int = 15) -> dict[str, Any]:
    rev = os.environ.get("QRL_BENCH_BASE", "main")
    admin, client, base_fn, current_fn = beside_base(redis_url, rev, "scheduler.lua")
    versions = {
        "base": Version(client, "lease-base", base_fn),
        "current": Version(client, "lease-current", current_fn),
    }
    names = ("dispatch_ack", "extend", "reap")
    log(f"lease_cost: {len(names)} calls x 2 versions x {rounds} rounds x {calls}, base {rev}")
    per_round: dict[tuple[str, str], list[float]] = {(v, n): [] for v in versions for n in names}
    for r in range(rounds):
        order = list(versions.items()) if r % 2 == 0 else list(versions.items())[::-1]
        for name in names:
            for label, version in order:
                per_round[label, name].append(_slice(admin, version, name, calls))
    admin.flushdb()
    out: dict[str, Any] = {"base": rev, "calls": calls, "rounds": rounds}
    for name in names:
        base, current = per_round["base", name], per_round["current", name]
        out[name] = {
            "base_us": sig(median(base)),
            "current_us": sig(median(current)),
            "ratio": sig(median(c / b for c, b in zip(current, base, strict=True))),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._lease_cost")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--calls", type=int, default=1000, help="calls per slice")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args(argv)
    if not args.redis_url:
        parser.error("no Redis: pass --redis-url or set REDIS_URL")
    json.dump(run(args.redis_url, args.calls, args.rounds), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
