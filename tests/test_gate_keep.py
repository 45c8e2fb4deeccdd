"""What the Celery gate does with a message it must keep (closed fail mode, a park in doubt,
a redelivery it cannot check yet): it holds it unacknowledged and never hands it back to
the broker, which would deliver it again at once (a loop for as long as an outage lasts).
Only messages Redis must vet raise the prefetch window, at most ``max_held`` of them."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from queue_ratelimit.celery._gate import Delivery, RateLimitGate


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


def gate() -> Any:
    g = object.__new__(Keeping)
    g.waiting = []
    g.consumer = SimpleNamespace(qos=Qos())
    return g


def delivery(*, redelivered: bool = False, in_doubt: bool = False) -> Delivery:
    message = SimpleNamespace(delivery_info={"redelivered": redelivered})

    def never() -> None:
        raise AssertionError("not expected here")

    d = Delivery(job=None, message=message, run=never, ack=never)  # type: ignore[arg-type]
    d.in_doubt = in_doubt
    return d


@pytest.mark.parametrize(
    ("kinds", "raised"),
    [
        # held by the fail mode: within the broker's window, which is never raised
        (["plain"] * 20, 0),
        # a redelivery or a park in doubt raises the window while it waits, up to max_held
        (["redelivered"] * 3, 3),
        (["redelivered"] * 20, 4),
        (["in_doubt", "redelivered", "plain"] * 5, 4),
    ],
)
def test_every_kept_message_is_held_and_the_window_grows_by_at_most_max_held(
    kinds: list[str], raised: int
) -> None:
    g = gate()
    for kind in kinds:
        assert (
            g._keep(delivery(redelivered=kind == "redelivered", in_doubt=kind == "in_doubt"))
            is None
        )
    assert len(g.waiting) == len(kinds)  # none handed back
    assert g.consumer.qos.raised == raised
    assert sum(d.counted for d in g.waiting) == raised
