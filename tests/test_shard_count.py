"""One shard count per namespace (``_shard_count``): recorded at the namespace's home by
the first limiter, compared by every other before its first script call; a sharded one
looks again at each rebalance tick; ``queue-ratelimit shards`` shows and re-records it."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis
from click.testing import CliRunner

from queue_ratelimit import (
    AsyncLimiter,
    BackendError,
    ConfigError,
    FairScheduler,
    Limit,
    Limiter,
)
from queue_ratelimit._errors import ShardCountMismatch
from queue_ratelimit._shard_count import SHARDS_FIELD, record_shards
from queue_ratelimit.cli import main as cli_main

HOUR = 3600.0


@pytest.fixture
def ns(redis_client: redis.Redis, namespace: str) -> Iterator[str]:
    yield namespace
    keys = list(redis_client.scan_iter(match=f"qrl:{{{namespace}*", count=1000))
    if keys:
        redis_client.delete(*keys)


def _through_each(client: redis.Redis, ns: str, counts: tuple[int, ...]) -> tuple[int, list[str]]:
    """The probe of docs/reliability.md: 5/h per tenant, 10 tries through a limiter of
    each count. Returns the admissions and the refusals' messages."""
    admitted, refused = 0, []
    for n in counts:
        lim = Limiter(client, namespace=ns, shards=n, rebalance_interval=3600)
        try:
            lim.set_limit("tenant:*", Limit(5, per=HOUR, burst=5))
            admitted += sum(lim.acquire("acme").allowed for _ in range(10))
        except ShardCountMismatch as exc:
            refused.append(str(exc))
    return admitted, refused


@pytest.mark.parametrize("counts", [(1, 2, 4), (4, 1, 2)])
def test_one_namespace_used_with_other_shard_counts_is_refused(
    redis_client: redis.Redis, ns: str, counts: tuple[int, ...]
) -> None:
    """Was: 15 admitted for a 5/h limit (5 through each count), without a word."""
    admitted, refused = _through_each(redis_client, ns, counts)
    assert admitted == 5
    first = counts[0]
    assert len(refused) == 2
    for message, n in zip(refused, counts[1:], strict=True):
        assert repr(ns) in message
        assert f"used with {first} shard(s) and this limiter has {n}" in message
        assert f"shards set {n} --force" in message
    assert redis_client.hget(f"qrl:{{{ns}}}:config", SHARDS_FIELD) == str(first).encode()


def test_a_mismatch_is_a_config_error_raised_on_every_call_whatever_the_fail_mode(
    redis_client: redis.Redis, ns: str
) -> None:
    Limiter(redis_client, namespace=ns, shards=2).acquire("acme")
    other = Limiter(redis_client, namespace=ns, fail_mode="open")
    for call in (
        lambda: other.acquire("acme"),
        lambda: other.set_limit("global", "5/s"),
        lambda: other.pause("global", 5),
        lambda: FairScheduler(other).submit("acme", "j1", queue="q"),
        lambda: FairScheduler(other).dispatch(["q"]),
    ):
        with pytest.raises(BackendError) as caught:  # (a ConfigError, never the fail mode)
            call()
        assert isinstance(caught.value, ShardCountMismatch)
        assert (caught.value.recorded, caught.value.configured) == (2, 1)
    assert other.backend_failures == 0
    assert redis_client.hget(f"qrl:{{{ns}}}:config", "global") is None


def _race(limiters: list[Limiter]) -> list[object]:
    """Each limiter's first call, all at once: True/False (decided) or the refusal."""
    barrier = threading.Barrier(len(limiters))
    outcomes: list[object] = [None] * len(limiters)

    def first_call(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = limiters[i].acquire("acme").allowed
        except ShardCountMismatch as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=first_call, args=(i,)) for i in range(len(limiters))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return outcomes


def test_two_counts_racing_on_a_new_namespace_cannot_both_win(
    redis_client: redis.Redis, namespace: str
) -> None:
    for attempt in range(20):
        ns = f"{namespace}r{attempt}"
        limiters = [
            Limiter(
                redis.Redis(connection_pool=redis_client.connection_pool),
                namespace=ns,
                shards=n,
                rebalance_interval=3600,
            )
            for n in (1, 3)
        ]
        outcomes = _race(limiters)
        won = [i for i, o in enumerate(outcomes) if o is True]
        lost = [o for o in outcomes if isinstance(o, ShardCountMismatch)]
        assert len(won) == 1, outcomes
        assert len(lost) == 1, outcomes
        recorded = redis_client.hget(f"qrl:{{{ns}}}:config", SHARDS_FIELD)
        assert recorded == str((1, 3)[won[0]]).encode()
        redis_client.delete(*redis_client.scan_iter(match=f"qrl:{{{ns}*", count=1000))


def test_an_existing_namespace_without_a_record_takes_its_first_limiters_count(
    redis_client: redis.Redis, ns: str
) -> None:
    """A namespace used before this check (its limits, buckets and backlog there, no
    ``_shards``): the first limiter of the new version records its count and goes on as
    before; a process with another count is refused from then on."""
    old = Limiter(redis_client, namespace=ns, shards=3, rebalance_interval=3600)
    old.set_limit("tenant:*", Limit(5, per=HOUR, burst=5))
    assert sum(old.acquire("acme").allowed for _ in range(3)) == 3
    FairScheduler(old).submit("acme", "parked", queue="q")
    redis_client.hdel(f"qrl:{{{ns}}}:config", SHARDS_FIELD)  # as the previous version left it

    upgraded = Limiter(redis_client, namespace=ns, shards=3, rebalance_interval=3600)
    assert sum(upgraded.acquire("acme").allowed for _ in range(5)) == 2  # the same bucket
    assert FairScheduler(upgraded).backlog("q") == 1
    assert redis_client.hget(f"qrl:{{{ns}}}:config", SHARDS_FIELD) == b"3"
    assert "_shards" not in str(upgraded.limits())
    with pytest.raises(ShardCountMismatch):
        Limiter(redis_client, namespace=ns).acquire("acme")


