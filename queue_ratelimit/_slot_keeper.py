"""The concurrency slots of jobs running in one worker process.

A slot is taken when a job is admitted (``gate``, ``dispatch``) with a hold on Redis's
clock. The keeper renews the holds of the jobs that are still running, and gives each slot
back when its job ends; a worker that dies stops renewing, and its slots come back when
their hold runs out. Both integrations use it: Celery renews from its timer and releases
from the pool's completion callbacks, RQ from a thread and around ``execute_job``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from ._decision import Slot
from ._errors import RateLimitError
from ._limiter import Limiter

log = logging.getLogger("queue_ratelimit")


class SlotKeeper:
    """Slots held by the running jobs of this process, by job key.

    Args:
        limiter: the limiter the slots were taken from (a callable, built lazily).
        hold: seconds each renewal holds a slot for; renew at least every third of it.
    """

    def __init__(self, limiter: Callable[[], Limiter], hold: float) -> None:
        self._limiter = limiter
        self.hold = hold
        self._slots: dict[str, Slot] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def __len__(self) -> int:
        return len(self._slots)

    def keep(self, key: str, slot: Slot | None) -> None:
        """Remember the slot of a job that is about to run (None: it holds none)."""
        if slot is None:
            return
        with self._lock:
            earlier = self._slots.get(key)
            self._slots[key] = slot
        if earlier is not None and earlier != slot:
            self._give_back(earlier)  # the same job admitted again: the old hold is done

    def forget(self, key: str) -> Slot | None:
        """Stop tracking a job's slot without giving it back (it went back some other way,
        e.g. with the job, to the backlog)."""
        with self._lock:
            return self._slots.pop(key, None)

    def release(self, key: str) -> bool:
        """The job ended: give its slot back. False when it held none."""
        slot = self.forget(key)
        if slot is None:
            return False
        self._give_back(slot)
        return True

    def release_ended(self, running: Iterable[str]) -> int:
        """Give back the slots of tracked jobs that are not in ``running`` any more (ended
        without being reported, e.g. revoked before they ran); how many."""
        alive = set(running)
        with self._lock:
            gone = [k for k in self._slots if k not in alive]
        return sum(self.release(k) for k in gone)

    def renew(self, route: Callable[[Slot], object] = lambda slot: None) -> None:
        """Hold every tracked slot ``hold`` seconds from now. After a renewal fails, the
        slots ``route`` sends to the same place are left for the next time (by default
        all; on a Redis Cluster, the Celery gate routes by primary, so the others go on)."""
        with self._lock:
            slots = list(self._slots.items())
        failed: set[object] = set()
        for key, slot in slots:
            where = route(slot)
            if where in failed:
                continue
            try:
                held = self._limiter().extend_slot(slot, hold=self.hold)
            except RateLimitError as exc:
                log.warning("queue-ratelimit: could not renew concurrency slots: %s", exc)
                failed.add(where)
                continue
            if not held:
                # Its hold ran out first (a Redis outage longer than the hold, or a stalled
                # worker): the cap no longer counts this job. Say so; nothing to give back.
                log.warning(
                    "queue-ratelimit: the concurrency slot of %s ran out while the job ran "
                    "(raise the hold above the longest outage)",
                    key,
                )
                with self._lock:
                    if self._slots.get(key) == slot:
                        del self._slots[key]

    def _give_back(self, slot: Slot) -> None:
        try:
            self._limiter().release(slot)
        except RateLimitError as exc:
            # It comes back by itself when its hold runs out.
            log.warning("queue-ratelimit: could not release a concurrency slot: %s", exc)

    # -- a renewing thread, for workers without a timer (RQ) ------------------------------
    def start(self) -> None:
        """Renew from a daemon thread every third of ``hold`` (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._renewing, name="queue-ratelimit-slots", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _renewing(self) -> None:
        while not self._stop.wait(self.hold / 3):
            if self._slots:
                self.renew()
