"""End to end with real Celery workers (prefork, two of them) on the Redis broker and RabbitMQ.

Each test has a broker queue and a limiter namespace of its own, and starts its own workers
when it needs any; every task records each execution in Redis, stamped with Redis ``TIME``,
so counts are exact and times share one clock. A failing test shows the workers' logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from celery import chain, chord, group
from celery_e2e_app import release_key
from celery_harness import (
    AMQP_URL,
    E2E,
    amqp_unreachable_reason,
    redis_broker_url,
    redis_now,
    report_logs_on_failure,
    wait_for,
    with_db,
)
from conftest import REDIS_SERVER, RedisProcess, free_port, wait_until
from e2e_support import assert_cap, max_in_window

from queue_ratelimit import FairScheduler, Limit, Limiter, RateLimited
from queue_ratelimit._counters import flush_counters
from queue_ratelimit.celery import METRICS_TASK, last_hint
from queue_ratelimit.metrics import RateLimitCollector, read_snapshot

pytestmark = pytest.mark.slow

# Fault scenarios run on one broker by `make test` and on the other by `make faults`
# (conftest.py): each takes 10-14 s, and CI has 15 minutes for the whole suite.
FAULTS_ON_ONE_BROKER = {
    ("test_every_task_runs_once_across_a_limiter_redis_restart", "amqp"),
    ("test_fail_closed_holds_tasks_while_the_limiter_redis_is_down", "amqp"),
    ("test_work_keeps_flowing_while_the_limiter_redis_hangs", "redis"),
}

Row = dict[str, Any]


@pytest.fixture(params=["redis", "amqp"])
def broker(request: pytest.FixtureRequest, redis_url: str) -> str:
    if request.param == "redis":
        return redis_broker_url(redis_url)
    reason = amqp_unreachable_reason()
    if reason:
        pytest.skip(reason)
    return AMQP_URL


@pytest.fixture
def e2e(
    broker: str, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[E2E]:
    report_logs_on_failure(request.config)
    env = E2E(broker=broker, redis_url=redis_url, workdir=tmp_path)
    try:
        yield env
    finally:
        env.close()


def assert_exactly_once(rows: list[Row], published: set[str]) -> None:
    counts = Counter(str(r["id"]) for r in rows)
    missing = published - set(counts)
    twice = {i: n for i, n in counts.items() if n > 1}
    extra = set(counts) - published
    assert not missing, f"{len(missing)} tasks never ran"
    assert not twice, f"{len(twice)} tasks ran more than once: {twice}"
    assert not extra, f"runs of tasks never published: {extra}"


def queued_messages(e2e: E2E) -> list[dict[str, Any]]:
    """Headers of the messages waiting in the test's broker queue (consumed: no workers)."""
    app = e2e.app()
    found = []
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        while True:
            try:
                message = channel.basic_get(e2e.queue, no_ack=True)
            except Exception:  # RabbitMQ: no such queue, i.e. nothing was ever published
                break
            if message is None:
                break
            found.append(dict(message.headers or {}))
    return found


def test_tenant_and_global_caps_hold_across_workers(e2e: E2E) -> None:
    e2e.limiter.set_limit("tenant:*", Limit(10, burst=5))
    e2e.limiter.set_limit("global", Limit(25, burst=5))
    e2e.start_workers("w1", "w2")
    work = e2e.app().tasks["e2e.work"]
    tenants = {}
    for _ in range(40):
        for tenant in ("a", "b", "c"):
            tenants[work.apply_async(("cap",), rate_tenant=tenant).id] = tenant

    rows = e2e.wait_runs(len(tenants), timeout=30)
    assert_exactly_once(rows, set(tenants))
    assert all(r["tenant"] == tenants[r["id"]] for r in rows)
    assert len({r["host"] for r in rows}) == 2, "both workers ran tasks"
    assert_cap([r["t"] for r in rows], 25, 5, "global")
    for tenant in ("a", "b", "c"):
        assert_cap([r["t"] for r in rows if r["tenant"] == tenant], 10, 5, f"tenant {tenant}")
    # The global cap binds (3 x 10/s > 25/s) and is used: 120 jobs take about 115/25 s.
    span = max(r["t"] for r in rows) - min(r["t"] for r in rows)
    assert 115 / 25 * 0.9 <= span <= 115 / 25 * 1.5


SHARDED_TENANTS = ["t0", "t1", "t3", "t4", "t7", "t8"]  # two on each of 3 shards


def run_under_sharded_caps(e2e: E2E, sharded: Any, timeout: float) -> None:
    """Two workers run 20 tasks of each of ``SHARDED_TENANTS`` under ``tenant:*`` 10/s and
    ``global`` 25/s (sliced over the shards: bound R*T + B + N): each exactly once."""
    sharded.set_limit("tenant:*", Limit(10, burst=5))
    sharded.set_limit("global", Limit(25, burst=5))
    assert {sharded.shard_of(t) for t in SHARDED_TENANTS} == {0, 1, 2}
    e2e.start_workers("w1", "w2")
    work = e2e.app().tasks["e2e.work"]
    tenants = {}
    for _ in range(20):
        for tenant in SHARDED_TENANTS:
            tenants[work.apply_async(("cap",), rate_tenant=tenant).id] = tenant

    rows = e2e.wait_runs(len(tenants), timeout=timeout)
    assert_exactly_once(rows, set(tenants))
    assert all(r["tenant"] == tenants[r["id"]] for r in rows)
    assert_cap([r["t"] for r in rows], 25, 5 + 3, "global (sharded)")
    for tenant in SHARDED_TENANTS:
        assert_cap([r["t"] for r in rows if r["tenant"] == tenant], 10, 5, f"tenant {tenant}")


def test_a_sharded_namespace_runs_every_task_once_under_its_caps(e2e: E2E) -> None:
    """Workers and producer with ``shards=3``: each tenant decided and parked on its shard,
    the global cap sliced between the shards (its bound: R*T + B + N; docs/design.md)."""
    e2e.settings["shards"] = 3
    sharded = Limiter.from_url(e2e.redis_url, namespace=e2e.namespace, shards=3)
    run_under_sharded_caps(e2e, sharded, timeout=40)
    for tenant in SHARDED_TENANTS:
        shard = sharded.shard_keys[sharded.shard_of(tenant)]
        sharded.flush_counters()
        assert int(e2e.limiter.client.hget(shard.tenant(tenant), "n:a") or 0) >= 1
    sharded.close()


def test_priority_weights_hold_under_contention(e2e: E2E) -> None:
    e2e.limiter.set_limit("tenant:w", Limit(30, burst=3))
    e2e.start_workers("w1", "w2")
    work = e2e.app().tasks["e2e.work"]
    for _ in range(90):
        for priority in ("high", "low"):
            work.apply_async(("weights",), rate_tenant="w", rate_priority=priority)

    rows = e2e.wait_runs(180, timeout=40)
    high = sorted(r["t"] for r in rows if r["priority"] == "high")
    low = sorted(r["t"] for r in rows if r["priority"] == "low")
    assert len(high) == len(low) == 90
    # Contended: until the high class runs dry (it drains first, at 3/4 of the budget).
    end = min(high[-1], low[-1])
    ratio = sum(t <= end for t in high) / max(1, sum(t <= end for t in low))
    assert 2.2 <= ratio <= 4.0, f"high:low = {ratio:.2f} while both were backlogged"
    assert_cap([r["t"] for r in rows], 30, 3, "tenant w")


