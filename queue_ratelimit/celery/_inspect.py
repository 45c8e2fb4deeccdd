"""``celery -A proj inspect qrl_gate``: each worker's gate, and what waits in its queues.

``celery inspect stats`` carries the gate's counters (``RateLimitGate.info``) among
everything else a worker reports; this command answers with the gate alone, readable per
worker: its counters, the work it holds, its settings, Redis's state as it sees it, and the
fair backlog of each of its queues (jobs waiting per tenant, tenants parked until their
budgets return). Registered with Celery's remote-control panel when the integration is
imported, so the ``celery`` command of an app with ``install`` knows it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from celery.worker.control import inspect_command
from redis.exceptions import RedisError

from .._client import queue_time
from .._errors import BackendError, RateLimitError
from .._shard_layout import layouts

if TYPE_CHECKING:
    from ._gate import RateLimitGate

COMMAND = "qrl_gate"
TOP_TENANTS = 20  # tenants shown per queue, the most waiting first


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def gate_of(consumer: Any) -> RateLimitGate | None:
    """The consumer's gate step, if it runs one."""
    from ._gate import RateLimitGate

    for step in getattr(consumer, "steps", None) or ():
        if isinstance(step, RateLimitGate):
            return step
    return None


def backlog_report(gate: RateLimitGate) -> dict[str, Any]:
    """What waits in the gate's queues, from Redis (one pipelined read; on a sharded
    namespace every shard's lanes, added up).

    Raises:
        BackendError: a count that is no integer (another client wrote it): the report
            says so (``backlog_error``) instead of the command failing as a whole.
    """
    try:
        return _backlog_report(gate)
    except RateLimitError:
        raise
    except ValueError as exc:
        raise BackendError(f"queue-ratelimit: a corrupt backlog count: {exc}") from exc


def _backlog_report(gate: RateLimitGate) -> dict[str, Any]:
    scheduler = gate._rt.scheduler
    spaces = layouts(scheduler.limiter)
    pipe = scheduler.client.pipeline(transaction=False)
    queue_time(pipe, spaces[0].inflight)
    for keys in spaces:
        pipe.zcard(keys.inflight)
        for lane in gate.lanes:
            pipe.hgetall(keys.counts(lane))
            pipe.zrange(keys.parked(lane), 0, TOP_TENANTS - 1, withscores=True)
    replies = pipe.execute()
    seconds, micros = replies[0]
    now_ms = seconds * 1000 + micros / 1000
    per_shard = 1 + 2 * len(gate.lanes)
    shards = [replies[1 + i * per_shard : 1 + (i + 1) * per_shard] for i in range(len(spaces))]
    queues = {}
    for n, lane in enumerate(gate.lanes):
        total = 0
        tenants: dict[str, int] = {}
        parked: list[tuple[Any, float]] = []
        for shard in shards:
            fields = {_text(f): _text(v) for f, v in shard[1 + 2 * n].items()}
            total += int(fields.get(":total", 0))
            # (Fields starting with ':' are the lane's own: its total, its virtual time...)
            for t, c in fields.items():
                if not t.startswith(":"):
                    tenants[t] = tenants.get(t, 0) + int(c)
            parked += shard[2 + 2 * n]
        top = sorted(tenants.items(), key=lambda tc: (-tc[1], tc[0]))[:TOP_TENANTS]
        soonest = sorted(parked, key=lambda tw: tw[1])[:TOP_TENANTS]
        queues[lane] = {
            "waiting": total,
            "tenants": dict(top),
            "parked_tenants": {
                _text(t): round(max(0.0, wake - now_ms) / 1000, 3) for t, wake in soonest
            },
        }
    return {"in_flight": sum(int(shard[0]) for shard in shards), "queues": queues}


def report(gate: RateLimitGate) -> dict[str, Any]:
    """The gate's state as ``qrl_gate`` answers it."""
    settings = gate._rt.settings
    health = gate.health
    down_since = health.down_since
    out: dict[str, Any] = {
        "namespace": settings.namespace,
        "lanes": list(gate.lanes),
        "settings": {
            "fail_mode": settings.fail_mode,
            "fair_capacity": settings.fair_capacity,
            "credit": settings.credit,
            "max_backlog": settings.max_backlog,
        },
        "redis": "ok"
        if down_since is None
        else f"{'answering errors' if health.broken else 'unreachable'} for "
        f"{time.monotonic() - down_since:.1f} s",
        "counters": {**gate.stats, "redis_writes": gate.wire.writes},
        "worker": {
            "reserve": gate.slots.reserve,
            "taken": gate.slots.taken(),
            "free": gate.slots.free(),
            "held": len(gate.held),
            "parking": len(gate.parking),
            "waiting": len(gate.waiting),
            "unsettled": len(gate.unsettled),
            "running_with_slots": len(gate.running),
            "concurrency_caps": gate.slots.capped,
        },
        # The scope (with the window, for a scope of several) that last held each tenant's
        # work back, by queue.
        "held_back_by": gate.throttled.bindings(),
    }
    try:
        out.update(backlog_report(gate))
    except (RedisError, RateLimitError) as exc:
        out["backlog_error"] = str(exc)
    return out


@inspect_command(name=COMMAND)
def qrl_gate(state: Any, **_: Any) -> dict[str, Any]:
    """The queue-ratelimit gate of this worker: counters, held work, its queues' backlogs."""
    gate = gate_of(state.consumer)
    if gate is None or not gate.enabled:
        return {"error": "no queue-ratelimit gate on this worker (install(app) not called)"}
    return report(gate)
