"""Per-app state of the integration: settings, and the limiter and scheduler it talks to."""

from __future__ import annotations

import threading
from typing import Any

from .._breaker import Backoff
from .._client import redis_client
from .._limiter import Limiter
from .._scheduler import FairScheduler
from ._settings import CelerySettings

APP_ATTRIBUTE = "queue_ratelimit"


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
                    # Bounded waits (queue_ratelimit._client), so that a Redis that stops
                    # answering (rather than refusing connections) trips the fail mode
                    # instead of freezing the consumer loop; timeouts in the URL win. After
                    # one timeout, calls fail at once until Redis answers a probe.
                    client = redis_client(self.settings.redis_url or "", backoff=self._backoff())
                    self._limiter = Limiter(
                        client,
                        namespace=self.settings.namespace,
                        fail_mode="raise",
                        eviction=self.settings.eviction,
                        counter_retention=self.settings.counter_retention,
                        shards=self.settings.shards,
                    )
        return self._limiter

    def _backoff(self) -> Backoff | None:
        """``redis_backoff``, probing at least every sixth of ``lease``: after an outage the
        gate renews its leases (and sends the settlements it held) as soon as Redis answers,
        which must be within a sixth of a lease for the outages too short to be found as a
        silence (lua/buckets.lua, "Silences"), and within a lease for the others."""
        backoff = self.settings.redis_backoff
        if backoff is None:
            return None
        most = min(backoff[1], max(self.settings.lease / 6, 0.1))
        return min(backoff[0], most), most

    @property
    def scheduler(self) -> FairScheduler:
        if self._scheduler is None:
            with self._lock:
                if self._scheduler is None:
                    self._scheduler = FairScheduler(
                        self.limiter,
                        lease=self.settings.lease,
                        transit_grace=self.settings.transit_grace,
                    )
        return self._scheduler


def runtime_of(app: Any) -> Runtime | None:
    """The integration's state on ``app``, or None when ``install`` was not called."""
    runtime = getattr(app, APP_ATTRIBUTE, None)
    return runtime if isinstance(runtime, Runtime) else None
