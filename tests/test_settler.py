"""The Celery gate's asynchronous settler: settlements written now, replies read later."""

from __future__ import annotations

import pytest
import redis

from queue_ratelimit import FairScheduler, Limiter
from queue_ratelimit.celery._settler import AsyncSettler


def test_a_failed_send_leaves_what_was_sent_before_in_doubt_not_lost(limiter: Limiter) -> None:
    """A settlement written before the connection broke under a later one has an unknown
    outcome: ``collect`` reports it as such (the gate then settles it the ordinary way).
    It raised AttributeError from Celery's timer instead, and the settlement was forgotten:
    the record stayed open until its lease ran out and the job ran a second time."""
    scheduler = FairScheduler(limiter)
    settler = AsyncSettler(scheduler)
    for item_id in ("a", "b"):
        scheduler.submit("acme", item_id, queue="q")
    first, second = scheduler.dispatch(["q"], max_items=2).items
    if not settler.usable:  # known once the scheduler has made a call
        pytest.skip("the asynchronous settler needs Redis Functions")
    settler.send(first, "ack", 60, False)

    def broken(*_: object, **__: object) -> None:
        raise redis.ConnectionError("the server went away")

    settler._conn.send_packed_command = broken
    with pytest.raises(redis.ConnectionError):
        settler.send(second, "ack", 60, False)
    assert settler.collect() == [(first.id, "ack", None)]
    assert settler.pending == 0
    # It had reached Redis (only its reply was lost): one record is still open, the
    # second's, and the settler closes it on a new connection.
    assert scheduler.in_flight() == 1
    settler.send(second, "ack", 60, False)
    assert settler.collect() == [(second.id, "ack", True)]
    assert scheduler.in_flight() == 0
