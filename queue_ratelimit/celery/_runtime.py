"""Per-app state of the integration: settings, and the limiter and scheduler it talks to."""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

from .._limiter import Limiter
from .._scheduler import FairScheduler
from ._settings import CelerySettings

APP_ATTRIBUTE = "queue_ratelimit"
# Seconds a Redis call of the gate may take before the fail mode decides.
REDIS_TIMEOUT = 2.0


def _url_options(url: str) -> dict[str, Any]:
    """The timeouts a URL sets itself (redis-py parses them; we only must not override)."""
    query = parse_qs(urlsplit(url).query)
    return {
        name: float(query[name][0])
        for name in ("socket_timeout", "socket_connect_timeout")
        if name in query
    }


class Runtime:
    """What ``install`` attaches to the Celery app (as ``app.queue_ratelimit``)."""

    def __init__(self, app: Any, settings: CelerySettings) -> None:
        self.app = app
        self.settings = settings
        # Reentrant: the scheduler property builds the limiter while holding it.
        self._lock = threading.RLock()
        self._limiter: Limiter | None = None
        self._scheduler: FairScheduler | None = None

    @property
    def limiter(self) -> Limiter:
        """Created on first use, so a prefork parent does not share sockets with children
        (redis-py also resets its pool after a fork)."""
        if self._limiter is None:
            with self._lock:
                if self._limiter is None:
                    # Timeouts, so that a Redis that stops answering (rather than refusing
                    # connections) trips the fail mode instead of freezing the consumer
                    # loop; options in the URL (?socket_timeout=...) still win.
                    client = redis.Redis.from_url(
                        self.settings.redis_url or "",
                        **{
                            "socket_timeout": REDIS_TIMEOUT,
                            "socket_connect_timeout": REDIS_TIMEOUT,
                            **_url_options(self.settings.redis_url or ""),
                        },
                    )
                    self._limiter = Limiter(
                        client,
                        namespace=self.settings.namespace,
                        fail_mode="raise",
                        counter_retention=self.settings.counter_retention,
                    )
        return self._limiter

    @property
    def scheduler(self) -> FairScheduler:
        if self._scheduler is None:
            with self._lock:
                if self._scheduler is None:
                    self._scheduler = FairScheduler(self.limiter, lease=self.settings.lease)
        return self._scheduler


def runtime_of(app: Any) -> Runtime | None:
    """The integration's state on ``app``, or None when ``install`` was not called."""
    runtime = getattr(app, APP_ATTRIBUTE, None)
    return runtime if isinstance(runtime, Runtime) else None
