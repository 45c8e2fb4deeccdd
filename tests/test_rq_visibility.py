"""RQ's own views tell the truth: jobs waiting in the fair backlog count and are listed;
``queue-ratelimit rq info`` shows them per queue and tenant.

A job of our ``Queue`` waits on RQ's list or in the fair backlog (status "queued" in both).
``Queue.count``, ``len(queue)``, ``job_ids``/``get_job_ids`` and ``jobs`` cover both, and so
does ``rq info --queue-class queue_ratelimit.rq.Queue``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
import rq
from click.testing import CliRunner
from rq.cli.cli import main as rq_main
from rq.job import JobStatus

from queue_ratelimit import Limit
from queue_ratelimit.cli import main
from queue_ratelimit.rq import Queue


@pytest.fixture(params=[1, 3], ids=["one-slot", "3-shards"])
def queue(
    redis_client: redis.Redis,
    namespace: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Queue]:
    """Every view on one slot and on a namespace over 3 shards (QUEUE_RATELIMIT_SHARDS, as
    workers, producers and the CLI take it): the tenants of ``waiting_in_both`` then live
    on different shards (acme on 2, other on 0, default on 1)."""
    monkeypatch.setenv("QUEUE_RATELIMIT_SHARDS", str(request.param))
    yield Queue(f"q-{namespace}", connection=redis_client, rate_namespace=namespace)
    keys = list(redis_client.scan_iter(match=f"*{namespace}*", count=1000))
    if keys:
        redis_client.delete(*keys)


def waiting_in_both(queue: Queue) -> tuple[list[str], list[str]]:
    """Jobs of plain RQ producers on RQ's list, and jobs of ours in the fair backlog (a
    backlog formed: the first job of each tenant parked there directly, so the lane is
    contended on the shard of each). Returns (listed, parked)."""
    conn = queue.connection
    plain = rq.Queue(queue.name, connection=conn)
    first = []
    for tenant in ("other", "acme"):
        job = plain.create_job(len, args=("a",), meta={"rate_tenant": tenant})
        job.save()
        queue.rate_scheduler.submit(tenant, job.id, queue=queue.name)
        first.append(job.id)
    parked = [*first, *(queue.enqueue(len, "abc", rate_tenant="acme").id for _ in range(2))]
    listed = [plain.enqueue(len, "x").id for _ in range(2)]
    assert conn.llen(queue.key) == 2
    assert queue.rate_backlog == 4
    return listed, parked


def test_count_and_len_include_the_fair_backlog(queue: Queue) -> None:
    waiting_in_both(queue)
    assert queue.count == len(queue) == 6
    assert not queue.is_empty()
    assert rq.Queue(queue.name, connection=queue.connection).count == 2, "RQ's class: its list"


def test_job_ids_list_rqs_list_then_the_backlog(queue: Queue) -> None:
    listed, parked = waiting_in_both(queue)
    ids = queue.job_ids
    assert ids[:2] == listed
    assert sorted(ids[2:]) == sorted(parked)  # longest waiting first (ties: by id)
    assert queue.get_job_ids(0, 2) == listed
    assert queue.get_job_ids(1, 3) == ids[1:4]
    assert queue.get_job_ids(3) == ids[3:]
    assert queue.get_job_ids(5, 10) == ids[5:]
    assert queue.get_job_ids(7) == []
    assert queue.get_job_ids(2, 0) == []
    assert [j.id for j in queue.jobs] == ids
    assert {j.get_status() for j in queue.jobs} == {JobStatus.QUEUED}


def test_an_empty_queue_and_a_name_no_lane_can_have(queue: Queue, namespace: str) -> None:
    assert (queue.count, queue.job_ids) == (0, [])
    conn = queue.connection
    odd = Queue(f"odd:{namespace}", connection=conn, rate_namespace=namespace)
    job = rq.Queue(odd.name, connection=conn).enqueue(len, "x")
    assert (odd.count, odd.job_ids) == (1, [job.id]), "RQ's list alone, as RQ counts it"


def test_rq_info_with_our_queue_class_counts_the_backlog(
    queue: Queue, redis_url: str, namespace: str
) -> None:
    waiting_in_both(queue)
    runner = CliRunner()
    args = ["info", "--url", redis_url, "--only-queues", queue.name]
    ours = runner.invoke(
        rq_main,
        [*args, "--queue-class", "queue_ratelimit.rq.Queue"],
        env={"QUEUE_RATELIMIT_NAMESPACE": namespace},
    )
    assert ours.exit_code == 0, ours.output
    assert "1 queues, 6 jobs total" in ours.output
    plain = runner.invoke(rq_main, args)
    assert "1 queues, 2 jobs total" in plain.output, "RQ's own class: its list only"


# -- queue-ratelimit rq info: per queue and tenant ------------------------------------------
def rq_info(redis_url: str, namespace: str, *args: str) -> str:
    result = CliRunner().invoke(
        main, ["--url", redis_url, "--namespace", namespace, "rq", "info", *args]
    )
    assert result.exit_code == 0, result.output
    return result.output


def test_rq_info_counts_waiting_and_parked_per_tenant(
    queue: Queue, redis_url: str, namespace: str
) -> None:
    waiting_in_both(queue)
    shown = json.loads(rq_info(redis_url, namespace, queue.name, "--json"))
    assert shown["namespace"] == namespace
    (q,) = shown["queues"]
    assert (q["queue"], q["waiting"], q["parked"], q["running"]) == (queue.name, 2, 4, 0)
    assert q["tenants"] == {
        "acme": {"waiting": 0, "parked": 3, "running": 0},
        "default": {"waiting": 2, "parked": 0, "running": 0},  # plain RQ jobs: no options
        "other": {"waiting": 0, "parked": 1, "running": 0},
    }
    assert q["unread"] == {"waiting": 0, "parked": 0, "running": 0}
    assert shown["slots"] == {}
    text = rq_info(redis_url, namespace, queue.name)
    assert [line.split() for line in text.splitlines()[1:]] == [
        ["queue", "tenant", "waiting", "parked", "running", "held", "back", "by"],
        [queue.name, "(all)", "2", "4", "0"],
        ["acme", "0", "3", "0"],
        ["default", "2", "0", "0"],
        ["other", "0", "1", "0"],
    ]
    # Without QUEUES: every queue RQ knows, ours among them.
    every = json.loads(rq_info(redis_url, namespace, "--json"))
    assert queue.name in [found["queue"] for found in every["queues"]]


def test_rq_info_says_what_holds_back_each_tenants_parked_jobs(
    queue: Queue, redis_url: str, namespace: str
) -> None:
    """The scope, with the window that binds when it has several, of each tenant with
    parked jobs, as its next job would be judged now; one that no budget holds back (its
    jobs wait for a worker) is not named."""
    waiting_in_both(queue)
    limiter = queue.rate_scheduler.limiter  # (with the queue's shards)
    limiter.set_limit("tenant:acme", [Limit(100), Limit(1, per=3600, burst=1)])
    assert limiter.acquire("acme", queue.name).allowed  # its hour's budget is spent
    (q,) = json.loads(rq_info(redis_url, namespace, queue.name, "--json"))["queues"]
    assert q["held_back_by"] == {"acme": "tenant:acme (1/h)"}
    limiter.set_concurrency("tenant:other", 1)
    assert limiter.acquire("other", queue.name).allowed  # its one slot is held
    text = rq_info(redis_url, namespace, queue.name)
    assert [line.split() for line in text.splitlines()[2:5]] == [
        [queue.name, "(all)", "2", "4", "0"],
        ["acme", "0", "3", "0", "tenant:acme", "(1/h)"],
        ["default", "2", "0", "0"],
    ]
    assert ["other", "0", "1", "0", "tenant:other"] in [line.split() for line in text.splitlines()]


def park(queue: Queue, tenant: str, *, priority: str = "normal", cost: float = 1) -> str:
    """A job of ``tenant`` parked in the fair backlog through the scheduler's API."""
    job = rq.Queue(queue.name, connection=queue.connection).create_job(
        len, args=("a",), meta={"rate_tenant": tenant}
    )
    job.save()
    assert queue.rate_scheduler.submit(
        tenant, job.id, queue=queue.name, priority=priority, cost=cost
    )
    return job.id


