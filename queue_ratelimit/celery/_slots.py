"""Worker slot accounting: how busy this worker's pool is, and a wake-up when a job ends.

The gate asks two questions of it: is the pool saturated (then arriving work waits in the
fair backlog, where every worker serves it in weighted-fair order, instead of queueing FIFO
behind this worker's pool), and how many re-admitted jobs may it take now.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from celery.worker.state import reserved_requests


class PoolSlots:
    """Counts the jobs this worker has taken on against the jobs it may take on.

    "Taken on" is Celery's own count of reserved requests: every request handed to the pool
    and not yet finished, running or waiting for a process. Arriving work is parked once
    ``threshold`` are taken on (every process busy, one more job queued each); re-admitted
    work fills the worker up to ``reserve``, in batches of at least ``refill``, so a process
    that finishes a job starts the next without waiting for a round trip to Redis.

    Args:
        consumer: the Celery consumer (its ``pool`` is watched for finished jobs).
        reserve: jobs taken on at once; None: four times the pool size.
        on_free: called (in the thread that finished the job) after a job ends, with the
            job's Celery request (None if the pool did not say which).
    """

    def __init__(self, consumer: Any, reserve: int | None, on_free: Callable[[Any], None]) -> None:
        self.consumer = consumer
        self._reserve = reserve
        self._on_free = on_free
        self._watched: Any = None
        # Whether the namespace has concurrency caps (the gate looks now and then).
        self.capped = False

    @property
    def concurrency(self) -> int:
        """The pool size (processes or threads)."""
        pool = getattr(self.consumer, "pool", None)
        size = getattr(pool, "num_processes", None) or getattr(pool, "limit", None)
        return int(size or self.consumer.initial_prefetch_count or 1)

    @property
    def reserve(self) -> int:
        """Jobs kept at once, as configured: by default four per process; no more than
        the pool size while concurrency caps are configured (``capped``), since a job
        waiting here for a process would hold a slot of its cap without running."""
        reserve = self._reserve or 4 * self.concurrency
        return min(reserve, self.concurrency) if self.capped else reserve

    @property
    def threshold(self) -> int:
        """Jobs taken on from the broker before arriving work is parked: every process busy
        and one more queued each, but never more than the prefetch count (past it the
        broker hands out no more messages, so a larger threshold would never be reached
        and nothing would ever be parked)."""
        threshold = min(self.reserve, 2 * self.concurrency)
        qos = getattr(self.consumer, "qos", None)
        prefetch = int(getattr(qos, "value", 0) or 0)
        return min(threshold, prefetch) if prefetch > 0 else threshold

    @property
    def refill(self) -> int:
        """Free slots worth a round trip to the backlog: half the reserve, so each refill
        brings a batch while every process still has a job queued."""
        return max(1, self.reserve // 2)

    @staticmethod
    def taken() -> int:
        return len(reserved_requests)

    def saturated(self, coming: int = 0) -> bool:
        """True when every process is busy and has work queued behind it, counting
        ``coming`` jobs already asked of the backlog (their reply is on its way)."""
        return self.taken() + coming >= self.threshold

    def free(self) -> int:
        """How many more jobs the worker may take on now."""
        return max(0, self.reserve - self.taken())

    def watch(self) -> None:
        """Be told when the pool finishes a job (success or failure).

        Celery binds ``pool.apply_async`` into each task's request class when the task
        strategies are built, after the consumer steps are constructed: wrapping it here
        (from the step's ``__init__``) puts the wrapper into every request's path.
        """
        pool = getattr(self.consumer, "pool", None)
        if pool is None or self._watched is pool:
            return
        original = pool.apply_async
        on_free = self._on_free

        def finished(callback: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                try:
                    return callback(*args, **kwargs)
                finally:
                    # The callbacks are the request's own methods (on_success, on_failure).
                    on_free(getattr(callback, "__self__", None))

            return call

        def apply_async(*args: Any, **options: Any) -> Any:
            for name in ("callback", "error_callback"):
                callback = options.get(name)
                if callback is not None:
                    options[name] = finished(callback)
            return original(*args, **options)

        pool.apply_async = apply_async
        self._watched = pool


class Wakeup:
    """A one-shot timer on the consumer's loop that can be pulled earlier, from any thread.

    Thread pools finish jobs on their own threads; the lock keeps the single pending timer
    entry consistent between them and the consumer.
    """

    def __init__(self, timer: Callable[[], Any], action: Callable[[], None]) -> None:
        self._timer = timer
        self._action = action
        self._lock = threading.Lock()
        self._entry: Any = None
        self._due = 0.0

    def at(self, due: float, delay: float) -> None:
        """Run the action after ``delay`` s (``due`` on the monotonic clock) unless it is
        already due sooner."""
        with self._lock:
            if self._entry is not None:
                if self._due <= due + 0.0005:
                    return
                self._entry.cancel()
            self._entry = self._timer().call_after(delay, self._fire)
            self._due = due

    def _fire(self) -> None:
        with self._lock:
            self._entry = None
        self._action()

    def cancel(self) -> None:
        with self._lock:
            if self._entry is not None:
                self._entry.cancel()
            self._entry = None
