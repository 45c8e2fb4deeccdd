"""Settings of the Celery integration: keyword arguments of ``install`` over ``app.conf``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from .._breaker import DEFAULT_BACKOFF, check_backoff
from .._core import DEFAULT_RETENTION_MS, MAX_WAIT
from .._durability import EvictionMode, check_eviction_mode
from .._errors import ConfigError
from .._keys import DEFAULT_NAMESPACE, check_shards
from .._scopes import _shown, check_name, check_namespace, check_priority
from .._urls import check_redis_url, mask_url

Policy = Literal["hint", "delay", "reject"]
GateFailMode = Literal["open", "closed"]
CONF_KEY = "queue_ratelimit"


@dataclass(frozen=True, kw_only=True)
class CelerySettings:
    """How the gate, the producer hook and the metrics behave.

    Attributes:
        redis_url: the limiter's Redis; defaults to the broker URL when that is Redis.
        namespace: the limiter namespace (same default as ``Limiter``).
        limits: static configuration seeded into Redis at start (see ``parse_config``).
        fail_mode: when Redis is unreachable, ``"open"`` runs jobs (counted, logged) and
            ``"closed"`` holds them, then hands them back to the broker.
        default_tenant / default_priority: for tasks published without rate options.
        policy: producer policy: ``"hint"`` (attach advice), ``"delay"`` (set a countdown
            from it) or ``"reject"`` (raise ``RateLimited`` before publishing).
        hints: predict when each published job would start, behind the same tenant's jobs
            already waiting (one round trip); off saves it.
        lease: seconds a re-admitted job may stay unacknowledged before it is handed back;
            the worker renews it while the job runs. A lease that runs out while nobody
            can reach Redis is kept a lease longer (docs/design.md, "Silences"), so it need
            not outlast an outage; it bounds how soon a dead worker's jobs come back.
        poll_interval: how often an idle worker looks for re-admissible work (seconds).
        max_held: re-admitted jobs a worker holds at once (not yet settled), and how many
            messages it keeps while Redis cannot yet say whether they are in the backlog
            may raise its prefetch window (a park in doubt, a redelivery; on a cluster, too,
            one kept for its own primary's outage while another primary answers); default
            the reserve. Other messages kept by the closed fail mode or a full backlog stay
            within the window, and the broker keeps the rest.
        dedupe_window: seconds a job that ran through the backlog is remembered, so that a
            broker redelivery of its original message is not run again.
        counter_retention: seconds an idle tenant's counters (and its pass in the fair
            backlog) are kept before they expire (``Limiter``'s; default 15 minutes).
        metrics_interval: seconds between runs of the metrics beat task.
        credit: while a tenant's buckets are at least half full (nothing contended), one
            gate call may admit up to this many more of its jobs on the same queue, so they
            run without a round trip each; 0 turns it off. Unused credit is refunded.
        credit_ttl: seconds a worker holds such credit before it refunds what is left
            (also how long credited jobs may pass a backlog that formed meanwhile).
        fair_capacity: share worker slots fairly too, not only rate budgets. When a
            worker's pool is saturated, arriving work is parked in the fair backlog (and
            only then acknowledged to the broker) and re-admitted in weighted-fair order as
            slots free, so a quiet tenant never waits behind a noisy tenant's backlog.
            False: park only what the buckets hold back (fair only under rate contention);
            past that, Celery's own FIFO order.
        reserve: jobs a worker takes on at once from the fair backlog (running, or waiting
            for a free process); None: four times the pool size. It takes them in batches
            of half this, so a larger reserve costs fewer round trips per job; a job waits
            behind at most this many others on one worker. Arriving work is parked once
            twice the pool size (at most the prefetch count) is taken on. While the
            namespace has concurrency caps, at most the pool size (a job queued in a worker
            would hold its cap's slot without running); caps are looked for at start and
            every third of ``lease``.
        max_backlog: most items a queue's fair backlog in Redis may hold (all tenants and
            workers together). Past it, workers stop pulling work from the broker into
            Redis: each holds what it has received, unacknowledged (at most its prefetch
            count), and parks it once the backlog has room; the rest stays in the broker.
        eviction: when the limiter's Redis may evict keys (an ``allkeys-*`` or
            ``volatile-*`` maxmemory-policy), ``"warn"`` at the worker's start, ``"refuse"``
            to start (``ConfigError``), or ``"ignore"`` (see ``Limiter``).
        log_interval: seconds between a worker's INFO summaries of the work it holds back
            (a line per tenant: jobs parked, the binding scope, jobs waiting); 0: none.
        transit_grace: seconds a published job stays counted by later hints beyond twice
            the wait predicted for it, unless a worker's gate sees it sooner (a job lost in
            the broker stops counting then).
        redis_backoff: (first, most) seconds. Once a call to the limiter's Redis has
            waited out its timeout (2 s), every call of the process fails at once (the
            fail mode decides: ``"open"`` runs work, ``"closed"`` holds it) until Redis
            answers a probe, sent in the background after ``first`` seconds and then at
            intervals doubling up to ``most``, and at most a sixth of ``lease`` (so the
            gate renews its leases soon after an outage). None: each call waits out its
            own timeout.
        shards: hash slots the namespace is spread over (``Limiter``'s ``shards``; every
            worker and producer of a namespace must use the same number).
        strict_pauses: every gated task looks for a pause of its scopes as it starts, in
            the pool process (one round trip per task, about +10-50% pool CPU for short
            tasks), and hands itself back if one runs, so no job admitted before a pause
            (gate credit, reserved and prefetched jobs) starts after the pause call
            returned. False: those few jobs run; a task that meets the downstream's 429
            again pauses and hands itself back as the first did.
    """

    redis_url: str | None = None
    namespace: str = DEFAULT_NAMESPACE
    limits: Mapping[str, Any] = field(default_factory=dict)
    fail_mode: GateFailMode = "open"
    default_tenant: str = "default"
    default_priority: str = "normal"
    policy: Policy = "hint"
    hints: bool = True
    lease: float = 30.0
    poll_interval: float = 0.25
    max_held: int | None = None
    dedupe_window: float = 3600.0
    counter_retention: float = DEFAULT_RETENTION_MS / 1000
    metrics_interval: float = 15.0
    credit: int = 16
    credit_ttl: float = 0.25
    fair_capacity: bool = True
    reserve: int | None = None
    max_backlog: int = 100_000
    eviction: EvictionMode = "warn"
    log_interval: float = 10.0
    transit_grace: float = 300.0
    redis_backoff: tuple[float, float] | None = DEFAULT_BACKOFF
    shards: int = 1
    strict_pauses: bool = False

    def __post_init__(self) -> None:
        if self.redis_url is not None:
            check_redis_url(self.redis_url)
        check_namespace(self.namespace)
        check_name("tenant", self.default_tenant)
        check_priority(self.default_priority)
        if self.fail_mode not in ("open", "closed"):
            raise ConfigError(f"fail_mode must be 'open' or 'closed', got {_shown(self.fail_mode)}")
        if self.policy not in ("hint", "delay", "reject"):
            raise ConfigError(
                f"policy must be 'hint', 'delay' or 'reject', got {_shown(self.policy)}"
            )
        if isinstance(self.credit, bool) or not isinstance(self.credit, int) or self.credit < 0:
            raise ConfigError(f"credit must be a whole number >= 0, got {_shown(self.credit)}")
        for name in (
            "lease",
            "poll_interval",
            "dedupe_window",
            "counter_retention",
            "metrics_interval",
            "credit_ttl",
            "transit_grace",
        ):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(
                    f"{name} must be a positive number of seconds, got {_shown(value)}"
                )
        if self.counter_retention > MAX_WAIT:
            raise ConfigError(
                f"counter_retention must be at most {MAX_WAIT:.0f} seconds, "
                f"got {_shown(self.counter_retention)}"
            )
        for name in ("max_held", "reserve"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ConfigError(f"{name} must be a positive integer, got {_shown(value)}")
        if (
            isinstance(self.max_backlog, bool)
            or not isinstance(self.max_backlog, int)
            or self.max_backlog < 1
        ):
            raise ConfigError(
                f"max_backlog must be a positive integer, got {_shown(self.max_backlog)}"
            )
        check_eviction_mode(self.eviction)
        if self.redis_backoff is not None:  # (a list from app.conf is fine)
            object.__setattr__(self, "redis_backoff", check_backoff(self.redis_backoff))
        check_shards(self.shards)
        interval = self.log_interval
        if not isinstance(interval, (int, float)) or not 0 <= interval < math.inf:
            raise ConfigError(
                f"log_interval must be a number of seconds >= 0, got {_shown(interval)}"
            )
        if not isinstance(self.fair_capacity, bool):
            raise ConfigError(
                f"fair_capacity must be True or False, got {_shown(self.fair_capacity)}"
            )

    def __repr__(self) -> str:
        url = None if self.redis_url is None else mask_url(self.redis_url)
        return f"CelerySettings(redis_url={url!r}, namespace={self.namespace!r})"

    @classmethod
    def from_app(cls, app: Any, overrides: Mapping[str, Any]) -> CelerySettings:
        """Settings from ``app.conf.queue_ratelimit`` (a dict), overridden by ``overrides``."""
        known = {f.name for f in fields(cls)}
        conf = dict(app.conf.get(CONF_KEY) or {})
        merged = {**conf, **{k: v for k, v in overrides.items() if v is not None}}
        unknown = set(merged) - known
        if unknown:
            raise ConfigError(
                f"unknown queue_ratelimit settings {sorted(unknown)}; known: {sorted(known)}"
            )
        if not merged.get("redis_url"):
            broker = app.conf.broker_url or ""
            if broker.startswith(("redis://", "rediss://", "unix://")):
                merged["redis_url"] = broker
        if not merged.get("redis_url"):
            raise ConfigError(
                "queue_ratelimit needs a Redis URL: pass redis_url=... to install() or set "
                "app.conf.queue_ratelimit = {'redis_url': ...} (the broker is not Redis)"
            )
        return cls(**merged)
