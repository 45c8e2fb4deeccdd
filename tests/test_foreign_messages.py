"""Rate options and ids as other programs write them: Celery message headers and RQ job meta
of any shape, read the way workers read them (no worker per example).

The invariants: reading never raises anything but the typed errors (``InvalidName``,
``InvalidCost``); where a worker reads them, a malformed value gives a logged error and the
documented defaults, never an exception; every message gets a valid backlog id, the same
for every copy of it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rq_e2e_jobs import Unreadable

from queue_ratelimit import InvalidCost, InvalidName
from queue_ratelimit._job_options import read_rate_options
from queue_ratelimit._scopes import check_item_id as _check_item_id
from queue_ratelimit._scopes import check_name, check_priority
from queue_ratelimit.celery import CelerySettings
from queue_ratelimit.celery._gate import RateLimitGate, _due_later
from queue_ratelimit.celery._identity import item_id_of, publish_identity
from queue_ratelimit.celery._options import HeaderOptions, RateOptions, resolve
from queue_ratelimit.rq._options import rate_options, stored_rate_options

SETTINGS = CelerySettings(redis_url="redis://127.0.0.1:1/0")
DEFAULTS = RateOptions("default", "normal", 1.0)
TYPED = (InvalidName, InvalidCost)


# -- what other producers send ---------------------------------------------------------------
class _BadFloat(int):
    """An int whose float() raises (int subclasses pass the type check)."""

    def __float__(self) -> float:
        raise ValueError("float")


class _BadStr(str):
    """A str whose hash and == raise."""

    def __hash__(self) -> int:
        raise RuntimeError("hash")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("eq")


def _deep(depth: int) -> list[Any]:
    nested: list[Any] = []
    for _ in range(depth):
        nested = [nested]
    return nested


PLAIN_NASTY = [
    None,
    "",
    " ",
    "\x00",
    "x" * 100_000,
    "é" * 200,
    "tenant:*",
    "acme corp",
    "urgent",  # a priority name that parses, with no weight
    "HIGH",
    float("nan"),
    float("inf"),
    -1,
    0,
    True,
    2**1100,
    10**400,
    -(2**63),
    1e-320,
    [1],
    ["a"],
    {"x": 1},
    {},
    [],
    b"bytes",
]
# Objects only pickle carries (their repr may fail: kept out of hypothesis's examples).
NASTY = [*PLAIN_NASTY, _deep(5_000), Unreadable(), _BadFloat(3), _BadStr("acme")]

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63, max_value=2**1100)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=300)
    | st.sampled_from(PLAIN_NASTY)
    | st.builds(Unreadable)
    | st.builds(_BadFloat, st.integers(1, 5))
    | st.builds(_BadStr, st.sampled_from(["acme", "high"]))
    | st.builds(_deep, st.just(5_000)),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
# The rate options: mostly valid ones, so both sides of every check are reached.
tenants = st.sampled_from(["acme", "default", "a.b-c@d/e"]) | json_like
priorities = st.sampled_from(["high", "normal", "low"]) | json_like
costs = st.sampled_from([1, 2.5, 1e12]) | json_like
absent = object()


def _headers(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not absent}


def _is_valid(options: RateOptions) -> bool:
    check_name("tenant", options.tenant)
    check_priority(options.priority)
    return math.isfinite(options.cost) and 0 < options.cost <= 1e12


@contextmanager
def _logged(name: str) -> Iterator[list[logging.LogRecord]]:
    """Records logged on ``name`` (hypothesis examples cannot share pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# -- read_rate_options ---------------------------------------------------------------------------
@pytest.mark.parametrize("value", NASTY, ids=range(len(NASTY)))
@pytest.mark.parametrize("position", [0, 1, 2])
def test_read_rate_options_raises_only_typed_errors(value: Any, position: int) -> None:
    given_values: list[Any] = ["acme", "high", 2]
    given_values[position] = value
    try:
        found = read_rate_options(*given_values)
    except TYPED:
        return
    assert _is_valid(RateOptions(*found))
    if value is None:
        assert found[position] == ("default", "normal", 1.0)[position]


# -- Celery: headers through the gate's parsing ----------------------------------------------
@given(
    tenant=tenants | st.just(absent),
    priority=priorities | st.just(absent),
    cost=costs | st.just(absent),
)
@settings(max_examples=400, deadline=None)
def test_header_options_give_valid_options_or_a_typed_error(
    tenant: Any, priority: Any, cost: Any
) -> None:
    read = HeaderOptions(SETTINGS)
    headers = _headers(qrl_tenant=tenant, qrl_priority=priority, qrl_cost=cost)
    for _ in range(2):  # the second time through the memo, if it was remembered
        try:
            options = read(headers)
        except TYPED:
            continue
        assert _is_valid(options)
        assert type(options.tenant) is str
        assert type(options.priority) is str
        assert options.tenant == (str.__str__(tenant) if isinstance(tenant, str) else "default")


def _gate(stable_tags: bool) -> RateLimitGate:
    """The gate's message parsing without a worker: only what ``_job`` reads is set."""
    gate = RateLimitGate.__new__(RateLimitGate)
    gate.consumer = SimpleNamespace(app=SimpleNamespace(tasks={"capp.work": object()}))
    gate.header_options = HeaderOptions(SETTINGS)
    gate.lanes = ["celery"]
    gate._stable_tags = stable_tags
    return gate


def _message(headers: dict[str, Any], tag: Any = "0f9e1c0a-1111-4222-8333-944445555666") -> Any:
    return SimpleNamespace(
        headers=headers, delivery_tag=tag, delivery_info={"routing_key": "celery"}, channel=None
    )


@given(
    tenant=tenants | st.just(absent),
    priority=priorities | st.just(absent),
    cost=costs | st.just(absent),
    task_id=st.text(max_size=40) | json_like,
    retries=st.integers(min_value=0, max_value=5) | json_like,
    nonce=st.text(alphabet="0123456789abcdef", min_size=32, max_size=32) | json_like,
    nesting=st.integers(min_value=0, max_value=3) | json_like,
    eta=st.just("2020-01-01T00:00:00") | json_like,
    tag=st.uuids().map(str) | json_like,
    stable_tags=st.booleans(),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_gate_reads_any_message_into_a_job_with_valid_options_and_id(
    tenant: Any,
    priority: Any,
    cost: Any,
    task_id: Any,
    retries: Any,
    nonce: Any,
    nesting: Any,
    eta: Any,
    tag: Any,
    stable_tags: bool,
) -> None:
    headers = _headers(
        task="capp.work",
        id=task_id,
        retries=retries,
        qrl_tenant=tenant,
        qrl_priority=priority,
        qrl_cost=cost,
        qrl_nonce=nonce,
        replaced_task_nesting=nesting,
        eta=eta,
    )
    message = _message(headers, tag)
    gate = _gate(stable_tags)
    with _logged("queue_ratelimit.celery") as records:
        job = gate._job(message)
        _due_later(message)
    assert job is not None
    assert _is_valid(job.options)
    assert _check_item_id(job.item_id) == job.item_id
    assert gate._item_id(message) == job.item_id == _gate(stable_tags)._job(message).item_id
    try:
        expected = RateOptions(
            *read_rate_options(
                headers.get("qrl_tenant"), headers.get("qrl_priority"), headers.get("qrl_cost")
            )
        )
    except TYPED:
        assert job.options == DEFAULTS
        assert any("using defaults" in r.getMessage() for r in records)
        assert all(len(r.getMessage()) < 2_000 for r in records)
    else:
        assert job.options == expected
        assert not records


def test_a_task_name_that_is_not_a_string_is_not_gated() -> None:
    gate = _gate(stable_tags=False)
    for name in (["capp.work"], {"a": 1}, None, Unreadable()):
        assert gate._job(_message({"task": name, "id": "t1"})) is None


# -- Celery: backlog ids ---------------------------------------------------------------------------
NONCE = "a" * 32


@pytest.mark.parametrize(
    ("headers", "tag", "expected"),
    [
        ({"id": "t1", "retries": 0, "qrl_nonce": NONCE}, None, f"t1.0.{NONCE}"),
        ({"id": "t1", "retries": 2, "qrl_nonce": NONCE}, "0f9e1c0a-1111", f"t1.2.{NONCE}"),
        ({"id": "t1", "qrl_nonce": "not a nonce!"}, None, "t1.0"),
        ({"id": "t1", "qrl_nonce": "x" * 33}, None, "t1.0"),
        ({"id": "t1", "retries": None}, None, "t1.0"),
        # A stable delivery tag (kombu's Redis transport) names the publish.
        (
            {"id": "t1"},
            "0f9e1c0a-1111-4222-8333-944445555666",
            "t1.0.0f9e1c0a111142228333944445555666",
        ),
        ({"id": "t1"}, 17, "t1.0"),  # an AMQP delivery tag: per delivery, not used
        # No identity: a replacement (Task.replace) still differs from what it replaced.
        ({"id": "t1", "replaced_task_nesting": 1}, None, "t1.0.n1"),
        ({"id": "t1", "replaced_task_nesting": 0}, None, "t1.0"),
        ({"id": "t1", "replaced_task_nesting": True}, None, "t1.0"),
        ({"id": "t1", "replaced_task_nesting": 2, "qrl_nonce": NONCE}, None, f"t1.0.{NONCE}"),
    ],
)
def test_item_ids(headers: dict[str, Any], tag: Any, expected: str) -> None:
    assert item_id_of(headers, tag) == expected
    assert (publish_identity(headers, tag) is not None) == (
        expected.count(".") == 2 and ".n" not in expected
    )


@pytest.mark.parametrize(
    "task_id", ["a b", "x" * 300, "é", "", ["a"], {"a": 1}, 12, None, Unreadable(), "a\tb"]
)
def test_a_task_id_of_any_shape_gives_a_valid_id_the_same_every_time(task_id: Any) -> None:
    first = item_id_of({"id": task_id, "retries": ["x"], "qrl_nonce": NONCE})
    assert _check_item_id(first) == first
    assert first == item_id_of({"id": task_id, "retries": ["x"], "qrl_nonce": NONCE})
    assert first.endswith(NONCE)


@given(
    task_id=st.text(max_size=50),
    nonces=st.lists(
        st.text("0123456789abcdef", min_size=32, max_size=32), min_size=2, max_size=2, unique=True
    ),
)
def test_new_publishes_of_one_task_id_get_different_ids(task_id: str, nonces: list[str]) -> None:
    first, second = (item_id_of({"id": task_id, "qrl_nonce": n}) for n in nonces)
    assert first != second


# -- RQ: job meta -------------------------------------------------------------------------------
@given(
    meta=st.dictionaries(
        st.sampled_from(["rate_tenant", "rate_priority", "rate_cost", "other"]), json_like
    )
    | json_like
)
@settings(max_examples=300, deadline=None)
def test_rq_meta_of_any_shape_gives_options_or_defaults_with_a_log(meta: Any) -> None:
    try:
        expected: tuple[str, str, float] | None = rate_options(meta)
    except TYPED:
        expected = None
    with _logged("queue_ratelimit.rq") as records:
        found = stored_rate_options(meta, "job-1")
    assert _is_valid(RateOptions(*found))
    if expected is None:
        assert found == ("default", "normal", 1.0)
        assert records
        assert "using defaults" in records[0].getMessage()
    else:
        assert found == expected
        assert not records


@pytest.mark.parametrize("value", NASTY, ids=range(len(NASTY)))
def test_rq_meta_values_of_pickled_types(value: Any) -> None:
    for key in ("rate_tenant", "rate_priority", "rate_cost"):
        found = stored_rate_options({key: value}, "job-1")
        assert _is_valid(RateOptions(*found))


# -- Celery: the producer side ----------------------------------------------------------------
def test_explicit_options_of_any_type_give_a_typed_error_at_the_call_site() -> None:
    for value in NASTY:
        for option in ("rate_tenant", "rate_priority", "rate_cost"):
            try:
                options = resolve(SETTINGS, None, {option: value})
            except TYPED:
                continue
            assert _is_valid(options)


@pytest.mark.parametrize(
    ("parent", "expected"),
    [
        ({"qrl_tenant": "acme", "qrl_cost": 2}, RateOptions("acme", "normal", 2.0)),
        # Headers a producer without the plugin sent to the running task: the gate ran it
        # with the defaults, and what it publishes gets them too (an error before).
        ({"qrl_tenant": "acme", "qrl_cost": [1]}, DEFAULTS),
        ({"qrl_priority": Unreadable()}, DEFAULTS),
    ],
)
def test_work_a_task_publishes_inherits_its_options_unless_they_are_malformed(
    parent: dict[str, Any], expected: RateOptions
) -> None:
    from celery import Celery
    from celery._state import _task_stack

    app = Celery("parents", set_as_current=False)

    @app.task(bind=True, shared=False)
    def running(self: Any) -> None: ...

    running.push_request(called_directly=False, **parent)
    _task_stack.push(running)
    try:
        assert resolve(SETTINGS, None, {}) == expected
    finally:
        _task_stack.pop()
        running.pop_request()
