"""Distributed, Redis-backed rate limits for Celery and RQ job execution.

The core needs only redis-py::

    from queue_ratelimit import Limiter

    limiter = Limiter.from_url("redis://localhost:6379/0")
    limiter.set_limit("tenant:*", "50/s")
    if limiter.acquire("acme", queue="emails").allowed:
        ...

Integrations live in submodules (``queue_ratelimit.celery``, ``queue_ratelimit.rq``) so that
importing this package never imports Celery, RQ, Textual or prometheus_client.
"""

from ._async_limiter import AsyncLimiter
from ._config import ConfigSpec, config_from_env, load_config_file, parse_config
from ._core import AuditEntry
from ._decision import Decision, Pause, ScopeLimit, Slot
from ._errors import (
    BackendError,
    BackendUnavailable,
    BacklogFull,
    ConfigError,
    CostExceedsBurst,
    InvalidCost,
    InvalidLimit,
    InvalidName,
    InvalidScope,
    InvalidWeight,
    LimitNotFound,
    RateLimited,
    RateLimitError,
    TooManyPauses,
)
from ._keys import KeySpace
from ._limit import Limit
from ._limiter import Limiter
from ._preview import BucketPreview, Preview
from ._scheduler import Dispatch, DispatchedItem, FairScheduler, GateVerdict, HeldBack, Hint
from ._scopes import Scope

__version__ = "0.1.0"

__all__ = [
    "AsyncLimiter",
    "AuditEntry",
    "BackendError",
    "BackendUnavailable",
    "BacklogFull",
    "BucketPreview",
    "ConfigError",
    "ConfigSpec",
    "CostExceedsBurst",
    "Decision",
    "Dispatch",
    "DispatchedItem",
    "FairScheduler",
    "GateVerdict",
    "HeldBack",
    "Hint",
    "InvalidCost",
    "InvalidLimit",
    "InvalidName",
    "InvalidScope",
    "InvalidWeight",
    "KeySpace",
    "Limit",
    "LimitNotFound",
    "Limiter",
    "Pause",
    "Preview",
    "RateLimitError",
    "RateLimited",
    "Scope",
    "ScopeLimit",
    "Slot",
    "TooManyPauses",
    "config_from_env",
    "load_config_file",
    "parse_config",
]
