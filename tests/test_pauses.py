"""Pauses (``Limiter.pause`` / ``resume``): nothing of a paused scope is admitted until the
pause ends, on Redis's clock, in the one atomic decision, on every backend; the waits say
so; bad input is refused before anything is written; a pause ends by itself; and the fair
scheduler parks what a pause holds back and serves it when the pause ends."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conftest import wait_until
from test_decisions import BACKENDS, Backend, drop, open_backend
from test_scheduler import backlogged, shares, take

from queue_ratelimit import (
    BackendError,
    ConfigError,
    FairScheduler,
    InvalidName,
    InvalidScope,
    Limiter,
    Pause,
    RateLimitError,
)
from queue_ratelimit._decision import parse_reply

HOUR_MS = 3_600_000
WAIT_REL = 2e-3


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, redis_url: str, namespace: str) -> Iterator[Backend]:
    opened = open_backend(request.param, redis_url, namespace)
    yield opened
    drop(opened)


def decide(backend: Backend, mode: str, tenant: str, **kwargs: Any) -> dict[str, Any]:
    d = backend.call(mode, tenant, **kwargs)
    return {
        "allowed": d.allowed,
        "denied_by": d.denied_by,
        "paused": d.paused,
        "concurrency": d.concurrency,
        "wait_ms": d.wait_ms,
        "remaining": dict(d.remaining),
    }


# Each case: steps of ("set", scope, limit), ("exempt", tenant, mode), ("shadow",),
# ("pause", scope, seconds), ("resume", scope, expected bool), ("concurrency", scope, n),
# or a decision (mode, tenant, kwargs, expected: allowed, denied_by, paused, wait_ms or
# None for "not checked", remaining or None).
CASES: list[dict[str, Any]] = [
    {
        "id": "tenant-pause-without-any-limit",
        "steps": [
            ("pause", "tenant:acme", 3600),
            ("acquire", "acme", {}, (False, "tenant:acme", True, HOUR_MS, {})),
            ("peek", "acme", {"queue": "emails"}, (False, "tenant:acme", True, HOUR_MS, {})),
            ("acquire", "beta", {}, (True, None, False, 0, {})),
            # A refund is no admission: it is never paused.
            ("refund", "acme", {}, (True, None, False, 0, {})),
        ],
    },
    {
        "id": "each-kind-of-scope",
        "steps": [
            ("pause", "queue:emails", 3600),
            ("pause", "priority:low", 1800),
            ("pause", "tenant:beta:queue:reports", 900),
            ("acquire", "acme", {"queue": "emails"}, (False, "queue:emails", True, HOUR_MS, {})),
            ("acquire", "acme", {"queue": "sms"}, (True, None, False, 0, {})),
            (
                "acquire",
                "acme",
                {"queue": "sms", "priority": "low"},
                (False, "priority:low", True, HOUR_MS / 2, {}),
            ),
            (
                "acquire",
                "beta",
                {"queue": "reports"},
                (False, "tenant:beta:queue:reports", True, HOUR_MS / 4, {}),
            ),
            ("acquire", "gamma", {"queue": "reports"}, (True, None, False, 0, {})),
            # The longest wait names the scope.
            (
                "acquire",
                "beta",
                {"queue": "reports", "priority": "low"},
                (False, "priority:low", True, HOUR_MS / 2, {}),
            ),
        ],
    },
    {
        "id": "global-pause-beats-exemptions-and-shadow",
        "steps": [
            ("exempt", "ops", "all"),
            ("shadow",),
            ("pause", "global", 60),
            ("acquire", "ops", {}, (False, "global", True, 60_000, {})),
            ("acquire", "acme", {"queue": "q"}, (False, "global", True, 60_000, {})),
        ],
    },
    {
        "id": "a-denial-charges-no-bucket",
        "steps": [
            ("set", "tenant:*", "10/h"),
            ("set", "global", "10/h"),
            ("acquire", "acme", {}, (True, None, False, 0, {"tenant:acme": 9, "global": 9})),
            ("pause", "tenant:acme", 600),
            (
                "acquire",
                "acme",
                {},
                (False, "tenant:acme", True, 600_000, {"tenant:acme": 9, "global": 9}),
            ),
            ("acquire", "beta", {}, (True, None, False, 0, {"tenant:beta": 9, "global": 8})),
        ],
    },
    {
        "id": "a-longer-bucket-wait-names-the-bucket",
        "steps": [
            ("set", "tenant:*", "1/h"),
            ("acquire", "acme", {}, (True, None, False, 0, {"tenant:acme": 0})),
            ("pause", "tenant:acme", 60),
            ("acquire", "acme", {}, (False, "tenant:acme", False, HOUR_MS, {"tenant:acme": 0})),
            ("pause", "global", 7200),
            ("acquire", "acme", {}, (False, "global", True, 2 * HOUR_MS, {"tenant:acme": 0})),
        ],
    },
    {
        "id": "with-a-concurrency-cap",
        "steps": [
            ("concurrency", "tenant:acme", 1),
            ("pause", "queue:emails", 60),
            ("acquire", "acme", {"queue": "emails"}, (False, "queue:emails", True, 60_000, {})),
            # Nothing taken while paused: the cap's one slot is still free.
            ("resume", "queue:emails", True),
            ("acquire", "acme", {"queue": "emails"}, (True, None, False, 0, {})),
        ],
    },
    {
        "id": "resume-and-grow-only",
        "steps": [
            ("pause", "tenant:acme", 600),
            ("pause", "tenant:acme", 60),  # shorter: the longer stays
            ("acquire", "acme", {}, (False, "tenant:acme", True, 600_000, {})),
            ("pause", "tenant:acme", 1200),  # longer: extended
            ("acquire", "acme", {}, (False, "tenant:acme", True, 1_200_000, {})),
            ("resume", "tenant:acme", True),
            ("acquire", "acme", {}, (True, None, False, 0, {})),
            ("resume", "tenant:acme", False),
            ("resume", "global", False),
        ],
    },
]


def run_steps(backend: Backend, steps: list[tuple[Any, ...]]) -> None:
    for n, step in enumerate(steps):
        kind = step[0]
        if kind == "set":
            backend.call("set_limit", step[1], step[2])
        elif kind == "exempt":
            backend.call("set_exempt", step[1], step[2])
        elif kind == "shadow":
            backend.call("set_shadow", True)
        elif kind == "concurrency":
            backend.call("set_concurrency", step[1], step[2])
        elif kind == "pause":
            backend.call("pause", step[1], step[2])
        elif kind == "resume":
            assert backend.call("resume", step[1]) is step[2], f"step {n}"
        else:
            mode, tenant, kwargs, (allowed, denied_by, paused, wait_ms, remaining) = step
            got = decide(backend, mode, tenant, **kwargs)
            assert (got["allowed"], got["denied_by"], got["paused"]) == (
                allowed,
                denied_by,
                paused,
            ), f"step {n}: {got}"
            assert got["concurrency"] is False
            assert got["wait_ms"] == pytest.approx(wait_ms, rel=WAIT_REL, abs=50), f"step {n}"
            assert got["remaining"] == pytest.approx(remaining, abs=0.02), f"step {n}"


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_pause_table(backend: Backend, case: dict[str, Any]) -> None:
    run_steps(backend, case["steps"])


def test_pauses_are_listed_and_audited(backend: Backend) -> None:
    first = backend.call("pause", "tenant:acme", 30, actor="worker-7")
    assert isinstance(first, Pause)
    assert first.scope == "tenant:acme"
    assert first.remaining_ms == pytest.approx(30_000, abs=5)
    backend.call("pause", "priority:low", 60)
    listed = backend.call("pauses")
    assert list(listed) == ["priority:low", "tenant:acme"]
    assert listed["tenant:acme"].until_ms == first.until_ms
    assert 0 < listed["tenant:acme"].remaining_ms <= 30_000
    # A shorter pause leaves the longer one, and says so.
    assert backend.call("pause", "tenant:acme", 1).until_ms == first.until_ms
    backend.call("resume", "tenant:acme", actor="ops")
    assert list(backend.call("pauses")) == ["priority:low"]
    # Pauses are not limits.
    assert backend.call("limits") == {}
    log = backend.call("audit_log", 10) if hasattr(backend.limiter, "audit_log") else None
    if log is not None:
        ops = [(e.op, e.field, e.actor) for e in reversed(log)]
        assert ops == [
            ("pause", "pause:tenant:acme", "worker-7"),
            ("pause", "pause:priority:low", "api"),
            ("resume", "pause:tenant:acme", "ops"),
        ]
        assert log[-1].new == str(first.until_ms)


def test_a_pause_ends_by_itself_on_redis_time(backend: Backend) -> None:
    backend.call("set_limit", "tenant:*", "100/s")
    pause = backend.call("pause", "tenant:acme", 0.3)
    denied = backend.call("acquire", "acme")
    assert denied.paused
    assert 0 < denied.wait_ms <= 300

    def admitted() -> bool:
        return bool(backend.call("acquire", "acme").allowed)

    wait_until(admitted, timeout=5, what="the pause to run out")
    seconds, micros = backend.client.time()
    assert seconds * 1000 + micros / 1000 >= pause.until_ms
    assert backend.call("pauses") == {}
    # The next pause forgets the one that ran out: the config keeps no stale field.
    backend.call("pause", "global", 60)
    config = backend.client.hgetall(backend.keys.config)
    assert b"pause:tenant:acme" not in config
    assert b"pause:global" in config
    assert backend.client.zrange(backend.keys.pauses, 0, -1) == [b"global"]


@pytest.mark.parametrize(
    "seconds", [0, -1, -0.0, math.nan, math.inf, -math.inf, 30 * 86400 + 1, 1e300, True, "30", None]
)
def test_bad_pause_lengths_are_refused(backend: Backend, seconds: object) -> None:
    with pytest.raises(ConfigError, match="pause"):
        backend.call("pause", "tenant:acme", seconds)
    assert backend.client.exists(backend.keys.config) == 0


@pytest.mark.parametrize(
    ("scope", "error"),
    [
        ("tenant:*", InvalidScope),
        ("tenant:*:queue:emails", InvalidScope),
        ("nothing", InvalidScope),
        ("tenant:a b", InvalidName),
        ("priority:LOW", InvalidName),
        ("", InvalidScope),
        (None, InvalidScope),
    ],
)
def test_pauses_of_unknown_scopes_are_refused(backend: Backend, scope: object, error: type) -> None:
    with pytest.raises(error):
        backend.call("pause", scope, 10)
    with pytest.raises(error):
        backend.call("resume", scope)
    assert backend.client.exists(backend.keys.config) == 0


@pytest.mark.parametrize("ms", ["0", "-5", "nan", "inf", "2592000001", "x", ""])
def test_the_script_refuses_bad_lengths_too(backend: Backend, ms: str) -> None:
    """What another client (or a bug) could send to config.lua: refused, nothing written."""
    k = backend.keys
    with pytest.raises((redis.ResponseError, RateLimitError), match="pause must last"):
        backend.raw(
            "config.lua",
            [k.config, k.audit, k.shared, k.pauses],
            ["pause", "pause:global", ms, "x", "10"],
        )
    # (Only the shard count the limiter recorded before its first script call.)
    assert backend.client.hkeys(k.config) == [b"_shards"]


def test_the_longest_pause_is_accepted(limiter: Limiter) -> None:
    pause = limiter.pause("global", 30 * 86400)
    assert pause.remaining_ms == pytest.approx(30 * 86_400_000, abs=5)
    assert limiter.acquire("acme").wait_ms == pytest.approx(30 * 86_400_000, abs=50)


def test_a_corrupt_stored_pause_is_a_loud_error(limiter: Limiter) -> None:
    limiter.pause("tenant:acme", 10)
    limiter.client.hset(limiter.keys.config, "pause:tenant:acme", "soon")
    limiter.set_limit("global", "1/s")  # a new revision: the plan is made again
    # An unreadable pause is no pause (never a reason to stop everything), and the
    # listing refuses it loudly.
    assert limiter.acquire("acme").allowed
    with pytest.raises(BackendError, match="corrupt pause:tenant:acme"):
        limiter.pauses()


def test_reply_marker_reads_back() -> None:
    d = parse_reply("0 1500 ~tenant:acme tenant:acme 3 |")
    assert (d.allowed, d.denied_by, d.paused, d.concurrency) == (False, "tenant:acme", True, False)
    assert d.retry_after == 1.5


def test_every_worker_sees_a_pause_at_its_next_decision(
    redis_client: redis.Redis, namespace: str
) -> None:
    one = Limiter(redis_client, namespace=namespace)
    two = Limiter(redis.Redis(connection_pool=redis_client.connection_pool), namespace=namespace)
    assert two.acquire("acme").allowed  # its plan is cached before the pause
    one.pause("tenant:acme", 60)
    assert two.acquire("acme").paused
    one.resume("tenant:acme")
    assert two.acquire("acme").allowed


def test_a_pause_costs_a_decision_nothing_once_it_ran_out(limiter: Limiter) -> None:
    """A pause past its end stays in the cached plan until the next revision and admits."""
    limiter.pause("tenant:acme", 0.05)
    wait_until(lambda: limiter.acquire("acme").allowed, timeout=5, what="the pause to end")
    assert limiter.acquire("acme").denied_by is None


# -- the fair scheduler ------------------------------------------------------------------


@pytest.fixture
def scheduler(limiter: Limiter) -> FairScheduler:
    return FairScheduler(limiter)


def test_a_paused_tenant_is_parked_and_the_others_go_on(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    backlogged(scheduler, "acme", 10)
    backlogged(scheduler, "beta", 10)
    limiter.pause("tenant:acme", 3600)

    items = take(scheduler, 10)

    assert shares(items) == {"beta": 10}
    result = scheduler.dispatch(["default"])
    assert result.items == ()
    assert result.wait_ms == pytest.approx(HOUR_MS, rel=WAIT_REL)
    # The gate says the same for a job arriving from a broker.
    verdict = scheduler.gate("acme", "new-1")
    assert (verdict.action, verdict.denied_by) == ("park", "tenant:acme")
    limiter.pause("tenant:gamma", 60)
    verdict = scheduler.gate("gamma", "new-2", queue="fresh")
    assert (verdict.action, verdict.denied_by, verdict.paused) == ("park", "tenant:gamma", True)
    assert verdict.wait_ms == pytest.approx(60_000, rel=WAIT_REL, abs=50)
    # A resume is a configuration change: the parked tenant is due at once.
    limiter.resume("tenant:acme")
    assert shares(take(scheduler, 10)) == {"acme": 10}


def test_a_paused_priority_is_passed_over_and_a_paused_queue_stops_its_lane(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    backlogged(scheduler, "acme", 5, priority="low")
    backlogged(scheduler, "acme", 5, priority="high")
    backlogged(scheduler, "beta", 5, queue="other")
    limiter.pause("priority:low", 3600)
    limiter.pause("queue:other", 60)

    items = take(scheduler, 5, queues=("default", "other"))

    assert shares(items, "priority") == {"high": 5}
    result = scheduler.dispatch(["default", "other"])
    assert result.items == ()
    assert result.wait_ms == pytest.approx(60_000, rel=WAIT_REL, abs=50)


def test_a_job_handed_back_at_the_front_keeps_its_place(scheduler: FairScheduler) -> None:
    ids = backlogged(scheduler, "acme", 3)
    first = take(scheduler, 1)[0]
    assert first.id == ids[0]
    scheduler.ack(first)
    assert scheduler.submit("acme", "again", at_front=True)
    assert [i.id for i in take(scheduler, 3)] == ["again", ids[1], ids[2]]


def test_hints_report_the_pause(limiter: Limiter, scheduler: FairScheduler) -> None:
    limiter.pause("tenant:acme", 120)
    hint = scheduler.hint("acme")
    assert (hint.allowed, hint.denied_by) == (False, "tenant:acme")
    assert hint.wait_ms == pytest.approx(120_000, rel=WAIT_REL, abs=50)
