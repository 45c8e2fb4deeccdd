"""Priority names from every way they reach Redis, hostile ones included: the limiter's
scopes and decisions, the fair scheduler's calls, the admin API and the CLI, and the
rate options of Celery messages and RQ jobs from producers without the plugin. A bad
name is a typed error before anything is written (or, from a foreign producer, the
documented fallback: the job runs under the defaults); a valid name that looks like a
field suffix keeps fields of its own. Probed in docs/reliability.md, "Probed in session 8:
priority names"."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import pytest
import redis
from click.testing import CliRunner
from fastapi.testclient import TestClient

from queue_ratelimit import AsyncLimiter, FairScheduler, Limit, Limiter, RateLimitError
from queue_ratelimit._config import parse_config
from queue_ratelimit._scheduler import SubmitItem
from queue_ratelimit.admin import create_app
from queue_ratelimit.celery._options import HeaderOptions, running_options
from queue_ratelimit.celery._settings import CelerySettings
from queue_ratelimit.cli import main
from queue_ratelimit.rq._options import stored_rate_options


class HashRaises(str):
    """A name whose hash raises (from code that builds its own str subclasses)."""

    def __hash__(self) -> int:
        raise RuntimeError("no hash")


BAD: dict[str, object] = {
    "colon": "lo:w",
    "brace": "lo{w",
    "hash tag": "{low}",
    "space": "lo w",
    "newline": "low\n",
    "nul": "low\x00",
    "a megabyte": "x" * 1_000_000,
    "empty": "",
    "accent": "lów",
    "ligature": "\ufb01",
    "fullwidth": "\uff4c\uff4f\uff57",
    "zero-width space": "low\u200b",
    "upper case": "LOW",
    "digit first": "1low",
    "underscore first": "_low",
    "33 characters": "a" * 33,
    "a scope's text": "priority:low",
    "a shared hash field": "b:priority:low",
    "the other counter": "~",
    "star": "*",
    "bytes": b"low",
    "int": 5,
    "list": ["low"],
}
# Valid names that look like the suffixes of bucket fields (":u" time, ":c" credit,
# ":w<seconds>" a further window) or are as long as allowed.
LOOK_ALIKES = ["u", "c", "w3600", "a" * 32]


@pytest.fixture
def scheduler(limiter: Limiter) -> FairScheduler:
    return FairScheduler(limiter)


def state(client: redis.Redis, namespace: str) -> dict[bytes, object]:
    """Every key of the namespace and what it holds."""
    found: dict[bytes, object] = {}
    for key in client.scan_iter(match=f"*{namespace}*", count=1000):
        kind = client.type(key)
        if kind == b"hash":
            found[key] = client.hgetall(key)
        elif kind == b"zset":
            found[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"list":
            found[key] = client.lrange(key, 0, -1)
        else:
            found[key] = kind
    return found


def entry_points(
    limiter: Limiter, scheduler: FairScheduler, redis_url: str, namespace: str
) -> dict[str, Callable[[Any], object]]:
    """Each way a priority name reaches Redis, as a call that takes the name."""
    plain = f"{limiter.keys.config}:list"
    app = TestClient(create_app(limiter, token=None, allow_anonymous=True))

    def http(method: str, path: str, body: dict[str, object]) -> None:
        response = app.request(method, path, json=body)
        if response.status_code >= 400:
            raise RateLimitError(f"{response.status_code} {response.text}")

    def cli(*args: str) -> None:
        result = CliRunner().invoke(main, ["--url", redis_url, "--namespace", namespace, *args])
        if result.exit_code != 0:
            assert result.exit_code == 1, result.output  # one line, no traceback
            raise RateLimitError(result.output)

    async def async_acquire(p: Any) -> object:
        async with AsyncLimiter.from_url(redis_url, namespace=namespace) as async_limiter:
            return await async_limiter.acquire("acme", "q", priority=p)

    return {
        "set_limit": lambda p: limiter.set_limit(f"priority:{p}", "5/s"),
        "pause": lambda p: limiter.pause(f"priority:{p}", 5),
        "set_concurrency": lambda p: limiter.set_concurrency(f"priority:{p}", 1),
        "acquire": lambda p: limiter.acquire("acme", "q", priority=p),
        "peek": lambda p: limiter.peek("acme", "q", priority=p),
        "refund": lambda p: limiter.refund("acme", "q", priority=p),
        "AsyncLimiter.acquire": lambda p: asyncio.run(async_acquire(p)),
        "set_priority_weight": lambda p: scheduler.set_priority_weight(p, 2),
        "submit": lambda p: scheduler.submit("acme", "j", queue="q", priority=p),
        "submit_many": lambda p: scheduler.submit_many([SubmitItem("acme", "j", "q", p)]),
        "gate": lambda p: scheduler.gate("acme", "j", queue="q", priority=p),
        "hint": lambda p: scheduler.hint("acme", queue="q", priority=p, item_id="j"),
        "route": lambda p: scheduler.route("acme", "j", plain, queue="q", priority=p),
        "adopt": lambda p: scheduler.adopt("q", plain, [("j", "acme", p, 1)]),
        "parse_config": lambda p: parse_config({"limits": {f"priority:{p}": "1/s"}}),
        "admin PUT /limits": lambda p: http(
            "PUT", f"/limits/{quote(f'priority:{p}', safe=':')}", {"limit": "1/s"}
        ),
        "admin PUT /weights": lambda p: http(
            "PUT", f"/weights/priority/{quote(str(p), safe='')}", {"weight": 2}
        ),
        "cli limits set": lambda p: cli("limits", "set", f"priority:{p}", "1/s"),
        "cli limits weight": lambda p: cli("limits", "weight", "priority", str(p), "2"),
        "CelerySettings": lambda p: CelerySettings(default_priority=p),  # type: ignore[arg-type]
        "Celery headers": lambda p: HeaderOptions(CelerySettings())({"qrl_priority": p}),
    }


# Entry points that take the name inside a text (a scope, a URL, a command line).
TEXT_ONLY = {"set_limit", "pause", "set_concurrency", "parse_config", "admin PUT /limits"}
TEXT_ONLY |= {"admin PUT /weights", "cli limits set", "cli limits weight"}


@pytest.mark.parametrize(
    "entry",
    [
        *("set_limit", "pause", "set_concurrency", "acquire", "peek", "refund"),
        *("AsyncLimiter.acquire", "set_priority_weight", "submit", "submit_many", "gate"),
        *("hint", "route", "adopt", "parse_config", "admin PUT /limits"),
        *("admin PUT /weights", "cli limits set", "cli limits weight", "CelerySettings"),
        "Celery headers",
    ],
)
def test_a_bad_priority_name_is_a_typed_error_and_writes_nothing(
    limiter: Limiter,
    scheduler: FairScheduler,
    redis_client: redis.Redis,
    redis_url: str,
    namespace: str,
    entry: str,
) -> None:
    call = entry_points(limiter, scheduler, redis_url, namespace)[entry]
    for name, value in BAD.items():
        if entry in TEXT_ONLY and not isinstance(value, str):
            continue
        if entry.startswith(("admin", "cli")) and name in ("a megabyte", "nul"):
            continue  # (no URL or argument carries them)
        before = state(redis_client, namespace)
        with pytest.raises(RateLimitError):
            call(value)
        assert state(redis_client, namespace) == before, name


@pytest.mark.parametrize("name", ["acquire", "peek", "refund", "AsyncLimiter.acquire"])
def test_a_name_whose_hash_raises_is_judged_by_its_text(
    limiter: Limiter,
    scheduler: FairScheduler,
    redis_url: str,
    namespace: str,
    name: str,
) -> None:
    """(The decision memo hashed the name: a RuntimeError out of acquire, where every
    other entry point judged the name by its text.)"""
    limiter.set_limit("priority:low", Limit(1, per=3600, burst=1))
    call = entry_points(limiter, scheduler, redis_url, namespace)[name]
    decision = call(HashRaises("low"))
    took = name in ("acquire", "AsyncLimiter.acquire")
    assert decision.remaining == {"priority:low": 0 if took else 1}  # type: ignore[attr-defined]


def test_foreign_producers_bad_priorities_run_under_the_defaults(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The documented fallback: a job's rate options any of which is malformed are read as
    the defaults, and said so (RQ: logged, and the job runs; Celery: the gate's reading,
    which the task's pauses use)."""
    settings = CelerySettings()

    class Request:
        def __init__(self, priority: object) -> None:
            self.headers = {"qrl_tenant": "acme", "qrl_priority": priority}

    for name, value in BAD.items():
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="queue_ratelimit.rq"):
            got = stored_rate_options({"rate_tenant": "acme", "rate_priority": value}, "j1")
        assert got == ("default", "normal", 1.0), name
        (record,) = caplog.records
        assert len(record.getMessage()) < 300, name  # (a megabyte is not echoed)
        running = running_options(Request(value), settings)
        assert (running.tenant, running.priority) == ("default", "normal"), name


def test_names_like_field_suffixes_keep_fields_of_their_own(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    """``b:priority:<p>`` is followed by ``:u``, ``:c`` or ``:w<seconds>`` in the shared
    hash; a name cannot hold ':', so ``u`` or ``w3600`` never share a field with another
    priority's bucket."""
    for name in [*LOOK_ALIKES, "low"]:
        limiter.set_limit(f"priority:{name}", [Limit(2, per=1, burst=2), Limit(2, per=3600)])
        scheduler.set_priority_weight(name, 2)
    for name in [*LOOK_ALIKES, "low"]:
        assert limiter.acquire("acme", "q", priority=name).allowed
        assert limiter.acquire("acme", "q", priority=name).allowed
        denied = limiter.acquire("acme", "q", priority=name)
        assert denied.denied_by == f"priority:{name}", name
        assert scheduler.submit("acme", f"job-{name}", queue="q", priority=name)
    assert limiter.client.zrange(scheduler.keys.classes("q", "acme"), 0, -1) == sorted(
        n.encode() for n in [*LOOK_ALIKES, "low"]
    )
