"""RQ's own views tell the truth: jobs waiting in the fair backlog count and are listed.

A job of our ``Queue`` waits on RQ's list or in the fair backlog (status "queued" in both).
``Queue.count``, ``len(queue)``, ``job_ids``/``get_job_ids`` and ``jobs`` cover both, and so
does ``rq info --queue-class queue_ratelimit.rq.Queue``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
import rq
from click.testing import CliRunner
from rq.cli.cli import main as rq_main
from rq.job import JobStatus

from queue_ratelimit.rq import Queue


@pytest.fixture
def queue(redis_client: redis.Redis, namespace: str) -> Iterator[Queue]:
    yield Queue(f"q-{namespace}", connection=redis_client, rate_namespace=namespace)
    keys = list(redis_client.scan_iter(match=f"*{namespace}*", count=1000))
    if keys:
        redis_client.delete(*keys)


def waiting_in_both(queue: Queue) -> tuple[list[str], list[str]]:
    """Jobs of plain RQ producers on RQ's list, and jobs of ours in the fair backlog (a
    backlog formed: a job another tenant parked there first). Returns (listed, parked)."""
    conn = queue.connection
    plain = rq.Queue(queue.name, connection=conn)
    first = plain.create_job(len, args=("a",))
    first.save()
    queue.rate_scheduler.submit("other", first.id, queue=queue.name)
    parked = [first.id, *(queue.enqueue(len, "abc", rate_tenant="acme").id for _ in range(3))]
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