def spend(queue: Queue, tenant: str, **kw: object) -> None:
    """Take what the buckets of ``tenant``'s work (of ``kw``) hold until one denies."""
    limiter = queue.rate_scheduler.limiter
    for _ in range(100):
        if not limiter.acquire(tenant, queue.name, **kw).allowed:  # type: ignore[arg-type]
            return
    raise AssertionError("never denied")


def test_rq_info_names_the_priority_scope_of_the_job_served_next(
    queue: Queue, redis_url: str, namespace: str
) -> None:
    """A tenant whose parked work is of priority ``low``, with ``priority:low`` spent: its
    next job is held back by that scope (a job judged as of priority ``normal`` was not)."""
    queue.rate_scheduler.limiter.set_limit("priority:low", Limit(1, per=3600, burst=1))
    spend(queue, "acme", priority="low")  # (on its shard: a share of the scope)
    park(queue, "acme", priority="low")
    (q,) = json.loads(rq_info(redis_url, namespace, queue.name, "--json"))["queues"]
    assert q["tenants"]["acme"]["parked"] == 1
    assert q["held_back_by"] == {"acme": "priority:low"}


def test_rq_info_judges_the_next_job_at_its_own_cost(
    queue: Queue, redis_url: str, namespace: str
) -> None:
    """A tenant whose bucket holds 2 tokens and whose next job costs 5 is held back by its
    own scope (a job judged at cost 1 would pass)."""
    limiter = queue.rate_scheduler.limiter
    limiter.set_limit("tenant:acme", Limit(10, per=3600, burst=10))
    assert limiter.acquire("acme", queue.name, cost=8).allowed  # 2 tokens left
    park(queue, "acme", cost=5)
    (q,) = json.loads(rq_info(redis_url, namespace, queue.name, "--json"))["queues"]
    assert q["held_back_by"] == {"acme": "tenant:acme"}


