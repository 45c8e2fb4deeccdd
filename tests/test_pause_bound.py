"""The running pauses of a namespace are bounded (``TooManyPauses``): each is a field of the
config hash, which every listing, scrape, Celery worker's look for caps and the shard
rebalancer read whole. A new pause beyond the bound is refused before anything is written;
lengthening a running pause, and pausing again once pauses ran out or were resumed, stay
possible. Every surface: the limiters (each backend, sharded, async), the admin API, the CLI."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis
from click.testing import CliRunner
from conftest import wait_until
from fastapi.testclient import TestClient
from test_admin import AUTH, TOKEN
from test_cli import cli, failed, ok  # noqa: F401 (cli: a fixture)
from test_decisions import BACKENDS, Backend, drop, open_backend

from queue_ratelimit import AsyncLimiter, Limiter, RateLimitError, TooManyPauses, _core
from queue_ratelimit._shards import ShardedLimiter
from queue_ratelimit.admin import create_app
from queue_ratelimit.cli import main

BOUND = 3


@pytest.fixture
def small_bound(monkeypatch: pytest.MonkeyPatch) -> int:
    """A bound of 3 for the test (the default, 10,000, is checked on its own below)."""
    monkeypatch.setattr(_core, "MAX_PAUSES", BOUND)
    return BOUND


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, redis_url: str, namespace: str) -> Iterator[Backend]:
    opened = open_backend(request.param, redis_url, namespace)
    yield opened
    drop(opened)


def paused_fields(client: redis.Redis, config_key: str) -> set[str]:
    return {f.decode() for f in client.hkeys(config_key) if f.startswith(b"pause:")}


def test_a_new_pause_beyond_the_bound_is_refused(backend: Backend, small_bound: int) -> None:
    for i in range(small_bound):
        backend.call("pause", f"tenant:t{i}", 60)
    version = backend.client.hget(backend.keys.config, "_version")
    audited = backend.client.xlen(backend.keys.audit)
    with pytest.raises(TooManyPauses) as refused:
        backend.call("pause", "tenant:late", 60)
    assert isinstance(refused.value, RateLimitError)
    assert (refused.value.bound, refused.value.scope) == (small_bound, "tenant:late")
    assert refused.value.namespace == backend.keys.namespace
    assert "3 pauses" in str(refused.value)
    assert "'tenant:late'" in str(refused.value)
    # Nothing written: no field, no index entry, no new version, no audit entry.
    assert paused_fields(backend.client, backend.keys.config) == {
        f"pause:tenant:t{i}" for i in range(small_bound)
    }
    assert backend.client.zcard(backend.keys.pauses) == small_bound
    assert backend.client.hget(backend.keys.config, "_version") == version
    assert backend.client.xlen(backend.keys.audit) == audited
    assert not backend.call("acquire", "late").paused
    # A running pause can still be lengthened (or asked again, shorter: left as it is).
    longer = backend.call("pause", "tenant:t0", 600)
    assert longer.remaining > 500
    assert backend.call("pause", "tenant:t1", 1).remaining > 50
    # A resume makes room.
    assert backend.call("resume", "tenant:t2")
    assert backend.call("pause", "tenant:late", 60).scope == "tenant:late"


def test_pauses_that_ran_out_do_not_count(backend: Backend, small_bound: int) -> None:
    for i in range(small_bound):
        backend.call("pause", f"tenant:short{i}", 0.05)
    wait_until(
        lambda: not backend.call("acquire", f"short{small_bound - 1}").paused,
        timeout=10,
        what="the short pauses to run out",
    )
    for i in range(small_bound):
        backend.call("pause", f"tenant:t{i}", 60)
    # (The pauses that ran out were forgotten by the first of these.)
    assert paused_fields(backend.client, backend.keys.config) == {
        f"pause:tenant:t{i}" for i in range(small_bound)
    }
    with pytest.raises(TooManyPauses):
        backend.call("pause", "global", 60)


def test_the_default_bound_is_ten_thousand(backend: Backend) -> None:
    """The default, in Python and in the script (an argument left out): 10,000 running
    pauses in the index (written directly: the bound counts them there)."""
    assert _core.MAX_PAUSES == 10_000
    seconds, _ = backend.client.time()
    far = (seconds + 3600) * 1000  # (an hour from now on Redis's clock, in ms)
    backend.client.zadd(backend.keys.pauses, {f"tenant:t{i}": far for i in range(9_999)})
    backend.call("pause", "tenant:last", 60)  # the 10,000th
    with pytest.raises(TooManyPauses) as refused:
        backend.call("pause", "global", 60)
    assert refused.value.bound == 10_000
    k = backend.keys
    reply = backend.raw(
        "config.lua",
        [k.config, k.audit, k.shared, k.pauses],
        ["pause", "pause:global", "60000", "x", "10"],
    )
    assert [int(reply[0]), int(reply[2])] == [-2, 10_000]
    assert backend.client.hget(k.config, "pause:global") is None


def test_a_sharded_namespace_refuses_at_home_before_any_shard_is_written(
    sharded: ShardedLimiter, redis_client: redis.Redis, small_bound: int
) -> None:
    for i in range(small_bound):
        sharded.pause(f"queue:q{i}", 60)
    with pytest.raises(TooManyPauses):
        sharded.pause("queue:late", 60)
    for keys in [sharded.keys, *sharded.shard_keys]:
        assert redis_client.hget(keys.config, "pause:queue:late") is None
        assert redis_client.hget(keys.config, "pause:queue:q0") is not None
    assert not sharded.acquire("acme", queue="late").paused


def test_an_async_sharded_namespace_refuses_too(
    redis_url: str, namespace: str, redis_client: redis.Redis, small_bound: int
) -> None:
    async def run() -> None:
        lim = AsyncLimiter.from_url(redis_url, namespace=namespace, shards=2)
        try:
            for i in range(small_bound):
                await lim.pause(f"tenant:t{i}", 60)
            with pytest.raises(TooManyPauses):
                await lim.pause("tenant:late", 60)
            assert not (await lim.acquire("late")).paused
        finally:
            await lim.aclose()

    try:
        asyncio.run(run())
    finally:
        keys = list(redis_client.scan_iter(match=f"qrl:{{{namespace}*", count=1000))
        if keys:
            redis_client.delete(*keys)


def test_the_admin_api_answers_409(limiter: Limiter, small_bound: int) -> None:
    for i in range(small_bound):
        limiter.pause(f"tenant:t{i}", 60)
    with TestClient(create_app(limiter, token=TOKEN)) as api:
        refused = api.put("/pauses/tenant:late", json={"seconds": 60}, headers=AUTH)
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == "TooManyPauses"
        assert "3 pauses" in refused.json()["detail"]
        assert (
            "409" in api.get("/openapi.json").json()["paths"]["/pauses/{scope}"]["put"]["responses"]
        )
        # Lengthening a running pause is not a new one.
        assert api.put("/pauses/tenant:t0", json={"seconds": 90}, headers=AUTH).is_success


def test_the_cli_says_it_in_one_line(
    cli: CliRunner,  # noqa: F811
    limiter: Limiter,
    small_bound: int,
) -> None:
    for i in range(small_bound):
        ok(cli, "limits", "pause", f"tenant:t{i}", "60")
    said = failed(cli.invoke(main, ["limits", "pause", "tenant:late", "60"]))
    assert "runs 3 pauses already" in said
    assert "tenant:late" not in limiter.pauses()
