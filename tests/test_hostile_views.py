"""What operators read, fed by whoever writes to Redis: ``queue-ratelimit rq info`` with
hostile RQ queue names (RQ takes any name; anyone enqueuing adds one) and hostile job metas
(megabyte values, control characters, names colliding with the backlog's own fields, not
a dict, not loadable); ``celery inspect qrl_gate``'s backlog report with many tenants and
a corrupt count. Probed in docs/reliability.md, "Probed in session 8"."""

from __future__ import annotations

import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
import rq
from click.testing import CliRunner
from conftest import drop_namespace

from queue_ratelimit import BackendError, FairScheduler, Limiter
from queue_ratelimit.celery._inspect import TOP_TENANTS, backlog_report
from queue_ratelimit.cli import main

HOSTILE_QUEUES = {
    "clear": "q\x1b[2J\x1b[Hq",  # clears the operator's screen
    "newline": "q\nforged  (all)  0  0  0",  # a row of its own
    "bell": "q\x07\x08\r",
    "long": "q" * 5000,
}


@pytest.fixture
def hostile(redis_client: redis.Redis, namespace: str) -> Iterator[dict[str, str]]:
    names = {k: f"{namespace}-{v}" for k, v in HOSTILE_QUEUES.items()}
    for name in names.values():
        rq.Queue(name, connection=redis_client).enqueue(len, "x")
    yield names
    for name in names.values():
        queue = rq.Queue(name, connection=redis_client)
        queue.empty()
        queue.delete(delete_jobs=True)


def rq_info(redis_url: str, namespace: str, *args: str) -> str:
    result = CliRunner().invoke(
        main,
        ["--url", redis_url, "--namespace", namespace, "rq", "info", *args],
        color=True,  # (as in a terminal: click strips escapes only from what is no terminal)
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_queue_names_cannot_drive_the_operators_terminal(
    hostile: dict[str, str], redis_url: str, namespace: str
) -> None:
    text = rq_info(redis_url, namespace, *hostile.values())
    assert "\x1b" not in text
    assert "\x07" not in text
    assert "\r" not in text
    lines = text.splitlines()
    assert not any(line.startswith("forged") for line in lines)
    assert len(lines) == 2 + 2 * len(hostile)  # the header line, the columns, 2 rows each
    assert r"q\x1b[2J\x1b[Hq" in text  # shown, escaped
    assert max(len(line) for line in lines) < 200  # a 5,000-character name is cut short
    assert f"... ({len(hostile['long'])} characters)" in text  # ... saying so
    # The JSON keeps every name whole (JSON escapes control characters itself).
    doc = json.loads(rq_info(redis_url, namespace, *hostile.values(), "--json"))
    assert sorted(q["queue"] for q in doc["queues"]) == sorted(hostile.values())


def test_hostile_metas_count_under_the_default_tenant_or_unread(
    redis_client: redis.Redis, redis_url: str, namespace: str
) -> None:
    name = f"{namespace}-metas"
    queue = rq.Queue(name, connection=redis_client)
    metas = [
        {"rate_tenant": "x" * 1_000_000},  # a megabyte
        {"rate_tenant": "a\x1b[2Jb"},
        {"rate_tenant": ":total"},  # the backlog's own count field
        {"rate_tenant": ":cv"},
        {"rate_tenant": ["acme"]},
        {"rate_tenant": "acme", "rate_cost": float("nan")},
        {"rate_priority": "x" * 1000},
        "not a dict",
    ]
    try:
        for meta in metas:
            job = queue.enqueue(len, "x")
            job.meta = meta  # type: ignore[assignment]
            job.save_meta()
        broken = queue.enqueue(len, "x")
        redis_client.hset(broken.key, "meta", b"\x80\x04not a pickle")
        redis_client.rpush(queue.key, "no-such-job")  # an id without a job hash
        (q,) = json.loads(rq_info(redis_url, namespace, name, "--json"))["queues"]
        assert q["waiting"] == len(metas) + 2
        assert q["tenants"] == {"default": {"waiting": len(metas) + 1, "parked": 0, "running": 0}}
        assert q["unread"]["waiting"] == 1
        assert "\x1b" not in rq_info(redis_url, namespace, name)
    finally:
        queue.empty()
        queue.delete(delete_jobs=True)


def test_qrl_gate_reports_a_corrupt_backlog_count_instead_of_failing(
    redis_client: redis.Redis, namespace: str
) -> None:
    """``celery inspect qrl_gate`` reads each lane's counts: a count another client wrote
    (not an integer) made the whole command answer an error (ValueError); it is now a
    typed error the report shows as ``backlog_error``. Tenants and lanes are checked
    names (a hostile one is refused before it is stored), and at most 20 tenants a lane
    are reported (5,000 parked tenants: a 2.3 KB report)."""
    limiter = Limiter(redis_client, namespace=namespace)
    scheduler = FairScheduler(limiter)
    gate: Any = SimpleNamespace(_rt=SimpleNamespace(scheduler=scheduler), lanes=["mail"])
    try:
        for i in range(300):
            scheduler.submit(f"t{i}-" + "x" * 100, f"id{i}", queue="mail")
        report = backlog_report(gate)
        assert report["queues"]["mail"]["waiting"] == 300
        assert len(report["queues"]["mail"]["tenants"]) == TOP_TENANTS
        redis_client.hset(scheduler.keys.counts("mail"), "t0-" + "x" * 100, "not a count")
        with pytest.raises(BackendError, match="corrupt backlog count"):
            backlog_report(gate)
    finally:
        drop_namespace(redis_client, namespace)