def test_rq_info_reads_tenants_as_a_worker_does(
    queue: Queue, redis_url: str, namespace: str
) -> None:
    conn = queue.connection
    plain = rq.Queue(queue.name, connection=conn)
    ours = [queue.enqueue(len, "x", rate_tenant=t).id for t in ("acme", "acme", "zed")]
    odd = plain.enqueue(len, "y", meta={"rate_tenant": "not a name"})  # runs as the default
    broken = plain.enqueue(len, "z")
    conn.hset(broken.key, "meta", b"not a pickle")  # another serializer's: not ours to read
    assert conn.llen(queue.key) == 5, "uncontended: all on RQ's list"
    (q,) = json.loads(rq_info(redis_url, namespace, queue.name, "--json"))["queues"]
    assert q["waiting"] == 5
    waiting = {t: c["waiting"] for t, c in q["tenants"].items()}
    assert waiting == {"acme": 2, "zed": 1, "default": 1}, (ours, odd.id)
    assert q["unread"]["waiting"] == 1
    # Past --max-read, jobs count as unread (in the totals, under no tenant).
    (q,) = json.loads(rq_info(redis_url, namespace, queue.name, "--json", "--max-read", "2"))[
        "queues"
    ]
    assert (q["waiting"], q["unread"]["waiting"]) == (5, 3)
    assert {t: c["waiting"] for t, c in q["tenants"].items()} == {"acme": 2}
    text = rq_info(redis_url, namespace, queue.name, "--max-read", "2")
    assert ["(unread)", "3", "0"] in [line.split() for line in text.splitlines()]


