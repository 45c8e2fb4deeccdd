"""The exception tree shared by every part of queue-ratelimit.

::

    RateLimitError                     root: catch this to catch everything we raise
    ├── ConfigError (ValueError)       a value is out of bounds or malformed
    │   ├── InvalidLimit               rate / per / burst not finite, <= 0 or absurd
    │   ├── InvalidName                tenant, queue, priority or namespace name
    │   ├── InvalidScope               a scope string that names no known scope
    │   ├── InvalidCost                cost not a number in [1e-6, 1e12]
    │   ├── InvalidWeight              a fair-scheduling weight outside [0.001, 1e6]
    │   └── BackendError               Redis answered with an error: what it holds is broken
    │       └── ShardCountMismatch     the namespace is recorded with another shard count
    ├── CostExceedsBurst               cost can never fit the bucket (would deny forever)
    ├── LimitNotFound (KeyError)       get/delete of a scope (or weight) that is not set
    ├── BackendUnavailable             Redis unreachable or not serving: an outage
    ├── BacklogFull                    a fair backlog holds as many items as it may
    ├── TooManyPauses                  a namespace runs as many pauses as it may
    └── RateLimited                    raised only where a caller asked for "reject"

Being throttled is normally a result (``Decision.allowed`` is False), not an exception;
``RateLimited`` exists for producer policies that want to refuse work outright.

Every failure of Redis is one of two kinds. ``BackendUnavailable`` is an outage: no answer
(refused, dropped, timed out) or an answer that says "not now" (loading, busy running a
script, a read-only replica, out of memory); the fail mode applies to it. ``BackendError``
is any other error Redis answers with (a key of the wrong type, a corrupt limit, a script
that fails): retrying will not help until someone fixes the data, so it is never mistaken
for an outage, and nothing fails open because of it.
"""

from __future__ import annotations


class RateLimitError(Exception):
    """Root of every exception raised by queue-ratelimit."""


class ConfigError(RateLimitError, ValueError):
    """A value given to queue-ratelimit is malformed or out of bounds."""


class InvalidLimit(ConfigError):
    """A rate, period or burst is not a finite number within bounds."""


class InvalidName(ConfigError):
    """A tenant, queue, priority or namespace name cannot be used."""


class InvalidScope(ConfigError):
    """A scope string does not name a scope queue-ratelimit knows."""


class InvalidCost(ConfigError):
    """A cost (or a hold, retention or wait setting) is not a number within its bounds."""


class InvalidWeight(ConfigError):
    """A fair-scheduling weight is not a number from 0.001 to 1e6."""


class CostExceedsBurst(RateLimitError):
    """The cost asked for is larger than a bucket can ever hold.

    Such a request would be denied forever, so it is refused loudly instead.
    """

    def __init__(self, scope: str, cost: float, burst: float) -> None:
        self.scope = scope
        self.cost = cost
        self.burst = burst
        super().__init__(
            f"cost {cost:g} exceeds the burst {burst:g} of scope {scope!r}: it could never be "
            f"admitted; raise that scope's burst or split the work into smaller costs"
        )


class LimitNotFound(RateLimitError, KeyError):
    """No limit is set for the scope asked about."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        super().__init__(scope)

    def __str__(self) -> str:
        kind, _, name = self.scope.partition(":")
        if self.scope == "mode:record":
            return "traffic is not being recorded"
        if kind == "weight":
            return f"no weight is set for {name!r}"
        if kind == "exempt":
            return f"tenant {name!r} is not exempt"
        if kind == "conc":
            return f"no concurrency cap is set for scope {name!r}"
        return f"no limit is set for scope {self.scope!r}"


class BackendError(ConfigError):
    """Redis answered with an error that is not an outage: the data or configuration it
    holds is broken (a key of the wrong type, a corrupt limit, a script that fails)."""


class ShardCountMismatch(BackendError):
    """The namespace was recorded (at its home, by the first limiter that used it) with
    another shard count than this limiter's: each count keeps a tenant's buckets in a slot
    of its own, so the two would each enforce every limit on their own (docs/design.md,
    "Shards"). Nothing is decided until they agree."""

    def __init__(self, namespace: str, recorded: int, configured: int) -> None:
        self.namespace = namespace
        self.recorded = recorded
        self.configured = configured
        super().__init__(
            f"namespace {namespace!r} is used with {recorded} shard(s) and this limiter has "
            f"{configured}: every process of a namespace must use the same count (each count "
            f"keeps a tenant's buckets apart: together they would admit more than the "
            f"limits). Use shards={recorded}; or, to change the count, stop the processes "
            f"using {recorded} and let their fair backlogs drain, then record the new one: "
            f"queue-ratelimit --namespace {namespace} shards set {configured} --force"
        )


class BackendUnavailable(RateLimitError):
    """The Redis server behind the limiter cannot be reached or cannot serve now."""


class BacklogFull(RateLimitError):
    """A queue's fair backlog already holds the most items it may (``max_backlog``)."""

    def __init__(self, queue: str, bound: int) -> None:
        self.queue = queue
        self.bound = bound
        super().__init__(f"the fair backlog of queue {queue!r} holds {bound} items already")


class TooManyPauses(RateLimitError):
    """A new pause while the namespace already runs the most it may (pauses that ran out
    do not count; a running pause can still be lengthened). Each running pause is a field
    of the configuration, which every listing, scrape and Celery worker reads whole."""

    def __init__(self, namespace: str, scope: str, bound: int) -> None:
        self.namespace = namespace
        self.scope = scope
        self.bound = bound
        super().__init__(
            f"namespace {namespace!r} runs {bound} pauses already (the most it may): "
            f"{scope!r} was not paused; pause a wider scope (a queue, a priority, global) "
            f"or resume pauses no longer needed"
        )


class RateLimited(RateLimitError):
    """Work was refused because a rate limit denied it (only under a ``reject`` policy)."""

    def __init__(self, message: str, *, wait_ms: float, denied_by: str | None) -> None:
        self.wait_ms = wait_ms
        self.denied_by = denied_by
        super().__init__(message)