def test_the_async_limiter_checks_too(redis_url: str, ns: str) -> None:
    async def calls() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            first = AsyncLimiter(client, namespace=ns, shards=2, rebalance_interval=3600)
            assert (await first.acquire("acme")).allowed
            for n in (1, 3):
                other = AsyncLimiter(client, namespace=ns, shards=n, rebalance_interval=3600)
                with pytest.raises(ShardCountMismatch, match=f"this limiter has {n}"):
                    await other.acquire("acme")
                with pytest.raises(ShardCountMismatch):
                    await other.set_limit("global", "1/s")
        finally:
            await client.aclose()

    asyncio.run(calls())


def test_a_sharded_limiter_stops_at_its_next_tick_once_another_count_is_recorded(
    redis_client: redis.Redis, ns: str, caplog: pytest.LogCaptureFixture
) -> None:
    running = Limiter(redis_client, namespace=ns, shards=2, rebalance_interval=0.01)
    assert running.acquire("acme").allowed
    assert record_shards(redis_client, ns, 3, force=True) == 2
    running.rebalancer.due = 0.0  # the next decision ticks
    with caplog.at_level(logging.WARNING, logger="queue_ratelimit"):
        running.acquire("acme")  # (decided before the tick looks)
    with pytest.raises(ShardCountMismatch, match="used with 3 shard"):
        running.acquire("acme")
    assert not [r for r in caplog.records if "rebalancing the shards failed" in r.getMessage()]


def test_record_shards_needs_force_to_change_and_refuses_while_work_waits(
    redis_client: redis.Redis, ns: str
) -> None:
    assert record_shards(redis_client, ns, 2) is None
    assert record_shards(redis_client, ns, 2) == 2
    with pytest.raises(ShardCountMismatch):
        record_shards(redis_client, ns, 4)
    lim = Limiter(redis_client, namespace=ns, shards=2, rebalance_interval=3600)
    scheduler = FairScheduler(lim)
    scheduler.submit("acme", "j1", queue="q")
    with pytest.raises(ConfigError, match=r"1 item\(s\) wait"):
        record_shards(redis_client, ns, 4, force=True)
    item = scheduler.dispatch(["q"]).items[0]  # in flight now: still waiting under 2
    with pytest.raises(ConfigError, match=r"1 item\(s\) wait"):
        record_shards(redis_client, ns, 4, force=True)
    scheduler.ack(item)
    assert record_shards(redis_client, ns, 4, force=True, actor="test") == 2
    entry = Limiter(redis_client, namespace=ns, shards=4).audit_log(1)[0]
    assert (entry.field, entry.old, entry.new, entry.actor) == (SHARDS_FIELD, "2", "4", "test")


def test_the_cli_is_refused_with_another_count_and_re_records_it(
    redis_client: redis.Redis, redis_url: str, ns: str
) -> None:
    runner = CliRunner(
        env={"REDIS_URL": redis_url, "QUEUE_RATELIMIT_NAMESPACE": ns, "QUEUE_RATELIMIT_URL": None}
    )
    Limiter(redis_client, namespace=ns, shards=4).set_limit("tenant:*", "5/h")
    result = runner.invoke(cli_main, ["--shards", "2", "limits", "set", "global", "30/s"])
    assert result.exit_code == 1
    assert "used with 4 shard(s) and this limiter has 2" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(cli_main, ["shards", "show"])
    assert result.exit_code == 0, result.output
    assert "4 shard(s)" in result.output
    result = runner.invoke(cli_main, ["shards", "set", "2"])
    assert result.exit_code == 1, result.output
    assert "--force" in result.output
    result = runner.invoke(cli_main, ["shards", "set", "2", "--force"])
    assert result.exit_code == 0, result.output
    assert "was 4" in result.output
    result = runner.invoke(cli_main, ["--shards", "2", "limits", "set", "global", "30/s"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli_main, ["shards", "set", "0"])
    assert result.exit_code == 1, result.output
    assert "1<=x<=1024" in result.output


def test_the_celery_gate_holds_work_on_a_mismatch(redis_client: redis.Redis, ns: str) -> None:
    """The gate's health takes the refusal for broken configuration: every task is held,
    fail open or not (``_unreachable`` holds while ``health.broken``)."""
    pytest.importorskip("celery")
    from queue_ratelimit.celery._health import REDIS_FAILURES, RedisHealth

    Limiter(redis_client, namespace=ns, shards=3).acquire("acme")
    scheduler = FairScheduler(Limiter(redis_client, namespace=ns, fail_mode="open"))
    health = RedisHealth("open")
    try:
        scheduler.gate("acme", "j1")
    except REDIS_FAILURES as exc:  # (what the gate catches around its calls)
        health.failed(exc, 0.0)
    assert health.broken
    assert scheduler.backlog() == 0


def test_an_rq_worker_with_another_count_refuses_to_start(
    redis_client: redis.Redis, ns: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("rq")
    from queue_ratelimit.rq import _options

    Limiter(redis_client, namespace=ns, shards=2).acquire("acme")
    monkeypatch.setenv("QUEUE_RATELIMIT_SHARDS", "3")
    with pytest.raises(ShardCountMismatch):
        # (what the worker runs before it takes its first job)
        _options.scheduler_for(redis_client, ns).limiter._scripts.run_checks()