def test_rq_info_shows_the_slots_held_against_each_cap_that_applies(
    queue: Queue, redis_url: str, namespace: str
) -> None:
    waiting_in_both(queue)
    limiter = queue.rate_scheduler.limiter  # (with the queue's shards)
    limiter.set_concurrency("tenant:*", 4)
    limiter.set_concurrency("tenant:acme", 1)  # its own cap wins over the default
    limiter.set_concurrency(f"tenant:*:queue:{queue.name}", 2)
    held = limiter.acquire("acme", queue.name)  # a job of acme running: one slot held
    assert held.allowed
    assert held.slot is not None
    slots = json.loads(rq_info(redis_url, namespace, queue.name, "--json"))["slots"]
    assert slots == {
        "tenant:acme": {"cap": 1, "held": 1},
        f"tenant:acme:queue:{queue.name}": {"cap": 2, "held": 1},
        "tenant:default": {"cap": 4, "held": 0},
        f"tenant:default:queue:{queue.name}": {"cap": 2, "held": 0},
        "tenant:other": {"cap": 4, "held": 0},
        f"tenant:other:queue:{queue.name}": {"cap": 2, "held": 0},
    }
    text = rq_info(redis_url, namespace, queue.name)
    assert "concurrency slots held: tenant:acme 1/1, " in text


def test_rq_info_with_no_queue_and_without_redis(namespace: str, redis_url: str) -> None:
    result = CliRunner().invoke(
        main, ["--url", redis_url, "--namespace", namespace, "rq", "info", f"none-{namespace}"]
    )
    assert result.exit_code == 0, result.output
    assert [line.split() for line in result.output.splitlines()[1:]] == [
        ["queue", "tenant", "waiting", "parked", "running", "held", "back", "by"],
        [f"none-{namespace}", "(all)", "0", "0", "0"],
    ]
    down = CliRunner().invoke(main, ["--url", "redis://127.0.0.1:1/0", "rq", "info"])
    assert down.exit_code == 1
    assert down.output.startswith("Error: cannot reach Redis at redis://127.0.0.1:1/0")


# -- emptying: RQ's list and the fair backlog ----------------------------------------------------


def test_empty_removes_the_jobs_waiting_in_the_backlog_too(queue: Queue) -> None:
    """#11: ``Queue.empty()`` left the jobs a worker had parked in the fair backlog, to run
    later. Now both go, with their records, as RQ's ``empty`` removes the listed ones."""
    listed, parked = waiting_in_both(queue)
    conn = queue.connection
    # Two jobs a worker took from the backlog already: in progress, not waiting.
    # (On a sharded namespace a dispatch serves one shard: ask until two are out.)
    taken: set[str] = set()
    while len(taken) < 2:
        batch = queue.rate_scheduler.dispatch(
            [queue.name], max_items=2 - len(taken), hand_over=True
        )
        taken |= {i.id for i in batch.items}
    assert len(taken) == 2
    assert taken <= set(parked)
    still = [i for i in parked if i not in taken]

    assert queue.empty() == len(listed) + len(still)

    assert (queue.count, queue.job_ids, queue.rate_backlog) == (0, [], 0)
    for job_id in listed + still:
        assert not conn.exists(f"rq:job:{job_id}"), job_id
    for job_id in taken:
        assert conn.exists(f"rq:job:{job_id}"), f"{job_id} was handed out: not ours to delete"
    assert not conn.sismember(queue.rate_scheduler.keys.lanes, queue.name)


def test_rq_empty_with_our_queue_class_empties_the_backlog(
    queue: Queue, redis_url: str, namespace: str
) -> None:
    waiting_in_both(queue)
    result = CliRunner().invoke(
        rq_main,
        ["empty", "--url", redis_url, "--queue-class", "queue_ratelimit.rq.Queue", queue.name],
        env={"QUEUE_RATELIMIT_NAMESPACE": namespace},
    )
    assert result.exit_code == 0, result.output
    assert "6 jobs removed" in result.output
    assert queue.count == 0
