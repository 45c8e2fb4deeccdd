"""Instructions Redis executes per ``FairScheduler.dispatch``, counted with callgrind: what
naming the tenants a dispatch holds back (``Dispatch.held_back``) costs the server.

    python -m benchmarks._held_back_cost [--reps N]
    PYTHONPATH=<another checkout> python -m benchmarks._held_back_cost   # its code

Not part of ``python -m benchmarks`` (its name starts with ``_``). Needs ``valgrind`` and
``redis-server`` on PATH (``benchmarks/_instructions.py`` starts the server). For each case
it sets up a fresh namespace, then counts the instructions of one dispatch call
(``max_items=16``), ``--reps`` times (the median is printed; the counts differ only by the
clock's digits):

- ``held_back_32``: 33 tenants with one item each, every one's budget spent: the call
  judges and parks each (the last one parked passes ``max_skips``, 32: the call stops)
  and names each in its reply;
- ``held_back_1``: 16 tenants, one of them spent: 15 items out, one tenant named;
- ``dispatched_16``: 16 tenants, no limit: 16 items out, nothing held back (the reply is
  as before).

The code measured is whichever ``queue_ratelimit`` Python imports: run it again with
``PYTHONPATH`` naming another checkout (``git archive <commit> queue_ratelimit lua | tar
-x -C DIR``) to compare. Prints JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import uuid

import queue_ratelimit
from queue_ratelimit import FairScheduler, Limit, Limiter

from ._instructions import Callgrind, callgrind

SPENT = [Limit(100), Limit(1, per=3600, burst=1)]  # (the second window binds: "1/h")


def _case(server: Callgrind, name: str) -> tuple[int, int]:
    """(instructions of one dispatch call, tenants its reply names)"""
    limiter = Limiter(server.client, namespace=f"hb{uuid.uuid4().hex[:8]}")
    scheduler = FairScheduler(limiter)
    tenants = 33 if name == "held_back_32" else 16
    spent = tenants if name == "held_back_32" else 1 if name == "held_back_1" else 0
    for n in range(tenants):
        if n < spent:
            limiter.set_limit(f"tenant:t{n}", SPENT)
            assert limiter.acquire(f"t{n}").allowed
        scheduler.submit(f"t{n}", f"i{n}")
    got: list[object] = []
    count = server.count(lambda: got.append(scheduler.dispatch(["default"], max_items=16)))
    return count, len(getattr(got[0], "held_back", ()))  # (none named by older code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    options = parser.parse_args()
    result: dict[str, object] = {"code": queue_ratelimit.__file__, "reps": options.reps}
    with callgrind() as server:
        for name in ("held_back_32", "held_back_1", "dispatched_16"):
            runs = [_case(server, name) for _ in range(options.reps)]
            counts = [count for count, _ in runs]
            result[name] = {
                "instructions": statistics.median(counts),
                "all": counts,
                "named": runs[0][1],
            }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
