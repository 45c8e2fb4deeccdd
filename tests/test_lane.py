"""The queue a message is gated under (``celery/_lane.py``), table-driven over how brokers
say where a message came from, and the same queue read back by the task. Before, the gate
took the routing key when it was one of the worker's queues, else the worker's first queue
(wrong for a worker on several queues whose routing keys are not queue names), and the
task took the routing key whatever it was (tests/test_pause_lane_e2e.py, end to end)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from kombu import Exchange, Queue, binding

from queue_ratelimit.celery._lane import HEADER_LANE, _topic_match, gate_lane, running_queue

TOPIC = Exchange("events", type="topic")
DIRECT = Exchange("jobs", type="direct")
FANOUT = Exchange("all", type="fanout")
QUEUES = [
    Queue("first", DIRECT, routing_key="first.key"),
    Queue("reports", TOPIC, routing_key="report.*.daily"),
    Queue("emails", bindings=[binding(DIRECT, routing_key="mail"), binding(TOPIC, "mail.#")]),
    Queue("broadcast", FANOUT),
]
LANES = [q.name for q in QUEUES]


def consumer(active_tags: dict[str, str] | None = None) -> Any:
    return SimpleNamespace(queues=QUEUES, _active_tags=active_tags or {})


CASES = [
    # (delivery_info, the consumer's {queue: tag}, the lane)
    ({"consumer_tag": "t2", "routing_key": "x"}, {"first": "t1", "emails": "t2"}, "emails"),
    ({"consumer_tag": "gone", "routing_key": "reports"}, {"first": "t1"}, "reports"),
    ({"exchange": "", "routing_key": "emails"}, None, "emails"),  # Celery's default routing
    ({"exchange": "jobs", "routing_key": "mail"}, None, "emails"),  # a second binding
    ({"exchange": "events", "routing_key": "report.eu.daily"}, None, "reports"),
    ({"exchange": "events", "routing_key": "mail.eu.bulk"}, None, "emails"),
    ({"exchange": "events", "routing_key": "report.eu.weekly"}, None, "first"),  # no binding
    ({"exchange": "all", "routing_key": "anything"}, None, "broadcast"),
    ({"exchange": "jobs", "routing_key": "first.key"}, None, "first"),
    ({}, None, "first"),
    ({"exchange": ["x"], "routing_key": {"a": 1}}, None, "first"),  # another producer's junk
]


@pytest.mark.parametrize(("info", "tags", "lane"), CASES)
def test_the_gate_finds_the_queue_a_message_came_from(
    info: dict[str, Any], tags: dict[str, str] | None, lane: str
) -> None:
    message = SimpleNamespace(delivery_info=info, headers={HEADER_LANE: "forged"})
    assert gate_lane(message, LANES, consumer(tags)) == lane
    # Written for the task, over whatever a producer put there.
    assert message.headers[HEADER_LANE] == lane


def test_a_message_without_headers_is_gated_all_the_same() -> None:
    message = SimpleNamespace(delivery_info={"routing_key": "emails"}, headers=None)
    assert gate_lane(message, LANES, consumer()) == "emails"


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("a.*", "a.b", True),
        ("a.*", "a", False),
        ("a.#", "a", True),
        ("a.#.c", "a.x.y.c", True),
        ("a.#.c", "a.x.y", False),
        ("#", "", True),
        ("*.b", "b", False),
        ("a.b", "a.b", True),
        ("#.#.#.#.#.#.#.x", "a." * 5000 + "y", False),  # a long hostile key: linear, no blowup
    ],
)
def test_topic_bindings_match_as_amqp_says(pattern: str, key: str, matches: bool) -> None:
    assert _topic_match(pattern, key) is matches


@pytest.mark.parametrize(
    ("attributes", "queue"),
    [
        ({HEADER_LANE: "emails"}, "emails"),
        ({"headers": {HEADER_LANE: "emails"}}, "emails"),  # only in the headers
        ({}, "rk.jobs"),  # the gate never saw it: the routing key, as before
        ({HEADER_LANE: "a:queue:b"}, "rk.jobs"),  # not a queue name: not used
        ({HEADER_LANE: ["emails"]}, "rk.jobs"),
        ({HEADER_LANE: "x" * 10_000}, "rk.jobs"),
    ],
)
def test_the_task_reads_the_queue_the_gate_wrote(attributes: dict[str, Any], queue: str) -> None:
    request = SimpleNamespace(delivery_info={"routing_key": "rk.jobs"}, headers=None)
    for name, value in attributes.items():
        setattr(request, name, value)
    assert running_queue(request, "celery") == queue
    request.delivery_info = {}
    assert running_queue(request, "celery") == (queue if queue != "rk.jobs" else "celery")
