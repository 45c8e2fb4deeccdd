"""A Celery message's id in the fair backlog: what tells a broker redelivery of a message
the gate took over (drop it) from a new message that reuses a task id (run it).

Task ids are reused on purpose: ``Task.replace`` gives the replacement the replaced task's
id, and callers choose ids (``apply_async(task_id=...)``). The id is therefore the task id
and retry count plus the best identity of the *publish* the message carries:

1. the nonce the publish hook adds to every message (``qrl_nonce``; a producer with the
   plugin): a redelivery carries the same one, a new publish a new one;
2. else the broker's delivery tag, where it is made once per publish and kept through
   redeliveries (kombu's Redis transport: a UUID in the stored message);
3. else nothing exact (a producer without the plugin on RabbitMQ, say): the id takes the
   ``replaced_task_nesting`` header when it is set, so a replacement published by such a
   producer still differs from the task it replaced, and the gate (``RateLimitGate``) treats
   a copy of a known id that the broker says was never delivered before as a new message.

Whatever the headers hold (any type, any size, from any producer), the result is a valid
backlog item id: parts that are not short printable text are replaced by a digest of their
``repr``, the same for every copy of the message.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from ._options import HEADER_NONCE

_TAG = re.compile(r"[0-9a-fA-F-]{16,64}")
# Brokers whose delivery tag names the publish, not the delivery (see the module docstring).
STABLE_TAG_TRANSPORTS = frozenset({"redis"})
# Brokers that flag every redelivery (AMQP's ``redelivered``): a message without the flag
# was never delivered to anyone before.
FLAGGED_REDELIVERY_TRANSPORTS = frozenset({"amqp"})


def _digest(value: object) -> str:
    try:
        text = repr(value)
    except Exception:  # an object from a pickled message whose repr fails
        text = f"<{type(value).__qualname__}>"
    raw = text.encode("utf-8", "backslashreplace")
    return "x" + hashlib.blake2b(raw, digest_size=12).hexdigest()


def _part(value: object, default: str) -> str:
    """``value`` as it is if it is short printable ASCII text without spaces (backlog ids
    are space-separated in places) or a small whole number, else a digest of it."""
    if value is None:
        return default
    if type(value) is str:  # the hot path: a Celery task id
        if 0 < len(value) <= 128 and value.isascii() and value.isprintable() and " " not in value:
            return value
    elif type(value) is int and 0 <= value < 10**12:
        return str(value)
    return _digest(value)


# What a protocol 1 message keeps in its body that protocol 2 keeps in its headers, and
# the gate reads: the task's name, id, retry count and ETA.
_PROTOCOL_1_FIELDS = ("task", "id", "retries", "eta")


def task_fields(message: Any) -> Mapping[str, Any]:
    """The fields of a task message the gate reads (task, id, retries, eta, the rate
    options and nonce): its headers, in Celery's task protocol 2. Protocol 1
    (``task_protocol=1``) keeps the task's name, id, retries and eta in the body, and the
    headers hold only what was added to them (the publish hook's rate options and nonce):
    those body fields, with the headers over them. A body that cannot be decoded gives the
    headers alone (Celery rejects such a message itself)."""
    headers = message.headers or {}
    if "task" in headers:  # protocol 2: the hot path
        return headers
    try:
        body = message.payload
    except Exception:  # any body, any content type: Celery's to refuse
        return headers
    if not isinstance(body, dict) or "task" not in body:
        return headers
    return {**{k: body.get(k) for k in _PROTOCOL_1_FIELDS}, **headers}


def publish_identity(headers: Mapping[str, Any], delivery_tag: object = None) -> str | None:
    """The nonce of the publish (``qrl_nonce``), else a stable delivery tag, else None."""
    nonce = headers.get(HEADER_NONCE)
    if type(nonce) is str and len(nonce) <= 32 and nonce.isascii() and nonce.isalnum():
        return nonce
    if isinstance(delivery_tag, str) and _TAG.fullmatch(delivery_tag):
        return delivery_tag.replace("-", "")
    return None


def backlog_id(headers: Mapping[str, Any], delivery_tag: object = None) -> tuple[str, bool]:
    """The backlog id of a message with these headers, and whether it names the publish
    (a nonce or a stable delivery tag: a copy of it can only be a redelivery).

    Args:
        delivery_tag: the broker's delivery tag, given only for brokers that keep it through
            redeliveries (``STABLE_TAG_TRANSPORTS``).
    """
    item_id = f"{_part(headers.get('id'), 'none')}.{_part(headers.get('retries'), '0')}"
    identity = publish_identity(headers, delivery_tag)
    if identity is not None:
        return f"{item_id}.{identity}", True
    nesting = headers.get("replaced_task_nesting")
    if type(nesting) is int and nesting > 0:
        item_id = f"{item_id}.n{_part(nesting, '0')}"
    return item_id, False


def item_id_of(headers: Mapping[str, Any], delivery_tag: object = None) -> str:
    """The backlog id of a message with these headers (see ``backlog_id``)."""
    return backlog_id(headers, delivery_tag)[0]
