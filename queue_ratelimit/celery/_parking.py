"""Turning a broker message into a backlog payload and back, losslessly."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

from kombu.message import Message
from kombu.utils import json

# Delivery fields worth keeping: where the message was routed and its broker priority.
_DELIVERY_KEYS = ("exchange", "routing_key", "priority")


def encode_message(message: Message) -> bytes:
    """Everything a worker needs to run the message later, as JSON bytes."""
    body = message.body
    raw = body if isinstance(body, bytes) else str(body).encode("utf-8")
    headers = dict(message.headers or {})
    # The body is stored as received, i.e. already decompressed by kombu.
    headers.pop("compression", None)
    doc = {
        "body": base64.b64encode(raw).decode("ascii"),
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "headers": headers,
        "properties": dict(message.properties or {}),
        "delivery_info": {k: message.delivery_info.get(k) for k in _DELIVERY_KEYS},
    }
    return json.dumps(doc).encode("utf-8")


class BacklogChannel:
    """Stands in for a broker channel for messages re-admitted from the fair backlog.

    Celery acknowledges or rejects a message through ``message.channel``; for a message
    that came from the backlog that must close its in-flight record in Redis instead.
    """

    no_ack_consumers = None

    def __init__(
        self, on_ack: Callable[[str], None], on_reject: Callable[[str, bool], None]
    ) -> None:
        self._on_ack = on_ack
        self._on_reject = on_reject

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        self._on_ack(delivery_tag)

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self._on_reject(delivery_tag, requeue)


def decode_message(
    payload: bytes, item_id: str, channel: BacklogChannel, accept: Any = None
) -> Message:
    """Rebuild the kombu message parked by ``encode_message``; its delivery tag is the
    backlog item id, and acking it acks the item."""
    doc = json.loads(payload)
    delivery_info = dict(doc["delivery_info"])
    delivery_info["redelivered"] = False
    return Message(
        body=base64.b64decode(doc["body"]),
        delivery_tag=item_id,
        content_type=doc["content_type"],
        content_encoding=doc["content_encoding"],
        delivery_info=delivery_info,
        properties=doc["properties"],
        headers=doc["headers"],
        channel=channel,
        accept=accept,
    )


def from_backlog(message: Message) -> bool:
    """True for a message re-admitted from the fair backlog (its tokens are already taken)."""
    return isinstance(message.channel, BacklogChannel)
