"""What waits and runs in RQ queues, per queue and tenant: ``queue-ratelimit rq info``.

A job of ours is in one of three places: on RQ's list of its queue (waiting: enqueued
while the queue was uncontended, or by a plain ``rq.Queue``), in the fair backlog (parked),
or in RQ's started registry (running). RQ's list and registry know no tenants, so the
tenant of each job there is read from its meta, as a worker would (no rate options: the
default tenant); the backlog keeps its own count per tenant.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import rq
from rq.registry import StartedJobRegistry

from .._errors import RateLimitError
from .._keys import KeySpace
from .._limiter import Limiter
from .._scheduler import FairScheduler
from .._scopes import Scope
from .._shard_layout import layouts
from ._dequeue import _text
from ._options import rate_options

# Metas read per round trip (one pipelined HGET each).
_READ_BATCH = 500


@dataclass(slots=True)
class Counts:
    """Jobs of one queue (or one tenant in it) by where they are."""

    waiting: int = 0  # on RQ's list
    parked: int = 0  # in the fair backlog
    running: int = 0  # in RQ's started registry

    def as_dict(self) -> dict[str, int]:
        return {"waiting": self.waiting, "parked": self.parked, "running": self.running}


@dataclass(slots=True)
class QueueInfo:
    """One RQ queue: its totals, the same per tenant, and the jobs whose tenant was not read
    (``unread``: waiting past ``max_read`` on RQ's list, or a meta the serializer could not
    load; counted in the totals, not under a tenant)."""

    name: str
    total: Counts = field(default_factory=Counts)
    tenants: dict[str, Counts] = field(default_factory=dict)
    unread: Counts = field(default_factory=Counts)
    # What holds back each tenant with parked jobs: the scope, with the window that binds
    # when it has several ("tenant:acme (10000/d)"), that holds back the job the dispatch
    # would serve next for the tenant (at its own priority and cost); a tenant no budget
    # holds back (its jobs wait for a worker) is not named.
    held_back_by: dict[str, str] = field(default_factory=dict)

    def tenant(self, name: str) -> Counts:
        found = self.tenants.get(name)
        if found is None:
            found = self.tenants[name] = Counts()
        return found

    def as_dict(self) -> dict[str, Any]:
        return {
            "queue": self.name,
            **self.total.as_dict(),
            "unread": self.unread.as_dict(),
            "tenants": {t: c.as_dict() for t, c in sorted(self.tenants.items())},
            "held_back_by": dict(sorted(self.held_back_by.items())),
        }


def queue_names(connection: Any) -> list[str]:
    """The queues RQ knows of on this Redis (every queue a job was ever enqueued into)."""
    return sorted(q.name for q in rq.Queue.all(connection=connection))


def queue_info(
    limiter: Limiter,
    names: Iterable[str],
    *,
    serializer: Any = None,
    max_read: int = 10_000,
) -> list[QueueInfo]:
    """Waiting, parked and running jobs of each queue in ``names``, per tenant, and what
    holds back each tenant with parked jobs (``QueueInfo.held_back_by``).

    ``limiter`` names the namespace of the fair backlog, and its client is RQ's Redis (the
    integration keeps both on one server). Reads only: nothing is cleaned up or moved.
    """
    connection = limiter.client
    spaces = layouts(limiter)  # (a sharded namespace's backlog is on every shard)
    infos = [_one(connection, spaces, name, serializer, max_read) for name in sorted(set(names))]
    scheduler = FairScheduler(limiter)
    for info in infos:
        parked = [t for t, c in sorted(info.tenants.items()) if c.parked > 0]
        # (The job a worker's dispatch would serve next for the tenant, its priority and
        # cost, judged as the dispatch would judge it now; one pipelined round trip per
        # queue.)
        hints = scheduler.hints(parked, queue=info.name, served_next=True)
        for tenant, hint in zip(parked, hints, strict=True):
            if hint.binding is not None:
                info.held_back_by[tenant] = hint.binding
    return infos


def _one(
    connection: Any, spaces: Sequence[KeySpace], name: str, serializer: Any, max_read: int
) -> QueueInfo:
    info = QueueInfo(name)
    queue = rq.Queue(name, connection=connection, serializer=serializer)
    pipe = connection.pipeline(transaction=False)  # one moment's list: its length and head
    pipe.llen(queue.key)
    pipe.lrange(queue.key, 0, max_read - 1)
    length, head = pipe.execute()
    listed = [_text(i) for i in head] if max_read else []
    info.total.waiting = int(length)
    info.unread.waiting = info.total.waiting - len(listed)
    for tenant in _tenants(connection, queue, listed):
        (info.unread if tenant is None else info.tenant(tenant)).waiting += 1
    registry = StartedJobRegistry(name, connection=connection, serializer=serializer)
    running = registry.get_job_ids(cleanup=False)
    info.total.running = len(running)
    for tenant in _tenants(connection, queue, running):
        (info.unread if tenant is None else info.tenant(tenant)).running += 1
    try:
        counts_keys = [keys.counts(name) for keys in spaces]
    except RateLimitError:
        return info  # a name that is no valid lane never has a backlog
    pipe = connection.pipeline(transaction=False)
    for counts_key in counts_keys:
        pipe.hgetall(counts_key)
    for counts in pipe.execute():
        for raw_field, raw_value in counts.items():
            tenant = _text(raw_field)
            if tenant == ":total":
                info.total.parked += int(_text(raw_value))
            elif not tenant.startswith(":"):  # (":cv" and such: the lane's own fields)
                info.tenant(tenant).parked += int(_text(raw_value))
    return info


def _tenants(connection: Any, queue: rq.Queue, job_ids: Sequence[str]) -> list[str | None]:
    """The tenant of each job, as a worker reads it from the job's meta (None: the meta
    could not be loaded; a job gone meanwhile counts under the default tenant)."""
    found: list[str | None] = []
    loads = queue.serializer.loads
    for start in range(0, len(job_ids), _READ_BATCH):
        pipe = connection.pipeline(transaction=False)
        for job_id in job_ids[start : start + _READ_BATCH]:
            pipe.hget(queue.job_class.key_for(job_id), "meta")
        for raw in pipe.execute():
            try:
                meta = loads(raw) if raw else {}
            except Exception:  # another program's serializer: not ours to load
                found.append(None)
                continue
            try:
                found.append(rate_options(meta)[0])
            except RateLimitError:  # bad options: the worker runs the job under the defaults
                found.append(rate_options({})[0])
    return found


def slots_held(limiter: Limiter, queues: Sequence[QueueInfo]) -> dict[str, tuple[int, int]]:
    """(cap, slots held) of every concurrency cap that applies to the queues' work, by
    concrete scope: a default (``tenant:*``, ``tenant:*:queue:<q>``) is shown for each
    tenant seen in the queues, under the tenant's own scope; a tenant's own cap wins over
    the default, as it does in the worker."""
    caps = limiter.concurrency()
    by_queue = {q.name: sorted(q.tenants) for q in queues}
    applying: dict[str, int] = {}
    for text, cap in caps.items():  # the defaults first: a concrete cap then overrides
        scope = Scope.parse(text)
        if not scope.is_default:
            continue
        for queue, tenants in by_queue.items():
            if scope.queue not in (None, queue):
                continue
            for tenant in tenants:
                suffix = "" if scope.queue is None else f":queue:{queue}"
                applying[f"tenant:{tenant}{suffix}"] = cap
    applying.update((s, n) for s, n in caps.items() if "*" not in s)
    return {s: (cap, limiter.running(s)) for s, cap in sorted(applying.items())}
