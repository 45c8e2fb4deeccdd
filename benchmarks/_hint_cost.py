"""Server cost of a producer hint, next to the bucket peek and scheduler.lua's floor.

    python -m benchmarks._hint_cost [--redis-url URL] [--calls N] [--rounds N] [--instructions]

Not part of ``python -m benchmarks`` (its name starts with ``_``). It makes each call once
through the package (``FairScheduler.hint`` without and with a job to count in transit,
``Limiter.peek``, and ``FairScheduler.reap`` finding nothing: the fixed cost of a
``scheduler.lua`` call), records the script call that made, and replays it as ``FCALL``:
``--calls`` times per round, the calls interleaved over ``--rounds``, timed with ``INFO
commandstats`` (median server microseconds per call). With ``--instructions`` it also counts
the instructions per call of a ``redis-server`` of its own run under callgrind (needs
``valgrind``; figures machine noise cannot move). Whatever script the installed code calls
is what is measured, so the same command prices an older version too (docs/benchmarks.md,
"Hint cost"). The state: ``tenant:*`` at a rate that never denies, five of the tenant's jobs
in transit and three of another tenant's in the lane's backlog. Prints JSON on stdout.
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

from queue_ratelimit import FairScheduler, Limit, Limiter

from ._common import log, sig
from ._script_cost import _measure

QUEUE, TENANT = "emails", "acme"
Captured = tuple[str, list[Any], list[Any]]  # script, keys, args


def _capture(limiter: Limiter, run: Callable[[], object]) -> Captured:
    """The one script call ``run`` makes through ``limiter``'s scripts."""
    scripts = limiter._scripts
    seen: list[Captured] = []
    call, call_packed = scripts.call, scripts.call_packed

    def record(name: str, keys: Any, args: Any) -> Any:
        seen.append((name, list(keys), list(args)))
        return call(name, keys, args)

    def record_packed(name: str, packable: Any) -> Any:
        seen.append((name, list(packable.keys), list(packable.args)))
        return call_packed(name, packable)

    scripts.call, scripts.call_packed = record, record_packed  # type: ignore[method-assign]
    try:
        run()
    finally:
        del scripts.call, scripts.call_packed
    assert len(seen) == 1, seen
    return seen[0]


def calls(client: redis.Redis, namespace: str) -> dict[str, Captured]:
    """The calls to price, made once each on a fresh namespace."""
    for key in client.scan_iter(match=f"*{{{namespace}}}*", count=1000):
        client.delete(key)
    limiter = Limiter(client, namespace=namespace)
    limiter.set_limit("tenant:*", Limit(1_000_000))
    scheduler = FairScheduler(limiter)
    for i in range(5):
        scheduler.hint(TENANT, queue=QUEUE, item_id=f"ahead-{i}")
    for i in range(3):
        scheduler.submit("other", f"parked-{i}", queue=QUEUE)
    scheduler.reap()  # (the legacy check and the library load happen before capturing)
    return {
        "hint": _capture(limiter, lambda: scheduler.hint(TENANT, queue=QUEUE)),
        "hint_counted": _capture(
            limiter, lambda: scheduler.hint(TENANT, queue=QUEUE, item_id="this")
        ),
        "peek": _capture(limiter, lambda: limiter.peek(TENANT, QUEUE)),
        "scheduler_reap": _capture(limiter, scheduler.reap),
    }


def _fcall(client: redis.Redis, captured: Captured) -> Callable[[], object]:
    name, keys, args = captured
    function = Limiter(client)._scripts.functions[name]
    return partial(client.execute_command, "FCALL", function, len(keys), *keys, *args)


def _instructions(n: int) -> dict[str, float]:
    from ._instructions import callgrind

    with callgrind() as server:
        made = calls(server.client, "qrl-hint-cost")
        out = {}
        for name, captured in made.items():
            call = _fcall(server.client, captured)
            call()
            pipe = server.client.pipeline(transaction=False)
            for _ in range(n):
                pipe.execute_command(*call.args)
            out[name] = round(server.count(pipe.execute) / n)
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._hint_cost")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instructions", action="store_true", help="callgrind counts too")
    args = parser.parse_args(argv)
    if not args.redis_url:
        parser.error("no Redis: pass --redis-url or set REDIS_URL")
    client = redis.Redis.from_url(args.redis_url)
    made = calls(client, "qrl-hint-cost")
    measured = _measure(
        client, {name: _fcall(client, c) for name, c in made.items()}, args.calls, args.rounds
    )
    out: dict[str, Any] = {
        "server_us": {name: sig(us) for name, (us, _nested) in measured.items()},
        "redis_calls": {
            name: {k[: -len("_calls")]: sig(v) for k, v in nested.items() if k.endswith("_calls")}
            for name, (_us, nested) in measured.items()
        },
        "scripts": {name: c[0] for name, c in made.items()},
        "arguments": {name: len(c[1]) + len(c[2]) for name, c in made.items()},
    }
    log("server us per call: " + ", ".join(f"{k} {v}" for k, v in out["server_us"].items()))
    if args.instructions:
        out["instructions"] = _instructions(args.calls)
        log("instructions per call: " + json.dumps(out["instructions"]))
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