def test_a_flooding_tenant_does_not_delay_a_quiet_one(e2e: E2E) -> None:
    e2e.limiter.set_limit("tenant:*", Limit(10, burst=5))
    e2e.limiter.set_limit("global", Limit(100, burst=20))
    e2e.start_workers("w1", "w2")
    app = e2e.app()
    work = app.tasks["e2e.work"]
    published = {work.apply_async(("flood",), rate_tenant="flood").id for _ in range(60)}
    scheduler = app.queue_ratelimit.scheduler
    wait_for(
        lambda: scheduler.backlog(e2e.queue, "flood") >= 20,
        timeout=10,
        what="the flood to back up",
        on_timeout=e2e.logs,
    )

    sent_at = {}
    for _ in range(5):
        sent_at[work.apply_async(("quiet",), rate_tenant="quiet").id] = redis_now(e2e.records)
    quiet = wait_for(
        lambda: len(rows := [r for r in e2e.runs() if r["id"] in sent_at]) == 5 and rows,
        timeout=10,
        what="the quiet tenant's tasks",
        on_timeout=e2e.logs,
    )
    latency = max(r["t"] - sent_at[r["id"]] for r in quiet)
    assert latency < 2.0, f"a quiet task waited {latency:.2f}s behind the flood"
    assert scheduler.backlog(e2e.queue, "flood") > 0, "the flood was still backlogged"

    rows = e2e.wait_runs(65, timeout=30)
    assert_exactly_once(rows, published | set(sent_at))
    flood = [r["t"] for r in rows if r["tenant"] == "flood"]
    assert max(flood) - min(flood) > 4.0  # 60 jobs at 10/s
    assert_cap(flood, 10, 5, "tenant flood")


@pytest.mark.parametrize("backlog_first", [True, False], ids=["backlog-first", "workers-first"])
def test_busy_workers_serve_a_quiet_tenant_before_a_noisy_backlog(
    e2e: E2E, backlog_first: bool
) -> None:
    """No limit binds: the workers are the bottleneck. A noisy tenant's backlog, formed
    before or after the workers started, does not hold back a quiet tenant's jobs."""
    e2e.limiter.set_limit("global", Limit(100_000, burst=100_000))  # never binds
    work = e2e.app().tasks["e2e.work"]
    if not backlog_first:
        e2e.start_workers("w1", "w2")
    # (Jobs of 30 ms: long enough that the pool, not the consumer, is the bottleneck even
    # on a loaded machine; with 10 ms jobs a slow consumer left the pool idle at times, and
    # an idle pool rightly runs what arrives in the broker's order.)
    noisy = [work.apply_async(("noisy", 0.03), rate_tenant="noisy").id for _ in range(400)]
    quiet = {work.apply_async(("quiet", 0.03), rate_tenant="quiet").id for _ in range(10)}
    if backlog_first:
        e2e.start_workers("w1", "w2")

    rows = e2e.wait_runs(410, timeout=60)
    assert_exactly_once(rows, set(noisy) | quiet)
    order = [r["id"] for r in rows]
    last_quiet = max(order.index(i) for i in quiet)
    # FIFO runs them last (positions 400-409). Fair order runs them as soon as the workers
    # have pulled the noisy backlog ahead of them out of the broker into Redis (they run
    # noisy jobs meanwhile), plus the few jobs each worker holds.
    assert last_quiet < 300, f"the last quiet job ran {last_quiet}th of 410"
    if e2e.broker.startswith("redis"):
        # Every parked message was acknowledged to the broker (in batches): nothing is left
        # for the transport to restore and deliver again.
        broker = redis.Redis.from_url(e2e.broker)
        wait_until(lambda: broker.hlen("unacked") == 0, timeout=10, what="no unacked messages")
        assert broker.zcard("unacked_index") == 0
        broker.close()


def test_malformed_rate_headers_from_a_foreign_producer_do_not_stop_the_worker(e2e: E2E) -> None:
    """A producer without the plugin sends rate headers of any type and task ids Celery
    accepts but a backlog id cannot hold as they are: each job runs once (the malformed
    ones with the default options, through the backlog: the default tenant's bucket binds),
    the worker survives, the work behind it runs."""
    e2e.limiter.set_limit("tenant:default", Limit(20, burst=1))
    e2e.start_workers("w1")
    bad_headers: list[dict[str, Any]] = [
        {"qrl_cost": [1]},
        {"qrl_tenant": ["a"]},
        {"qrl_priority": {"x": 1}},
        {"qrl_cost": float("nan")},
        {"qrl_cost": "HUGE"},
        {"qrl_tenant": "x" * 100_000},
        {"qrl_tenant": None, "qrl_cost": -1},
        {"qrl_cost": True, "qrl_priority": "HIGH"},
        {"qrl_tenant": "é" * 50, "qrl_nonce": ["x"]},
        {"qrl_nonce": "not a nonce", "replaced_task_nesting": "x"},
        {"qrl_tenant": {"a": [1, {"b": None}]}, "qrl_nonce": 12},
    ]
    if e2e.broker.startswith("amqp"):
        # RabbitMQ cannot carry these (it closes the connection on a 2**1100, losing what
        # was sent before on it); they reach workers through the Redis broker only.
        bad_headers = [h for h in bad_headers if repr(h.get("qrl_cost")) not in ("'HUGE'", "nan")]
    messages = [
        {"task_id": f"raw-{i}-{e2e.queue}", "args": ["raw"], "headers": h}
        for i, h in enumerate(bad_headers)
    ]
    # Task ids with a space, of 300 characters, not ASCII: valid for Celery.
    messages += [
        {"task_id": task_id, "args": ["raw-id"], "headers": {}}
        for task_id in (f"raw id {e2e.queue}", f"{e2e.queue}-" + "x" * 300, f"é-{e2e.queue}")
    ]
    published = e2e.publish_raw(messages)
    assert len(published) >= len(messages) - 2, "most malformed messages were published"
    good = e2e.app().tasks["e2e.work"].apply_async(("good",), rate_tenant="fine").id
    ids = set(published) | {good}
    rows = e2e.wait_ids(ids, timeout=30, what="every job, malformed or not, to run")
    assert_exactly_once([r for r in rows if r["id"] in ids], ids)
    assert all(w.alive() for w in e2e.workers)
    assert "using defaults" in e2e.full_logs()


def test_a_producer_without_the_plugin_may_reuse_a_task_id(e2e: E2E) -> None:
    """Task ids are reused on purpose (``Task.replace``, callers' own ids). A producer
    without the plugin adds no publish nonce, yet a second message with an id whose first
    message went through the backlog (and left its done marker) runs too: on the Redis
    broker its delivery tag names the publish, on RabbitMQ it was never delivered before."""
    e2e.limiter.set_limit("tenant:reuse", Limit(1, per=3600, burst=1))
    e2e.start_workers("w1")
    assert e2e.limiter.acquire("reuse").allowed  # an empty bucket: the first is parked
    task_id = f"reused-{e2e.namespace}"
    headers = {"qrl_tenant": "reuse"}
    first = {"task_id": task_id, "args": ["first"], "headers": headers}
    assert e2e.publish_raw([first]) == [task_id]
    scheduler = FairScheduler(e2e.limiter)
    wait_for(lambda: scheduler.backlog(e2e.queue) == 1, timeout=20, what="the first to park")
    e2e.limiter.set_limit("tenant:reuse", Limit(100, burst=100))
    e2e.wait_ids({task_id}, timeout=20, what="the first message to run")
    done = e2e.limiter.keys.done(task_id) + ".*"
    wait_for(
        lambda: list(e2e.limiter.client.scan_iter(match=done)),
        timeout=10,
        what="the first message's done marker",
        on_timeout=e2e.logs,
    )
    # Again, and once more as a replacement would be published (Task.replace).
    again = [
        {"task_id": task_id, "args": ["second"], "headers": headers},
        {"task_id": task_id, "args": ["third"], "headers": {**headers, "replaced_task_nesting": 1}},
    ]
    assert e2e.publish_raw(again) == [task_id, task_id]
    rows = e2e.wait_runs(3, timeout=20)
    assert sorted(r["tag"] for r in rows if r["id"] == task_id) == ["first", "second", "third"]
    rows = e2e.wait_settled(timeout=10)
    assert len([r for r in rows if r["id"] == task_id]) == 3
    assert "dropping duplicate" not in e2e.full_logs()


def test_task_replace_under_a_binding_limit_runs_every_replacement(e2e: E2E) -> None:
    """``Task.replace`` gives the replacement the replaced task's id. Under a binding limit
    the replaced task ran through the backlog and left its done marker; the replacement
    (published by the worker, with a publish nonce of its own) must run all the same, once.
    Issue 11, finding 0: it was dropped as a duplicate and its result never came."""
    e2e.limiter.set_limit("tenant:rep", Limit(2, burst=1))
    e2e.start_workers("w1")
    assert e2e.limiter.acquire("rep").allowed  # an empty bucket: everything is parked
    task = e2e.app().tasks["e2e.replaced"]
    ids = {task.apply_async((f"r{i}",), rate_tenant="rep").id for i in range(4)}
    rows = e2e.wait_ids(ids, timeout=30, what="every replacement to run")
    assert sorted(r["tag"] for r in rows) == [f"r{i}-replacement" for i in range(4)]
    assert len(e2e.runs("replaced")) == 4
    rows = e2e.wait_settled(timeout=10)
    assert_exactly_once(rows, ids)
    assert "dropping duplicate" not in e2e.full_logs()


