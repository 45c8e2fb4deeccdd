"""Rate options of RQ jobs (kept in ``job.meta``) and the scheduler each process uses."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from .._core import DEFAULT_RETENTION_MS
from .._durability import EvictionMode, check_eviction_mode
from .._errors import ConfigError, RateLimitError
from .._job_options import read_rate_options
from .._limiter import Limiter
from .._scheduler import TRANSIT_GRACE, FairScheduler
from .._scopes import _shown
from .._slot_keeper import SlotKeeper
from .._throttle_log import DEFAULT_INTERVAL

OPTION_TENANT, OPTION_PRIORITY, OPTION_COST = "rate_tenant", "rate_priority", "rate_cost"
OPTIONS = (OPTION_TENANT, OPTION_PRIORITY, OPTION_COST)
ENV_NAMESPACE = "QUEUE_RATELIMIT_NAMESPACE"
# Seconds a job's concurrency slots are held between renewals (a killed worker's slots come
# back after at most this long); the scheduler's lease.
ENV_LEASE = "QUEUE_RATELIMIT_LEASE"
DEFAULT_LEASE = 60.0
# What a worker does when the limiter's Redis may evict keys: warn (default), refuse, ignore.
ENV_EVICTION = "QUEUE_RATELIMIT_EVICTION"
# Seconds between a worker's INFO summaries of throttled work (0: none).
ENV_LOG_INTERVAL = "QUEUE_RATELIMIT_LOG_INTERVAL"
# Seconds an enqueued job stays counted by hints beyond twice its predicted wait, unless a
# worker sees it sooner (FairScheduler's transit_grace).
ENV_TRANSIT_GRACE = "QUEUE_RATELIMIT_TRANSIT_GRACE"
# Seconds an idle tenant's counters are kept (``Limiter``'s ``counter_retention``).
ENV_RETENTION = "QUEUE_RATELIMIT_COUNTER_RETENTION"
# The shards the namespace is spread over (``Limiter``'s ``shards``; docs/design.md).
ENV_SHARDS = "QUEUE_RATELIMIT_SHARDS"

log = logging.getLogger("queue_ratelimit.rq")
_schedulers: dict[tuple[int, str], FairScheduler] = {}
_keepers: dict[int, SlotKeeper] = {}
_schedulers_lock = threading.Lock()


def shards() -> int:
    """The shards the namespace is spread over (``QUEUE_RATELIMIT_SHARDS``, default 1):
    every worker and producer of a namespace must use the same number."""
    raw = os.environ.get(ENV_SHARDS, "").strip()
    if not raw:
        return 1
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(
            f"{ENV_SHARDS} must be a whole number from 1 to 1024, got {_shown(raw)}"
        ) from None


def scheduler_for(connection: Any, namespace: str) -> FairScheduler:
    """One scheduler per Redis connection and namespace in this process."""
    count = shards()
    key = (id(connection), namespace)
    with _schedulers_lock:
        found = _schedulers.get(key)
        if (
            found is None
            or found.client is not connection
            or getattr(found.limiter, "shards", 1) != count
        ):
            retention = _seconds(ENV_RETENTION, DEFAULT_RETENTION_MS / 1000)
            limiter = Limiter(
                connection,
                namespace=namespace,
                eviction=eviction(),
                counter_retention=retention,  # (the Limiter checks its bounds)
                shards=count,  # (checked by the Limiter)
            )
            found = FairScheduler(limiter, lease=lease(), transit_grace=transit_grace())
            _schedulers[key] = found
        return found


def rate_options(meta: dict[str, Any] | None) -> tuple[str, str, float]:
    """(tenant, priority, cost) of a job from its meta, with the defaults for those absent
    (or None).

    Raises:
        InvalidName / InvalidCost: malformed values in the meta (and no other exception,
            whatever the meta holds).
    """
    meta = meta if isinstance(meta, dict) else {}
    return read_rate_options(
        meta.get(OPTION_TENANT), meta.get(OPTION_PRIORITY), meta.get(OPTION_COST)
    )


def stored_rate_options(meta: dict[str, Any] | None, job_id: str | None) -> tuple[str, str, float]:
    """Rate options of a job whose meta any code may have written: malformed values are
    logged and the defaults used, so that the job still runs (once). ``job_id`` is for the
    log (None for a job being made: asking RQ for its id would give it one)."""
    try:
        return rate_options(meta)
    except RateLimitError as exc:
        log.error(
            "queue-ratelimit: job %s has bad rate options (%s); using defaults",
            job_id or "(new)",
            exc,
        )
        return rate_options({})


def slot_keeper(scheduler: FairScheduler) -> SlotKeeper:
    """The concurrency slots of the jobs this process runs through ``scheduler``; renewed
    from a thread of their own every third of the scheduler's lease."""
    with _schedulers_lock:
        keeper = _keepers.get(id(scheduler))
        if keeper is None:
            keeper = _keepers[id(scheduler)] = SlotKeeper(
                lambda: scheduler.limiter, scheduler.lease_ms / 1000
            )
    keeper.start()
    return keeper


def eviction() -> EvictionMode:
    """The ``eviction`` setting from ``$QUEUE_RATELIMIT_EVICTION``, else ``"warn"``.

    Raises:
        ConfigError: a value other than warn, refuse or ignore.
    """
    return check_eviction_mode(os.environ.get(ENV_EVICTION) or "warn")


def log_interval() -> float:
    """The ``log_interval`` from ``$QUEUE_RATELIMIT_LOG_INTERVAL`` (seconds), else 10.

    Raises:
        ConfigError: a value that is not a number of seconds >= 0.
    """
    seconds = _seconds(ENV_LOG_INTERVAL, DEFAULT_INTERVAL)
    if not 0 <= seconds < float("inf"):
        raise ConfigError(f"{ENV_LOG_INTERVAL} must be a number of seconds >= 0, got {seconds}")
    return seconds


def lease() -> float:
    """The lease from ``$QUEUE_RATELIMIT_LEASE`` (seconds), else 60.

    Raises:
        ConfigError: a value that is not a number of seconds.
    """
    return _seconds(ENV_LEASE, DEFAULT_LEASE)


def transit_grace() -> float:
    """``transit_grace`` from ``$QUEUE_RATELIMIT_TRANSIT_GRACE`` (seconds), else 300.

    Raises:
        ConfigError: a value that is not a number of seconds.
    """
    return _seconds(ENV_TRANSIT_GRACE, TRANSIT_GRACE)


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {_shown(raw)}") from None
