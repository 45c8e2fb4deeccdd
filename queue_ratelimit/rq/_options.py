"""Rate options of RQ jobs (kept in ``job.meta``) and the scheduler each process uses."""

from __future__ import annotations

import os
import threading
from typing import Any

from .._core import DEFAULT_RETENTION_MS, check_cost
from .._errors import ConfigError
from .._limiter import Limiter
from .._scheduler import FairScheduler
from .._scopes import _shown, check_name, check_priority
from .._slot_keeper import SlotKeeper

OPTION_TENANT, OPTION_PRIORITY, OPTION_COST = "rate_tenant", "rate_priority", "rate_cost"
OPTIONS = (OPTION_TENANT, OPTION_PRIORITY, OPTION_COST)
ENV_NAMESPACE = "QUEUE_RATELIMIT_NAMESPACE"
# Seconds a job's concurrency slots are held between renewals (a killed worker's slots come
# back after at most this long); the scheduler's lease.
ENV_LEASE = "QUEUE_RATELIMIT_LEASE"
DEFAULT_LEASE = 60.0
# Seconds an idle tenant's counters are kept (``Limiter``'s ``counter_retention``).
ENV_RETENTION = "QUEUE_RATELIMIT_COUNTER_RETENTION"

_schedulers: dict[tuple[int, str], FairScheduler] = {}
_keepers: dict[int, SlotKeeper] = {}
_schedulers_lock = threading.Lock()


def scheduler_for(connection: Any, namespace: str) -> FairScheduler:
    """One scheduler per Redis connection and namespace in this process."""
    key = (id(connection), namespace)
    with _schedulers_lock:
        found = _schedulers.get(key)
        if found is None or found.client is not connection:
            retention = _env_seconds(ENV_RETENTION)
            limiter = Limiter(
                connection,
                namespace=namespace,
                # The Limiter checks its bounds; unset: the Limiter's default.
                counter_retention=DEFAULT_RETENTION_MS / 1000 if retention is None else retention,
            )
            found = FairScheduler(limiter, lease=lease())
            _schedulers[key] = found
        return found


def rate_options(meta: dict[str, Any] | None) -> tuple[str, str, float]:
    """(tenant, priority, cost) of a job from its meta, with the defaults.

    Raises:
        InvalidName / InvalidCost: malformed values in the meta.
    """
    meta = meta if isinstance(meta, dict) else {}
    return (
        check_name("tenant", meta.get(OPTION_TENANT) or "default"),
        check_priority(meta.get(OPTION_PRIORITY) or "normal"),
        check_cost(meta.get(OPTION_COST) or 1),
    )


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


def _env_seconds(name: str) -> float | None:
    """A number of seconds from the environment variable ``name``; None when unset.

    Raises:
        ConfigError: a value that is not a number.
    """
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number of seconds, got {_shown(raw)}") from None


def lease() -> float:
    """The lease from ``$QUEUE_RATELIMIT_LEASE`` (seconds), else 60.

    Raises:
        ConfigError: a value that is not a number of seconds.
    """
    seconds = _env_seconds(ENV_LEASE)
    return DEFAULT_LEASE if seconds is None else seconds