def test_a_parked_item_this_gate_did_not_write_is_discarded_and_the_rest_runs(e2e: E2E) -> None:
    """An RQ queue of the same name in the same namespace parks items with no payload (and
    any other client may park anything). Handed one, the gate used to raise on it half-way
    through a batch: the item stayed held (its lease renewed for ever) and the rest of the
    batch waited for its lease to run out. Now it is discarded, loudly, and the rest runs."""
    e2e.limiter.set_limit("tenant:*", Limit(20, burst=1))
    scheduler = FairScheduler(e2e.limiter)
    scheduler.submit("rq", "rq-job-1", queue=e2e.queue)  # what an RQ producer parks
    scheduler.submit("other", "junk-1", queue=e2e.queue, payload=b"not json")
    work = e2e.app().tasks["e2e.work"]
    published = {work.apply_async(("after",), rate_tenant="t").id for _ in range(6)}
    e2e.start_workers("w1")
    e2e.wait_ids(published, timeout=30, what="the parked tasks to run")
    rows = e2e.wait_settled(timeout=15)  # nothing left held or in flight
    assert_exactly_once(rows, published)
    assert e2e.full_logs().count("discarding") == 2


def test_past_max_backlog_work_stays_in_the_broker_and_none_is_lost(
    broker: str, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A busy worker pulls at most ``max_backlog`` jobs into Redis; the rest waits in the
    broker (and in the worker, unacknowledged) and still runs, once."""
    report_logs_on_failure(request.config)
    e2e = E2E(broker=broker, redis_url=redis_url, workdir=tmp_path, settings={"max_backlog": 20})
    request.node.funcargs["e2e"] = e2e
    try:
        work = e2e.app().tasks["e2e.work"]
        ids = {work.apply_async(("b", 0.01), rate_tenant=f"t{i % 3}").id for i in range(150)}
        e2e.start_workers("w1")
        scheduler = e2e.limiter
        largest = 0
        backlog_key = scheduler.keys.counts(e2e.queue)

        def all_ran() -> bool:
            nonlocal largest
            largest = max(largest, int(scheduler.client.hget(backlog_key, ":total") or 0))
            return len({r["id"] for r in e2e.runs()} & ids) == len(ids)

        wait_for(all_ran, timeout=60, what="every job to run", on_timeout=e2e.logs)
        assert 0 < largest <= 20, f"the backlog held {largest} jobs"
        assert_exactly_once(e2e.wait_settled(timeout=10), ids)
    finally:
        e2e.close()


@pytest.mark.parametrize("backlog_first", [True, False], ids=["backlog-first", "workers-first"])
def test_busy_workers_share_slots_by_priority_weight(e2e: E2E, backlog_first: bool) -> None:
    """Worker slots, not a rate budget, are contended: high gets 3 jobs for each low."""
    work = e2e.app().tasks["e2e.work"]
    if not backlog_first:
        e2e.start_workers("w1", "w2")
    for _ in range(120):
        for priority in ("low", "high"):
            # (30 ms: the pool stays the bottleneck on a loaded machine, as above.)
            work.apply_async(("weights", 0.03), rate_tenant="w", rate_priority=priority)
    if backlog_first:
        e2e.start_workers("w1", "w2")

    rows = e2e.wait_runs(240, timeout=60)
    # While both classes are backlogged: up to the moment the high class runs dry.
    priorities = [r["priority"] for r in rows]
    end = max(i for i, p in enumerate(priorities) if p == "high")
    window = priorities[20:end]  # after the jobs taken before the backlog formed
    ratio = window.count("high") / max(1, window.count("low"))
    assert 2.5 <= ratio <= 3.6, f"high:low = {ratio:.2f} while both were backlogged"


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one moment (an end at the same time as a start closes
    first)."""
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def intervals_of(e2e: E2E, ids: set[str]) -> list[tuple[float, float]]:
    start = {r["id"]: r["t"] for r in e2e.runs() if r["id"] in ids}
    end = {r["id"]: r["t"] for r in e2e.runs("done") if r["id"] in ids}
    return [(start[i], end[i]) for i in ids]


@pytest.mark.parametrize("acks_late", [False, True], ids=["acks-early", "acks-late"])
def test_a_concurrency_cap_holds_across_workers_and_holds_back_no_other_tenant(
    broker: str, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest, acks_late: bool
) -> None:
    report_logs_on_failure(request.config)
    e2e = E2E(broker=broker, redis_url=redis_url, workdir=tmp_path, acks_late=acks_late)
    request.node.funcargs["e2e"] = e2e
    try:
        e2e.limiter.set_concurrency("tenant:capped", 2)
        e2e.start_workers("w1", "w2")  # 4 processes
        work = e2e.app().tasks["e2e.work"]
        capped = {work.apply_async(("c", 0.3), rate_tenant="capped").id for _ in range(12)}
        free = {work.apply_async(("f", 0.3), rate_tenant="free").id for _ in range(6)}
        e2e.wait_runs(18, timeout=40, event="done")
        spans = intervals_of(e2e, capped)
        # Never more than the cap at once (by the jobs' own records), and the cap is used:
        # 12 jobs of 0.3 s two at a time take 1.8 s.
        assert max_overlap(spans) == 2
        span = max(b for _, b in spans) - min(a for a, _ in spans)
        assert span < 1.8 * 1.5, f"the cap of 2 was under-used: {span:.2f}s for 12 x 0.3s"
        # The other tenant used the free processes meanwhile.
        assert max(b for _, b in intervals_of(e2e, free)) < max(b for _, b in spans)
        # Every slot was given back when its job ended (just after the job recorded its
        # end), not left to run out (the lease is 30 s).
        wait_for(
            lambda: e2e.limiter.running("tenant:capped") == 0,
            timeout=5,
            what="every slot given back",
            on_timeout=e2e.logs,
        )
    finally:
        e2e.close()


def test_a_killed_workers_concurrency_slots_come_back_within_its_lease(
    broker: str, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    report_logs_on_failure(request.config)
    # Acknowledged early, the killed job is not delivered again (Celery's own semantics),
    # so nothing but the dead worker's slot stands in the next job's way.
    e2e = E2E(broker=broker, redis_url=redis_url, workdir=tmp_path, settings={"lease": 3})
    request.node.funcargs["e2e"] = e2e
    try:
        e2e.limiter.set_concurrency("tenant:capped", 1)
        (victim,) = e2e.start_workers("w1")
        work = e2e.app().tasks["e2e.work"]
        first = work.apply_async(("slow", 30), rate_tenant="capped").id
        wait_for(e2e.running, timeout=10, what="the capped job running")
        assert e2e.limiter.running("tenant:capped") == 1
        # The next worker is up before the kill: only the slot's lease is measured.
        e2e.start_workers("w2")
        victim.kill()
        killed_at = redis_now(e2e.records)
        second = work.apply_async(("next",), rate_tenant="capped").id
        rows = e2e.wait_ids({second}, timeout=30, what="the next capped job")
        ran_at = next(r["t"] for r in rows if r["id"] == second)
        assert ran_at - killed_at < 3 + 2, "the dead worker's slot came back with its lease"
        assert [r["id"] for r in e2e.runs()].count(first) == 1
    finally:
        e2e.close()


@pytest.mark.parametrize("acks_late", [False, True], ids=["acks-early", "acks-late"])
def test_no_task_lost_or_doubled_when_a_worker_is_killed(e2e: E2E, acks_late: bool) -> None:
    """SIGKILL one worker (main process and pool) while it runs re-admitted tasks.

    Its in-flight backlog items come back when their lease (3 s here) runs out and the
    survivor runs them. With ``acks_late=False`` Celery acknowledges a task as it starts, so
    every task runs exactly once. With ``acks_late=True`` a task that was running when its
    worker died runs again: that duplicate is Celery's own at-least-once semantics, not the
    gate's; no task is lost, and none that had finished before the kill runs again.
    """
    e2e.acks_late = acks_late
    e2e.settings["lease"] = 3
    e2e.limiter.set_limit("tenant:*", Limit(8, burst=2))
    w1, _ = e2e.start_workers("w1", "w2")
    work = e2e.app().tasks["e2e.work"]
    published = {work.apply_async(("kill",), {"sleep": 0.3}, rate_tenant="k").id for _ in range(40)}

    def w1_running() -> list[Row]:
        ran = [r for r in e2e.running() if r["host"].startswith("w1.")]
        return ran if len(e2e.runs()) >= 10 else []

    running = wait_for(w1_running, timeout=20, what="w1 running a task", on_timeout=e2e.logs)
    w1.kill()
    killed_at = redis_now(e2e.records)
    assert not any(pid_alive(p) for p in [w1.pid, *w1.pool_pids()])

    e2e.wait_ids(published, timeout=40, what="every task to run")
    rows = e2e.wait_settled(timeout=15)
    if not acks_late:
        assert_exactly_once(rows, published)
        return
    counts = Counter(r["id"] for r in rows)
    assert set(counts) == published, "no task lost"
    finished_before = {r["id"] for r in e2e.runs("done") if r["t"] < killed_at - 0.5}
    assert all(counts[i] == 1 for i in finished_before), "finished tasks never run again"
    # The tasks w1 was running when it died were handed back (their leases ran out) and
    # run by the survivor.
    reaped = e2e.limiter.client.hget(e2e.limiter.keys.shared, "n:reaped")
    assert int(reaped or 0) >= len(running)
    for row in running:
        again = [r for r in rows if r["id"] == row["id"] and r["host"].startswith("w2.")]
        assert again, f"{row['id']} (running on w1 when it died) was not run again"


def test_a_redelivered_copy_of_a_parked_task_does_not_run_again(e2e: E2E) -> None:
    """A broker redelivery (same task id) of work that already ran through the backlog is
    dropped by the gate: the done marker outlives the run (``dedupe_window``)."""
    e2e.limiter.set_limit("tenant:dup", Limit(5, burst=1))
    e2e.start_workers("w1", "w2")
    work = e2e.app().tasks["e2e.work"]
    assert e2e.limiter.acquire("dup").allowed  # an empty bucket: everything is parked
    ids = [f"dup-{i}-{e2e.namespace}" for i in range(3)]
    for task_id in ids:
        work.apply_async(("original",), rate_tenant="dup", task_id=task_id)
    e2e.wait_ids(set(ids), timeout=20, what="the parked tasks to run")

    # What a broker hands out again after a lost acknowledgement: the same message, with
    # the publish nonce of the original (its id in the backlog) among its headers.
    nonces = e2e.limiter.client.hkeys(e2e.limiter.keys.payload)
    assert not nonces  # every parked payload was dropped when its job ran
    done = [
        k.decode().rsplit(":", 1)[1]
        for k in e2e.limiter.client.scan_iter(match=f"{e2e.limiter.keys.scheduler}:done:*")
    ]
    by_task = {item.split(".")[0]: item.split(".")[2] for item in done}
    assert set(by_task) == set(ids)
    for task_id in ids:
        work.apply_async(
            ("redelivered",),
            rate_tenant="dup",
            task_id=task_id,
            headers={"qrl_nonce": by_task[task_id]},
        )
    wait_for(
        lambda: e2e.full_logs().count("dropping duplicate delivery") == len(ids),
        timeout=20,
        what="the gate to drop every copy",
        on_timeout=e2e.logs,
    )
    rows = e2e.wait_settled(timeout=10)
    assert Counter(r["id"] for r in rows if r["id"] in ids) == dict.fromkeys(ids, 1)


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return False


def _limiter_redis_with_aof(tmp_path: Path, port: int | None = None) -> RedisProcess:
    """A limiter Redis of the test's own that keeps every write (AOF, fsync always), so it
    can be stopped and started again (same ``port``) with the parked backlog intact."""
    aof = ["--appendonly", "yes", "--appendfsync", "always"]
    return RedisProcess(tmp_path / "limiter", port=port or free_port(), extra=aof).start()


def _warm_workers(e2e: E2E, limit: Limit) -> tuple[Any, set[str]]:
    """Give every tenant ``limit``, start two workers and run four tasks through them
    before a fault; returns the task (published without hints) and the ids that ran."""
    e2e.limiter.set_limit("tenant:*", limit)
    e2e.start_workers("w1", "w2")
    work = e2e.app(hints=False).tasks["e2e.work"]
    warm = {work.apply_async(("warm",), rate_tenant="c").id for _ in range(4)}
    e2e.wait_ids(warm, timeout=20, what="tasks before the fault to run")
    return work, warm


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_every_task_runs_once_across_a_limiter_redis_restart(
    broker: str, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Stop the limiter's Redis (AOF, fsync always) mid-run and start it again.

    The broker and the execution records live elsewhere, so the broker keeps working: tasks
    published meanwhile run under the default fail mode (open), and the parked backlog comes
    back from the AOF and drains. Tasks are acknowledged late, so some finish while Redis
    is down and their in-flight records can only be closed once it is back; with a short
    lease, a record left open would hand the task out again. Every task runs exactly once.
    """
    report_logs_on_failure(request.config)
    server = _limiter_redis_with_aof(tmp_path)
    e2e = E2E(
        broker=broker,
        redis_url=server.url,
        record_url=redis_url,
        workdir=tmp_path,
        acks_late=True,
        settings={"lease": 5},
    )
    request.node.funcargs["e2e"] = e2e  # for the log report
    try:
        e2e.limiter.set_limit("tenant:*", Limit(10, burst=2))
        e2e.start_workers("w1", "w2")
        work = e2e.app().tasks["e2e.work"]
        before = {
            work.apply_async(("before",), {"sleep": 0.5}, rate_tenant="r").id for _ in range(40)
        }
        e2e.wait_runs(10, timeout=20)
        running = wait_for(e2e.running, timeout=10, what="a task running", on_timeout=e2e.logs)
        # Admitted before the outage: running, or waiting in a worker for a free process.
        admitted = int(e2e.limiter.client.zcard(e2e.limiter.keys.inflight))
        with contextlib.suppress(redis.ConnectionError):
            e2e.limiter.client.execute_command("SHUTDOWN")  # fsyncs the AOF, then exits
        down_at, down_t = time.monotonic(), redis_now(e2e.records)
        assert server.proc is not None
        server.proc.wait(timeout=10)
        ran_before_outage = len(e2e.runs())
        assert ran_before_outage < 40, "the outage must come while work is parked"

        during = {work.apply_async(("during",), rate_tenant="d").id for _ in range(10)}
        rows = e2e.wait_ids(
            during, timeout=20, what="tasks published during the outage to run (fail open)"
        )
        # Parked work waits in the (absent) backlog: none of it started meanwhile, only
        # what had been admitted already (the runs at the outage include some of those).
        started = sum(r["id"] in before for r in rows)
        assert ran_before_outage <= started <= ran_before_outage + admitted
        # Not a synchronisation: the outage should last a few of the gate's timer ticks.
        time.sleep(max(0.0, down_at + 2.0 - time.monotonic()))
        _limiter_redis_with_aof(tmp_path, port=server.port)

        e2e.wait_ids(before, timeout=40, what="the parked backlog to drain")
        e2e.wait_settled(timeout=15)  # a record left open would be handed out again (lease)
        assert_exactly_once(e2e.runs(), before | during)
        # Some tasks finished (and were acknowledged) while Redis was down.
        done = {r["id"]: r["t"] for r in e2e.runs("done")}
        assert any(done[r["id"]] > down_t for r in running)
    finally:
        e2e.close()
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=server.port).shutdown(nosave=True)


def test_rate_options_survive_retry_defaults_canvas_and_eta(e2e: E2E) -> None:
    e2e.limiter.set_limit("tenant:*", Limit(20, burst=10))
    e2e.start_workers("w1", "w2")
    app = e2e.app()
    work, flaky, decorated = (app.tasks[n] for n in ("e2e.work", "e2e.flaky", "e2e.decorated"))

    retried = flaky.apply_async(("retry",), rate_tenant="retrier", rate_priority="high").id
    default = decorated.delay("decorator").id
    chained = chain(work.si("c1"), work.si("c2"), work.si("c3")).apply_async(rate_tenant="chainer")
    grouped = group(work.si(f"g{i}").set(rate_tenant="grouper") for i in range(5)).apply_async()
    eta_sent = redis_now(e2e.records)
    eta = work.apply_async(("eta",), countdown=1.5, rate_tenant="eta").id

    e2e.wait_runs(2 + 1 + 3 + 5 + 1, timeout=30)
    rows = e2e.wait_settled(timeout=10)
    by_tag = Counter(r["tag"] for r in rows)
    assert by_tag == Counter({"retry": 2, "decorator": 1, "c1": 1, "c2": 1, "c3": 1,
                              "eta": 1, **{f"g{i}": 1 for i in range(5)}})  # fmt: skip

    attempts = sorted((r for r in rows if r["id"] == retried), key=lambda r: r["retries"])
    assert [(r["retries"], r["tenant"], r["priority"]) for r in attempts] == [
        (0, "retrier", "high"),
        (1, "retrier", "high"),
    ]
    (decor,) = (r for r in rows if r["id"] == default)
    assert (decor["tenant"], decor["priority"]) == ("decor", "low")
    chain_rows = [r for r in rows if r["tag"] in ("c1", "c2", "c3")]
    assert {r["tenant"] for r in chain_rows} == {"chainer"}
    assert [r["tag"] for r in sorted(chain_rows, key=lambda r: r["t"])] == ["c1", "c2", "c3"]
    assert chained.id == next(r["id"] for r in chain_rows if r["tag"] == "c3")
    assert {r["tenant"] for r in rows if r["tag"].startswith("g")} == {"grouper"}
    assert len(grouped.results) == 5
    (eta_row,) = (r for r in rows if r["id"] == eta)
    assert eta_row["t"] >= eta_sent + 1.4, "an ETA task runs when due, not before"
    # Gated when due, not on arrival: its one admission debited the tenant's bucket, and
    # the bucket was last written (Redis TIME, µs) when the task fell due, or when the
    # credit that admission took along went back unused (credit_ttl, 250 ms, later).
    flush_counters(e2e.limiter)
    tenant_hash = e2e.limiter.client.hgetall(e2e.limiter.keys.tenant("eta"))
    assert float(tenant_hash[b"n:a"]) == 1
    debited_at = float(tenant_hash[b"b:u"]) / 1e6
    assert eta_sent + 1.4 <= debited_at <= eta_row["t"] + 1.0, (eta_sent, debited_at, eta_row)


def test_reject_policy_raises_before_publishing(e2e: E2E) -> None:
    app = e2e.app(policy="reject")
    work = app.tasks["e2e.work"]
    e2e.limiter.set_limit("tenant:strict", Limit(1, per=60, burst=1))
    assert e2e.limiter.acquire("strict").allowed  # spend its only token

    with pytest.raises(RateLimited) as caught:
        work.apply_async(("rejected",), rate_tenant="strict")
    assert caught.value.denied_by == "tenant:strict"
    assert caught.value.wait_ms > 1000
    assert queued_messages(e2e) == [], "nothing was published"

    work.apply_async(("accepted",), rate_tenant="other")
    (headers,) = queued_messages(e2e)
    assert headers["qrl_tenant"] == "other"


def test_hint_policy_attaches_hints_and_last_hint_returns_them(e2e: E2E) -> None:
    app = e2e.app()  # policy "hint" is the default
    work = app.tasks["e2e.work"]
    e2e.limiter.set_limit("tenant:busy", Limit(1, per=60, burst=1))
    assert e2e.limiter.acquire("busy").allowed

    result = work.apply_async(("hinted",), rate_tenant="busy", rate_priority="low")
    hint = last_hint()
    assert hint is not None
    assert result.rate_hint == hint
    assert (hint.allowed, hint.denied_by) == (False, "tenant:busy")
    assert hint.wait_ms > 1000
    work.apply_async(("free",), rate_tenant="idle")
    free = last_hint()
    assert free is not None
    assert free.allowed

    busy, idle = queued_messages(e2e)
    assert busy["qrl_hint"] == hint.as_header()
    assert (busy["qrl_tenant"], busy["qrl_priority"], busy["qrl_cost"]) == ("busy", "low", 1)
    assert idle["qrl_hint"]["allowed"] is True
    assert busy.get("eta") is None  # "hint" never delays

    quiet = e2e.app(hints=False).tasks["e2e.work"]
    quiet.apply_async(("unhinted",), rate_tenant="busy")
    assert last_hint() is None
    (headers,) = queued_messages(e2e)
    assert "qrl_hint" not in headers
    assert headers["qrl_tenant"] == "busy"


def test_hints_count_the_jobs_ahead_and_workers_take_them_off(e2e: E2E) -> None:
    """The issue's example at an hourly rate (nothing refills while the test runs): 90 jobs
    at once into ``tenant:*`` 10 per period, no worker running. Each is told when it would
    start behind those published before it (in the broker); once a worker has run them all
    (at once, on credit, or from the backlog), none is counted ahead of the next job."""
    e2e.limiter.set_limit("tenant:*", Limit(10, per=3600, burst=10))
    app = e2e.app()
    work = app.tasks["e2e.work"]
    hints, ids = [], set()
    for n in range(90):
        if n % 10 == 9:  # a publish that bypasses RateLimitedTask.apply_async
            result = app.send_task("e2e.work", ("ahead",), rate_tenant="acme")
        else:
            result = work.apply_async(("ahead",), rate_tenant="acme")
        hints.append(last_hint())
        ids.add(result.id)
    assert (hints[4].allowed, hints[4].wait_ms, hints[4].backlog) == (True, 0, 4)
    assert [h.backlog for h in hints] == list(range(90))
    assert hints[89].wait_ms == pytest.approx(80 * 360_000, rel=1e-3)

    e2e.limiter.set_limit("tenant:*", Limit(1000, burst=100))
    e2e.start_workers("w1")
    assert_exactly_once(e2e.wait_runs(90, timeout=60), ids)
    scheduler = FairScheduler(e2e.limiter)
    wait_for(
        lambda: scheduler.hint("acme", queue=e2e.queue).backlog == 0,
        timeout=10,
        what="no job counted ahead any more",
        on_timeout=e2e.logs,
    )


def test_delay_policy_sets_a_countdown_from_the_hint(e2e: E2E) -> None:
    work = e2e.app(policy="delay").tasks["e2e.work"]
    e2e.limiter.set_limit("tenant:busy", Limit(1, per=60, burst=1))
    assert e2e.limiter.acquire("busy").allowed
    before = datetime.now(UTC)
    work.apply_async(("delayed",), rate_tenant="busy")
    work.apply_async(("now",), rate_tenant="idle")
    busy, idle = queued_messages(e2e)
    eta = datetime.fromisoformat(busy["eta"])
    assert timedelta(seconds=50) < eta - before < timedelta(seconds=61)
    assert idle.get("eta") is None


def test_inspect_qrl_gate_reads_each_workers_gate_and_the_worker_logs_throttling(
    e2e: E2E,
) -> None:
    """``celery -A app inspect qrl_gate``: per worker, the gate's counters, what it holds and
    what waits in its queue's backlog; ``inspect stats`` carries the counters too; and the
    worker says at INFO what it holds back, a line per tenant per ``log_interval``."""
    e2e.settings = {"log_interval": 0.5}
    # Two windows: the hour's binds, and the gate's views say which.
    e2e.limiter.set_limit("tenant:slow", [Limit(100), Limit(1, per=3600, burst=2)])
    (worker,) = e2e.start_workers("w1")
    work = e2e.app().tasks["e2e.work"]
    for _ in range(6):
        work.apply_async(("inspected",), rate_tenant="slow")
    e2e.wait_runs(2, timeout=20)
    scheduler = FairScheduler(e2e.limiter)
    wait_for(lambda: scheduler.backlog(e2e.queue) == 4, timeout=20, what="4 parked",
             on_timeout=e2e.logs)  # fmt: skip

    (host,) = e2e.ready_hosts()  # (named, the command returns when it has answered)

    def held_back(counters: dict[str, int]) -> int:
        """Jobs the gate's counters say wait in the backlog: every park, less the parked
        jobs it took back out. (``parked`` alone counts a job parked for want of a slot and
        then re-admitted: on RabbitMQ the six messages arrive at once, and one that comes
        while a dispatch's reply is on its way is parked for a slot, so the second run may
        come out of the backlog: admitted 1, parked 5, readmitted 1.)"""
        return counters["parked"] - counters["readmitted"]

    def parked_by_the_gate() -> int:
        stats = e2e.app().control.inspect(timeout=10, destination=[host]).stats() or {}
        return sum(held_back(s["queue_ratelimit"]) for s in stats.values())

    # The gate counts a message parked when Redis's reply reaches it, which may come a
    # moment after the backlog shows it: wait for the gate's own count. (And a job parked
    # for a slot is held back by the first dispatch that judges it, a poll later.)
    app = e2e.app()
    wait_for(
        lambda: held_back((r := qrl_gate(app, host))["counters"]) == 4 and r["held_back_by"],
        timeout=20,
        what="the gate's count of 4 parked, and what held them back",
        on_timeout=e2e.logs,
    )
    command = [sys.executable, "-m", "celery", "-A", "celery_e2e_app", "inspect", "qrl_gate",
               "--json", "--timeout", "10", "--destination", host]  # fmt: skip
    done = subprocess.run(
        command, check=False, cwd=Path(__file__).parent, env=e2e.env(), capture_output=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    (reply,) = json.loads(done.stdout).values()
    assert reply["namespace"] == e2e.namespace
    assert reply["lanes"] == [e2e.queue]
    assert reply["redis"] == "ok"
    counters = reply["counters"]
    assert held_back(counters) == 4
    assert counters["admitted"] + counters["readmitted"] == 2, "the two runs"
    assert reply["worker"]["held"] == 0
    queue = reply["queues"][e2e.queue]
    assert (queue["waiting"], queue["tenants"]) == (4, {"slow": 4})
    assert queue["parked_tenants"]["slow"] > 60, "until its next token, in seconds"
    # Whichever path the jobs took (parked by the gate for the budget; or, on RabbitMQ,
    # parked for a slot and held back at dispatch, whose reply names the window too).
    assert reply["held_back_by"] == {e2e.queue: {"slow": "tenant:slow (1/h)"}}

    assert parked_by_the_gate() == 4  # (inspect stats carries the counters too)
    said_with_window(e2e, "slow", "tenant:slow (1/h)")
    assert worker.alive()


def qrl_gate(app: Any, host: str) -> dict[str, Any]:
    """The worker's ``qrl_gate`` reply (as ``celery inspect qrl_gate`` asks it)."""
    replies = app.control.inspect(timeout=10, destination=[host])._request("qrl_gate")
    return dict((replies or {})[host])


def said_with_window(e2e: E2E, tenant: str, binding: str) -> None:
    """Wait for the worker's throttling line at INFO that names the binding window."""
    line = f"queue-ratelimit: throttled: tenant {tenant} on {e2e.queue}: "
    wait_for(
        lambda: any(line in x and f"({binding})" in x for x in e2e.full_logs().splitlines()),
        timeout=20,
        what=f"a throttling line at INFO naming {binding}",
        on_timeout=e2e.logs,
    )


def test_work_parked_for_a_slot_is_said_to_be_held_back_by_the_window_that_binds(
    e2e: E2E,
) -> None:
    """A job that arrives while every process is busy is parked for a slot before any
    budget is asked; it meets its budget at dispatch. The worker still says which scope
    and window holds it back: ``held_back_by`` in ``inspect qrl_gate`` and the throttling
    line (the dispatch's reply names them; the gate never judged the job)."""
    e2e.settings = {"log_interval": 0.5}
    e2e.limiter.set_limit("tenant:slow", [Limit(100), Limit(1, per=3600, burst=2)])
    assert e2e.limiter.acquire("slow").allowed
    assert e2e.limiter.acquire("slow").allowed  # the hour's budget is spent
    e2e.start_workers("w1")  # two processes: saturated with four jobs taken on
    (host,) = e2e.ready_hosts()
    app = e2e.app()

    hold = app.tasks["e2e.hold"]
    for n in range(4):
        hold.apply_async((f"busy-{n}",), rate_tenant="busy")
    wait_for(lambda: qrl_gate(app, host)["worker"]["taken"] == 4, timeout=20,
             what="four jobs taken on: every process busy, one queued each",
             on_timeout=e2e.logs)  # fmt: skip
    work = app.tasks["e2e.work"]
    for _ in range(3):
        work.apply_async(("slot",), rate_tenant="slow")

    seen: list[dict[str, Any]] = [{}]

    def held_back_at_dispatch() -> dict[str, Any] | None:
        reply = seen[0] = qrl_gate(app, host)
        waiting = reply["queues"][e2e.queue]["tenants"]
        return reply if waiting == {"slow": 3} and reply["held_back_by"] else None

    reply = wait_for(
        held_back_at_dispatch,
        timeout=20,
        what="three jobs parked for a slot, and held back at dispatch",
        on_timeout=lambda: f"the last reply: {seen[0]}\n{e2e.logs()}",
    )
    # (On RabbitMQ a job on hold may have been parked for a slot too, and taken back.)
    assert reply["counters"]["parked_for_slots"] >= 3
    assert reply["held_back_by"] == {e2e.queue: {"slow": "tenant:slow (1/h)"}}
    said_with_window(e2e, "slow", "tenant:slow (1/h)")
    assert {r["tenant"] for r in e2e.runs()} == {"busy"}
    e2e.records.rpush(release_key(e2e.namespace), *["go"] * 4)


def test_metrics_task_publishes_a_snapshot_and_the_collector_reads_it(e2e: E2E) -> None:
    from prometheus_client import CollectorRegistry

    e2e.limiter.set_limit("tenant:m", Limit(20, burst=2))
    e2e.start_workers("w1", "w2")
    app = e2e.app()
    for _ in range(10):
        app.tasks["e2e.work"].apply_async(("metrics",), rate_tenant="m")
    e2e.wait_runs(10, timeout=20)
    # With every budget spent, the metrics task still runs at once: the gate exempts it.
    e2e.limiter.set_limit("global", Limit(1, per=3600, burst=1))
    assert e2e.limiter.acquire("someone").allowed
    assert not e2e.limiter.acquire("someone").allowed
    app.tasks[METRICS_TASK].delay()

    snap = wait_for(
        lambda: read_snapshot(e2e.limiter), timeout=10, what="a snapshot", on_timeout=e2e.logs
    )
    assert snap["namespace"] == e2e.namespace
    assert snap["tenants"]["m"]["allowed"] == 10
    assert snap["tenants"]["m"]["denied"] >= 1
    assert snap["denied_by"]["global"] >= 1  # shared scopes; tenants count their own
    assert snap["limits"]["tenant:m"]["rate_per_s"] == 20
    assert set(snap["buckets"]) >= {"global", "tenant:m"}
    assert snap["totals"]["allowed"] >= 11

    registry = CollectorRegistry()
    registry.register(RateLimitCollector(e2e.limiter))
    names = {m.name for m in registry.collect()}
    assert names >= {
        "queue_ratelimit_decisions",
        "queue_ratelimit_scope_decisions",
        "queue_ratelimit_bucket_fill_ratio",
        "queue_ratelimit_tenant_parked_jobs",
        "queue_ratelimit_denied_wait_seconds",
        "queue_ratelimit_in_flight_jobs",
    }
    value = registry.get_sample_value(
        "queue_ratelimit_tenant_decisions_total",
        {"namespace": e2e.namespace, "tenant": "m", "outcome": "allowed"},
    )
    assert value == 10
    assert json.dumps(snap)  # JSON-able, as stored


def test_a_chord_runs_every_header_task_and_the_callback_once(
    broker: str, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A chord (3 header tasks + callback) with a tenant: it needs a result backend, here
    another database of the test Redis."""
    report_logs_on_failure(request.config)
    # The database after the Redis broker's.
    backend_db = (int(urlsplit(redis_broker_url(redis_url)).path.strip("/") or 0) + 1) % 16
    e2e = E2E(
        broker=broker,
        redis_url=redis_url,
        workdir=tmp_path,
        backend=with_db(redis_url, backend_db),
    )
    request.node.funcargs["e2e"] = e2e  # for the log report
    try:
        e2e.limiter.set_limit("tenant:*", Limit(5, burst=2))  # a header task may be parked
        e2e.start_workers("w1", "w2")
        work = e2e.app().tasks["e2e.work"]
        header = [work.si(f"h{i}") for i in range(3)]
        result = chord(header, work.si("callback")).apply_async(rate_tenant="chorus")

        rows = e2e.wait_runs(4, timeout=30)
        rows = e2e.wait_settled(timeout=15)
        assert Counter(r["tag"] for r in rows) == Counter(["h0", "h1", "h2", "callback"])
        assert len({r["id"] for r in rows}) == 4, "each task ran exactly once"
        (callback,) = (r for r in rows if r["tag"] == "callback")
        assert callback["id"] == result.id
        assert callback["t"] >= max(r["t"] for r in rows if r["tag"] != "callback")
        assert {r["tenant"] for r in rows} == {"chorus"}, "the callback's too"

    finally:
        e2e.close()


def test_warm_shutdown_with_parked_and_running_work_loses_nothing(e2e: E2E) -> None:
    """SIGTERM to a worker's main process while a throttled tenant's tasks are parked and
    others run: the running ones finish, and after a new worker starts every task has run
    exactly once (what the stopped worker had re-admitted but not started comes back when
    its lease, 3 s here, runs out)."""
    e2e.settings["lease"] = 3
    e2e.limiter.set_limit("tenant:slow", Limit(2, burst=1))
    (w1,) = e2e.start_workers("w1")
    work = e2e.app().tasks["e2e.work"]
    published = {
        work.apply_async(("slow",), {"sleep": 0.4}, rate_tenant="slow").id for _ in range(12)
    }
    published.add(work.apply_async(("busy",), {"sleep": 1.5}, rate_tenant="busy").id)
    scheduler = FairScheduler(e2e.limiter)

    def parked_and_both_running() -> bool:
        tags = {r["tag"] for r in e2e.running()}
        return scheduler.backlog(e2e.queue, "slow") >= 5 and tags == {"slow", "busy"}

    # One of the throttled tenant's tasks and the other one run; the rest is parked.
    wait_for(parked_and_both_running, timeout=15, what="slow tasks parked and running",
             on_timeout=e2e.logs)  # fmt: skip
    running = {r["id"] for r in e2e.running()}
    w1.proc.send_signal(signal.SIGTERM)
    try:
        code = w1.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"w1 did not stop after SIGTERM\n{e2e.logs()}")
    assert code == 0, f"w1 exited with {code}"
    done = {r["id"] for r in e2e.runs("done")}
    assert running <= done, "warm shutdown lets running tasks finish"
    assert len(e2e.runs()) < len(published), "work was left when w1 stopped"

    e2e.start_workers("w2")
    e2e.wait_ids(published, timeout=40, what="every task to run after the restart")
    rows = e2e.wait_settled(timeout=15)
    assert_exactly_once(rows, published)


def test_control_purge_reaches_the_tasks_parked_in_the_backlog(e2e: E2E) -> None:
    """#11: ``app.control.purge()`` (what ``celery purge`` and a worker's ``--purge`` do)
    emptied the broker only; the tasks a worker had parked were acknowledged to the broker
    already and ran later. Now the purge drops them too, and counts them."""
    e2e.limiter.set_limit("tenant:*", Limit(1, per=3600, burst=2))  # 2 each run, 6 wait
    e2e.limiter.set_limit("tenant:after", Limit(100, burst=100))
    e2e.start_workers("w1")
    app = e2e.app()
    work = app.tasks["e2e.work"]
    published = {work.apply_async(("held",), rate_tenant=f"t{i % 3}").id for i in range(24)}
    scheduler = FairScheduler(e2e.limiter)
    wait_for(lambda: len(e2e.runs()) == 6 and scheduler.backlog(e2e.queue) == 18, timeout=30,
             what="6 tasks run and 18 parked", on_timeout=e2e.logs)  # fmt: skip
    ran = {r["id"] for r in e2e.runs()}

    assert app.control.purge() == 18

    assert scheduler.backlog(e2e.queue) == 0
    # What was left would be admitted now; only the task published after the purge runs.
    e2e.limiter.delete_limit("tenant:*")
    after = work.apply_async(("after",), rate_tenant="after").id
    e2e.wait_ids({after}, timeout=30, what="the task published after the purge")
    rows = e2e.wait_settled(timeout=15)
    assert ran <= published
    assert_exactly_once(rows, {*ran, after})


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_fail_closed_holds_tasks_while_the_limiter_redis_is_down(
    broker: str, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """fail_mode "closed": with the limiter's Redis gone (the broker and the records live
    elsewhere) no task runs; once it is back on the same port they all run, once each."""
    report_logs_on_failure(request.config)
    server = _limiter_redis_with_aof(tmp_path)
    e2e = E2E(
        broker=broker,
        redis_url=server.url,
        record_url=redis_url,
        workdir=tmp_path,
        # No credit: jobs admitted in advance (paid for before the outage) would run.
        settings={"fail_mode": "closed", "lease": 5, "credit": 0},
    )
    request.node.funcargs["e2e"] = e2e  # for the log report
    try:
        work, warm = _warm_workers(e2e, Limit(50, burst=20))  # never binds here

        server.stop()
        held = {work.apply_async(("held",), rate_tenant="c").id for _ in range(10)}
        wait_for(
            lambda: e2e.full_logs().count("gate fails CLOSED") >= 1,
            timeout=20,
            what="the gate to notice the outage",
            on_timeout=e2e.logs,
        )
        # A negative check over a while (the gate retries a held task every second).
        until = time.monotonic() + 3.0
        while time.monotonic() < until:
            ran = {r["id"] for r in e2e.runs()} & held
            assert not ran, f"{len(ran)} tasks ran while the limiter's Redis was down"
            time.sleep(0.1)

        _limiter_redis_with_aof(tmp_path, port=server.port)
        e2e.wait_ids(held, timeout=30, what="the held tasks to run once Redis is back")
        rows = e2e.wait_settled(timeout=15)
        assert_exactly_once(rows, warm | held)
    finally:
        e2e.close()
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(port=server.port).shutdown(nosave=True)


def test_an_error_redis_answers_holds_tasks_even_when_failing_open(e2e: E2E) -> None:
    """Broken data in the limiter's Redis (every key of the namespace of the wrong type, as
    a script error would leave it) is not an outage: under fail_mode "open" the gate runs
    none of the tasks, logs it, and runs each once when the data is fixed."""
    e2e.settings = {"credit": 0}  # (no admission paid for in advance)
    work, warm = _warm_workers(e2e, Limit(10, burst=5))

    client = e2e.limiter.client
    broken = list(client.scan_iter(match=f"*{{{e2e.namespace}}}*", count=1000))
    for key in broken:
        client.delete(key)
        client.set(key, "not what the scripts expect")
    held = {work.apply_async(("held",), rate_tenant="c").id for _ in range(10)}
    wait_for(
        lambda: any(t in e2e.full_logs() for t in ("answered with an error", "gate fails")),
        timeout=20,
        what="the gate to meet the error",
        on_timeout=e2e.logs,
    )
    # A negative check over a while (the gate asks again every poll or after a rest).
    until = time.monotonic() + 3.0
    while time.monotonic() < until:
        ran = {r["id"] for r in e2e.runs()} & held
        assert not ran, f"{len(ran)} tasks ran while Redis answered errors (failed open)"
        time.sleep(0.1)
    assert "gate fails OPEN" not in e2e.full_logs()  # (not taken for an outage)

    client.delete(*broken)
    e2e.limiter.set_limit("tenant:*", Limit(10, burst=5))
    e2e.wait_ids(held, timeout=30, what="the held tasks to run once the data is fixed")
    rows = e2e.wait_settled(timeout=15)
    assert_exactly_once(rows, warm | held)


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
def test_a_limiter_redis_that_stops_answering_fails_open_promptly(
    broker: str, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """SIGSTOP the limiter's Redis (its sockets stay open; nothing answers): the gate gives
    up within its timeout and, between probes, fails open at once, so the tasks published
    meanwhile all run, once each, while it stays stopped (not one per timeout)."""
    report_logs_on_failure(request.config)
    server = RedisProcess(tmp_path / "limiter", port=free_port()).start()
    assert server.proc is not None
    e2e = E2E(
        broker=broker,
        redis_url=server.url,
        record_url=redis_url,
        workdir=tmp_path,
        settings={"credit": 0},
    )
    request.node.funcargs["e2e"] = e2e  # for the log report
    try:
        work, warm = _warm_workers(e2e, Limit(1000, burst=100))  # never binds here

        os.kill(server.proc.pid, signal.SIGSTOP)
        meanwhile = {work.apply_async(("meanwhile",), rate_tenant="c").id for _ in range(60)}
        # A gate that waited out the timeout (2 s) for every task would need at least
        # 60 x 2 s / 2 workers = 60 s; one that rests between probes, a few seconds.
        e2e.wait_ids(meanwhile, timeout=30, what="the tasks to run while Redis is stopped")
        assert "gate fails OPEN" in e2e.full_logs()
        rows = e2e.runs()
        assert_exactly_once(rows, warm | meanwhile)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        e2e.close()
        server.stop()


# What a worker logs when a call to the limiter's Redis has waited out its timeout: the
# client's breaker (now), or the gate's fail mode (also before the breaker).
NOTICED = ("did not answer within the timeout", "gate fails OPEN")


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server is not installed")
@pytest.mark.parametrize("hints", [True, False], ids=["hints", "no-hints"])
def test_work_keeps_flowing_while_the_limiter_redis_hangs(
    broker: str, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest, hints: bool
) -> None:
    """SIGSTOP the limiter's Redis while the workers hold parked and re-admitted work (their
    timers renew leases, look for caps, settle jobs) and a producer publishes with hints.

    Once one call has waited out the timeout, every call of the process fails at once (the
    client's breaker) until a probe finds Redis answering: the producer publishes without a
    hint at once, the gates fail open at once, so every task published while Redis is
    stopped runs before it is continued (issue #11: before, a hinted publish waited 2 s each
    and the workers ran 4 jobs in 15 s). Afterwards the parked work drains, all once each."""
    report_logs_on_failure(request.config)
    server = RedisProcess(tmp_path / "limiter", port=free_port()).start()
    assert server.proc is not None
    e2e = E2E(
        broker=broker,
        redis_url=server.url,
        record_url=redis_url,
        workdir=tmp_path,
        # Longer than the fault: a lease that ran out during it would hand a job that is
        # running (its settlement waiting for Redis) to another worker.
        settings={"lease": 90},
    )
    request.node.funcargs["e2e"] = e2e  # for the log report
    count = 60
    # For all of it: publishing, then the runs (a gate or a producer that waits out the
    # timeout for each of them needs 60 x 2 s or half that over two workers).
    deadline = 45.0
    stopped = False
    try:
        e2e.limiter.set_limit("tenant:*", Limit(10, burst=2))
        e2e.start_workers("w1", "w2")
        quiet = e2e.app(hints=False).tasks["e2e.work"]
        # More than the limit admits: a backlog of parked work, re-admitted as it allows.
        before = {
            quiet.apply_async(("before",), kwargs={"sleep": 0.05}, rate_tenant=f"b{n % 3}").id
            for n in range(90)
        }
        e2e.wait_runs(10, timeout=30)
        work = e2e.app(hints=hints).tasks["e2e.work"]
        # (the producer's client connected before the fault)
        before.add(work.apply_async(("probe",), rate_tenant="m").id)

        os.kill(server.proc.pid, signal.SIGSTOP)
        stopped = True
        # Until a worker has found Redis silent (a call waited out the timeout), what it
        # sent Redis is in doubt: parked work may be in the backlog or not, so it is held
        # until Redis can tell (run now, it might run again from the backlog). A few tasks
        # published now make each worker find out.
        early: set[str] = set()

        def noticed() -> bool:
            early.add(quiet.apply_async(("early",), rate_tenant="e").id)
            logs = [w.log.read_text(errors="replace") for w in e2e.workers]
            return all(any(sign in text for sign in NOTICED) for text in logs)

        wait_for(noticed, timeout=30, what="both workers to find Redis silent", interval=0.5)
        begun = time.monotonic()
        meanwhile: set[str] = set()
        while len(meanwhile) < count:
            assert time.monotonic() - begun < deadline, (
                f"{len(meanwhile)} of {count} published within {deadline}s of the stop"
            )
            meanwhile.add(work.apply_async(("meanwhile",), rate_tenant=f"m{len(meanwhile) % 3}").id)
        left = max(deadline - (time.monotonic() - begun), 1.0)
        rows = e2e.wait_ids(meanwhile, timeout=left, what="the tasks published while stopped")
        ran_while_stopped = {r["id"] for r in rows} & meanwhile
        assert len(ran_while_stopped) == count  # all of them, with Redis still stopped
        assert "gate fails OPEN" in e2e.full_logs()

        os.kill(server.proc.pid, signal.SIGCONT)
        stopped = False
        published = before | early | meanwhile
        e2e.wait_ids(published, timeout=120, what="the held and parked work after the resume")
        rows = e2e.wait_settled(timeout=30)
        assert_exactly_once(rows, published)
    finally:
        if stopped:
            os.kill(server.proc.pid, signal.SIGCONT)
        e2e.close()
        server.stop()


def test_protocol_1_messages_are_gated_like_protocol_2(e2e: E2E) -> None:
    """A producer on Celery's task protocol 1 (``task_protocol=1``: the task's name, id and
    retries travel in the body; the headers hold only what was added, here the publish
    hook's rate options and nonce) goes through the gate as protocol 2 does: a tenant at
    its burst is parked, not run, and runs once each when the limit allows (issue #11:
    the gate read the name from the headers only, so such messages ran ungated)."""
    e2e.limiter.set_limit("tenant:*", Limit(1, per=3600, burst=2))
    e2e.start_workers("w1", "w2")
    app = e2e.app(hints=False)
    app.conf.task_protocol = 1
    work = app.tasks["e2e.work"]
    published = {work.apply_async(("v1",), rate_tenant="old").id for _ in range(6)}
    scheduler = FairScheduler(e2e.limiter)
    wait_for(
        lambda: scheduler.backlog(e2e.queue, "old") == 4,
        timeout=20,
        what="4 protocol 1 tasks parked",
        on_timeout=e2e.logs,
    )
    rows = e2e.wait_runs(2, timeout=20)
    assert {r["tenant"] for r in rows} == {"old"}  # the tenant came through the headers
    assert len({r["id"] for r in rows} & published) == 2  # the burst, no more
    e2e.limiter.set_limit("tenant:*", Limit(1000, burst=1000))
    e2e.wait_ids(published, timeout=30, what="the parked protocol 1 tasks to run")
    assert_exactly_once(e2e.wait_settled(timeout=20), published)


def test_celery_task_rate_limit_still_applies_after_the_gate(e2e: E2E) -> None:
    """A task's own ``rate_limit`` ('5/s') throttles it on a worker although the gate,
    whose limits never bind here, admits every message at once."""
    e2e.limiter.set_limit("tenant:*", Limit(1000, burst=1000))
    e2e.start_workers("w1")  # one worker, -c 2
    limited = e2e.app().tasks["e2e.limited"]
    count = 15
    published = {limited.apply_async(("limited",), rate_tenant="r").id for _ in range(count)}
    e2e.wait_ids(published, timeout=30, what="every rate-limited task to run")
    rows = e2e.wait_settled(timeout=10)
    assert_exactly_once(rows, published)
    times = sorted(r["t"] for r in rows)
    # Celery's bucket (5/s, capacity 1): about (count - 1) / 5 s; loosely, allowing a burst.
    assert times[-1] - times[0] >= (count - 3) / 5 * 0.8, times
    assert max_in_window(times, 1.0) <= 5 + 3
