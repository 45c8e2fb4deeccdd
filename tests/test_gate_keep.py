"""What the Celery gate does with a message it must keep (closed fail mode, a park in doubt,
a redelivery it cannot check yet): it holds it unacknowledged and never hands it back to
the broker, which would deliver it again at once (a loop for as long as an outage lasts).
Messages Redis must vet raise the prefetch window, and on a cluster so do messages held for
their own primary while another answers; at most ``max_held`` of them in all."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from queue_ratelimit import BackendUnavailable
from queue_ratelimit.celery._gate import Delivery, RateLimitGate
from queue_ratelimit.celery._health import GateHealth, RedisHealth


class Qos:
    def __init__(self) -> None:
        self.raised = 0

    def increment_eventually(self) -> None:
        self.raised += 1

    def decrement_eventually(self) -> None:
        self.raised -= 1


class Keeping(RateLimitGate):
    """The gate with only what ``_keep`` reads."""

    _max_held = 4  # type: ignore[assignment]


def gate(outage: str) -> tuple[Any, RedisHealth]:
    """A gate whose Redis is one server or a 3-primary cluster (``outage``: "one server",
    "partial": one primary down, "full": all three), and the health of the primary the
    kept messages' tenant lives on (down)."""
    g = object.__new__(Keeping)
    g.waiting = []
    g.consumer = SimpleNamespace(qos=Qos())
    g.health = GateHealth(lambda: RedisHealth("closed"))
    if outage != "one server":  # (the primaries as the gate has seen them)
        g.health._by_node = {f"127.0.0.1:700{n}": RedisHealth("closed") for n in range(3)}
    healths = list(g.health._by_node.values()) or [g.health.one]
    for h in healths[: 1 if outage != "full" else None]:
        h.failed(BackendUnavailable("stopped"), 0.0)
    return g, healths[0]


def delivery(*, redelivered: bool = False, in_doubt: bool = False) -> Delivery:
    message = SimpleNamespace(delivery_info={"redelivered": redelivered})

    def never() -> None:
        raise AssertionError("not expected here")

    d = Delivery(job=None, message=message, run=never, ack=never)  # type: ignore[arg-type]
    d.in_doubt = in_doubt
    return d


@pytest.mark.parametrize(
    ("kinds", "outage", "raised"),
    [
        # held for a full backlog: within the broker's window, which is never raised
        (["backlog"] * 20, "partial", 0),
        # held by the fail mode: within the window on one server or when every primary is
        # out (new work would only be held too); on a cluster where another primary
        # answers, the window is raised for it, so that the live primaries' work comes in
        (["fail_mode"] * 20, "one server", 0),
        (["fail_mode"] * 20, "full", 0),
        (["fail_mode"] * 3, "partial", 3),
        (["fail_mode"] * 20, "partial", 4),
        # a redelivery or a park in doubt raises the window while it waits, up to max_held
        (["redelivered"] * 3, "one server", 3),
        (["redelivered"] * 20, "full", 4),
        (["in_doubt", "redelivered", "fail_mode"] * 5, "one server", 4),
        # the same max_held for both: what is held stays <= the window + max_held
        (["fail_mode", "fail_mode", "redelivered"] * 2, "partial", 4),
        (["fail_mode"] * 4 + ["in_doubt"] * 2, "partial", 4),
    ],
)
def test_every_kept_message_is_held_and_the_window_grows_by_at_most_max_held(
    kinds: list[str], outage: str, raised: int
) -> None:
    g, out = gate(outage)
    for kind in kinds:
        d = delivery(redelivered=kind == "redelivered", in_doubt=kind == "in_doubt")
        assert g._keep(d, None if kind == "backlog" else out) is None
    assert len(g.waiting) == len(kinds)  # none handed back
    assert g.consumer.qos.raised == raised
    assert sum(d.counted for d in g.waiting) == raised


def test_a_keep_once_every_primary_is_out_no_longer_raises_the_window() -> None:
    """The primaries' healths are read at each keep: once the others are out too (a full
    outage), a message kept again (each retry keeps it anew) no longer raises the window."""
    g, out = gate("partial")
    d = delivery()
    g._keep(d, out)
    assert d.counted
    for h in g.health._by_node.values():
        h.failed(BackendUnavailable("stopped"), 0.0)
    g.waiting.clear()
    g._uncount(d)  # (as a retry does before it decides the message again)
    g._keep(d, out)
    assert not d.counted
    assert g.consumer.qos.raised == 0
