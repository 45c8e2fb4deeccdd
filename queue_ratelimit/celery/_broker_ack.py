"""Acknowledging a batch of parked messages to the broker at once.

A batch of messages goes into the fair backlog in one round trip; acknowledging them one by
one then costs the consumer a round trip each. With kombu's Redis transport an ack is a
pipeline of two commands on the broker, so the acks of one batch go in one pipeline: the
same commands, in one write. Any other transport (AMQP acks are already one frame each,
without a reply) is acknowledged message by message, as Celery would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("queue_ratelimit.celery")

try:  # kombu's Redis transport needs redis-py, which this package always has
    from kombu.transport import redis as _redis_transport
    from kombu.transport import virtual as _virtual
except ImportError:  # pragma: no cover
    _redis_transport = None  # type: ignore[assignment]


def is_plain_ack(ack: Any, message: Any) -> bool:
    """Whether the ack Celery gave a strategy does nothing but acknowledge ``message``:
    ``message.ack_log_error`` itself, or a promise of it with nothing chained (after a
    reconnect Celery chains a prefetch restore: such acks go the ordinary way)."""
    args = getattr(ack, "args", None)
    target = args[0] if isinstance(args, tuple) and len(args) == 1 else ack
    if getattr(target, "__self__", None) is not message:
        return False
    if getattr(target, "__name__", "") != "ack_log_error":
        return False
    return not getattr(ack, "_svpending", None) and not getattr(ack, "_lvpending", None)


def _redis_qos(message: Any) -> Any:
    """The kombu Redis transport's QoS that would ack ``message``; None for any other."""
    if _redis_transport is None or message.acknowledged:
        return None
    channel = message.channel
    qos = getattr(channel, "qos", None)
    if not isinstance(qos, _redis_transport.QoS) or channel.no_ack_consumers:
        return None
    return qos


def ack_all(
    messages: Sequence[Any], ack_one: Callable[[Any], None], errors: tuple[type[BaseException], ...]
) -> None:
    """Acknowledge ``messages``: in one pipeline per Redis-transport channel, else each with
    ``ack_one``. ``errors`` are the connection errors logged rather than raised (as
    Celery's own ``ack_log_error`` does): such a message stays unacknowledged and the broker
    delivers it again, which the gate recognises as a duplicate."""
    groups: dict[int, tuple[Any, list[Any]]] = {}
    for message in messages:
        qos = _redis_qos(message)
        if qos is None:
            ack_one(message)
        else:
            groups.setdefault(id(qos), (qos, []))[1].append(message)
    for qos, batch in groups.values():
        if len(batch) == 1:
            ack_one(batch[0])
            continue
        try:
            with qos.pipe_or_acquire() as pipe:
                for message in batch:
                    qos._remove_from_indices(message.delivery_tag, pipe)
                pipe.execute()
        except errors as exc:
            log.error("queue-ratelimit: could not acknowledge %d messages: %r", len(batch), exc)
            continue
        except AttributeError:  # a kombu without these internals: the ordinary way
            for message in batch:
                ack_one(message)
            continue
        for message in batch:
            _virtual.QoS.ack(qos, message.delivery_tag)  # kombu's own bookkeeping
            message._state = "ACK"
