"""Counters that the server's Functions library keeps in memory for a moment.

As a Redis Functions library, the decision code adds up a namespace's counters (admissions,
denials, would-denials, the wait histogram, the denials zset) in the library's memory and
writes them at most a second (or 100 decisions) later: that takes most of the ``HINCRBY``s
off every decision (``lua/buckets.lua``, "Counters kept in memory"; figures in
docs/benchmarks.md). Whoever reads those counters calls :func:`flush_counters` first, so it
sees every decision made before the read, as if they had been written at once.
"""

from __future__ import annotations

from typing import Any


def flush_counters(limiter: Any) -> int:
    """Write the counts the server keeps in memory for ``limiter``'s namespace (a sync
    ``Limiter``); returns how many decisions they counted (0 over ``EVALSHA``, which
    writes every count at once)."""
    scripts = limiter._scripts
    if scripts.transport == "evalsha":
        return 0
    return int(scripts.call("counters.lua", [limiter.keys.shared], []))


def queue_flush_counters(limiter: Any, pipe: Any) -> bool:
    """:func:`flush_counters` as the first command of ``pipe`` (no round trip of its own);
    True when queued. Run the pipeline with ``raise_on_error=False`` and drop the first
    reply: an error there means the server lost its Functions library (and with it the
    counts it kept), which a read can ignore."""
    scripts = limiter._scripts
    if scripts.transport == "evalsha":
        return False
    scripts.queue(pipe, "counters.lua", [limiter.keys.shared], [])
    # (queue() may have settled on EVALSHA just now: nothing is kept in memory then either.)
    return True
