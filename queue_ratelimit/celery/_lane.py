"""The queue a task message is gated under (its lane), and the same queue for the task.

A message names no queue: the broker hands it over with the exchange and routing key it
was published with, and those name a queue only under Celery's default routing (the
routing key is the queue's name). With a topic or direct exchange whose routing keys are
not queue names, the routing key says nothing of the queue. The gate finds the queue the
worker consumed the message from: by the consumer tag (AMQP brokers say which consumer,
hence which queue, a message came to), else by the routing key when it is one of the
worker's queues, else by the bindings the worker declared for its queues (Redis and other
virtual transports route by them, and say nothing more), else the worker's first queue.

The gate writes what it found into the message's headers (``qrl_lane``) before anything
runs, so the task (``pause_and_retry(scope="queue")``, ``strict_pauses``) names the queue
the gate decided under, never a routing key that is not one. A producer's own ``qrl_lane``
is overwritten by the gate; a task without one (not gated) falls back to the routing key.
"""

from __future__ import annotations

from typing import Any

from kombu.utils.functional import maybe_list

from .._errors import RateLimitError
from .._scopes import check_name

HEADER_LANE = "qrl_lane"


def gate_lane(message: Any, lanes: list[str], task_consumer: Any) -> str:
    """The queue ``message`` came from among the worker's ``lanes`` (see the module's
    text), written into its headers for the task to read (``running_queue``)."""
    lane = _lane(message.delivery_info or {}, lanes, task_consumer)
    headers = message.headers
    if isinstance(headers, dict):
        headers[HEADER_LANE] = lane
    return lane


def _lane(delivery_info: dict[str, Any], lanes: list[str], task_consumer: Any) -> str:
    tag = delivery_info.get("consumer_tag")
    if tag is not None:
        # (kombu's Consumer keeps {queue name: consumer tag}; no public way to ask it.)
        for name, active in (getattr(task_consumer, "_active_tags", None) or {}).items():
            if active == tag and name in lanes:
                return str(name)
    routing_key = delivery_info.get("routing_key")
    if routing_key in lanes:
        return str(routing_key)
    exchange = delivery_info.get("exchange")
    if isinstance(routing_key, str) and isinstance(exchange, str):
        for queue in maybe_list(getattr(task_consumer, "queues", None)) or []:
            if queue.name in lanes and _bound(queue, exchange, routing_key):
                return str(queue.name)
    return lanes[0]


def _bound(queue: Any, exchange: str, routing_key: str) -> bool:
    """Whether ``queue`` (a kombu Queue) is bound to ``exchange`` for ``routing_key``, as
    the worker declared it."""
    bindings = [(queue.exchange, queue.routing_key)]
    bindings += [(b.exchange, b.routing_key) for b in getattr(queue, "bindings", None) or ()]
    for bound_to, key in bindings:
        if bound_to is None or getattr(bound_to, "name", None) != exchange:
            continue
        kind = getattr(bound_to, "type", "direct")
        if kind == "fanout" or (kind == "direct" and key == routing_key):
            return True
        if kind == "topic" and isinstance(key, str) and _topic_match(key, routing_key):
            return True
    return False


def _topic_match(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: dot-separated words, ``*`` one word, ``#`` zero or more (one
    pass per pattern word: a long hostile routing key costs its length times the
    pattern's)."""
    words = routing_key.split(".")
    # reach[j]: the pattern words so far can match the routing key's first j words.
    reach = [True] + [False] * len(words)
    for part in pattern.split("."):
        if part == "#":
            for j in range(1, len(reach)):
                reach[j] = reach[j] or reach[j - 1]
        else:
            reach = [False] + [
                reach[j] and (part == "*" or part == words[j]) for j in range(len(words))
            ]
    return reach[-1]


def running_queue(request: Any, default_queue: str) -> str:
    """The queue a running task was gated under: the gate's ``qrl_lane`` header, else (a
    message the gate did not see) its routing key, else ``default_queue``."""
    lane = getattr(request, HEADER_LANE, None)
    if lane is None:
        lane = (getattr(request, "headers", None) or {}).get(HEADER_LANE)
    if isinstance(lane, str):
        try:
            return check_name("queue", lane)
        except RateLimitError:
            pass
    return (request.delivery_info or {}).get("routing_key") or default_queue
