"""Purging a fair backlog while other processes submit and dispatch (spawned processes,
nothing shared but Redis; the threaded race is in tests/test_scheduler_lanes.py), with the
CLI's ``backlog purge`` among them. Every item ends up dispatched (and acked) exactly once
or purged exactly once, never both; a purge of one tenant drops only that tenant's items;
the counts end at zero with no key left behind. Probed in docs/reliability.md, "Probed in
session 8"."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from typing import Any

import redis
from test_scheduler_lanes import lane_keys

from queue_ratelimit import FairScheduler, Limiter

QUEUE = "mail"
TENANTS = 7
PER_SUBMITTER = 400


def _scheduler(url: str, namespace: str) -> FairScheduler:
    return FairScheduler(Limiter(redis.Redis.from_url(url), namespace=namespace))


def submitter(url: str, namespace: str, n: int, start: Any, out: Any) -> None:
    s = _scheduler(url, namespace)
    start.wait(60)
    ids = []
    for i in range(PER_SUBMITTER):
        item = f"t{i % TENANTS}.s{n}.{i}"  # the tenant first: a tenant's purge is checked
        assert s.submit(f"t{i % TENANTS}", item, queue=QUEUE, priority=("high", "low")[i % 2])
        ids.append(item)
    out.put(("submitted", ids))


def dispatcher(url: str, namespace: str, start: Any, stop: Any, out: Any) -> None:
    s = _scheduler(url, namespace)
    start.wait(60)
    served = []
    while not stop.is_set():
        for item in s.dispatch([QUEUE], max_items=5).items:
            assert s.ack(item), item.id  # dispatched once: its in-flight record is ours
            served.append(item.id)
    out.put(("served", served))


def purger(url: str, namespace: str, start: Any, stop: Any, out: Any) -> None:
    s = _scheduler(url, namespace)
    start.wait(60)
    rounds = 0
    purged: list[tuple[str | None, list[str]]] = []
    while not stop.is_set():
        rounds += 1
        tenant = None if rounds % 4 == 0 else f"t{rounds % TENANTS}"
        purged.append((tenant, s.purge(QUEUE, tenant=tenant)))
    out.put(("purged", purged))


def test_purge_racing_dispatch_in_other_processes(redis_url: str, namespace: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    start, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    feeders = [
        ctx.Process(target=submitter, args=(redis_url, namespace, n, start, out)) for n in range(3)
    ]
    others = [
        ctx.Process(target=dispatcher, args=(redis_url, namespace, start, stop, out)),
        ctx.Process(target=dispatcher, args=(redis_url, namespace, start, stop, out)),
        ctx.Process(target=purger, args=(redis_url, namespace, start, stop, out)),
    ]
    for proc in feeders + others:
        proc.start()
    start.set()
    # The CLI's purge of one tenant, meanwhile, as an operator would run it.
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUEUE_RATELIMIT_")}
    cli = subprocess.run(
        [sys.executable, "-c", "from queue_ratelimit.cli import main; main()",
         "backlog", "purge", "--queue", QUEUE, "--tenant", "t0", "--yes"],
        env={**env, "REDIS_URL": redis_url, "QUEUE_RATELIMIT_NAMESPACE": namespace},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    reports: dict[str, list[Any]] = {"submitted": [], "served": [], "purged": []}
    try:
        for _ in feeders:
            kind, got = out.get(timeout=120)
            reports[kind].append(got)
        stop.set()
        for _ in others:
            kind, got = out.get(timeout=120)
            reports[kind].append(got)
    finally:
        stop.set()
        for proc in feeders + others:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    assert all(proc.exitcode == 0 for proc in feeders + others)

    submitted = [i for ids in reports["submitted"] for i in ids]
    served = [i for ids in reports["served"] for i in ids]
    s = _scheduler(redis_url, namespace)
    rounds = [r for rs in reports["purged"] for r in rs] + [(None, s.purge(QUEUE))]
    purged = [i for _, ids in rounds for i in ids]
    # A tenant's purge dropped that tenant's items only.
    for tenant, ids in rounds:
        if tenant is not None:
            assert all(i.startswith(f"{tenant}.") for i in ids), (tenant, ids[:5])
    assert len(served) == len(set(served)), "an item was dispatched twice"
    assert len(purged) == len(set(purged)), "an item was purged twice"
    assert not set(served) & set(purged), "an item was both dispatched and purged"
    # What is left is what the CLI purged (it says how many): all of them tenant t0's.
    by_cli = set(submitted) - set(served) - set(purged)
    assert all(i.startswith("t0.") for i in by_cli), sorted(by_cli)[:5]
    assert cli.stdout.startswith(f"{QUEUE}: purged {len(by_cli)} item(s)"), (
        cli.stdout,
        len(by_cli),
    )
    assert not (set(served) | set(purged)) - set(submitted)
    assert served
    assert purged
    assert s.backlog(QUEUE) == 0
    assert s.in_flight() == 0
    assert lane_keys(s, s.client, QUEUE) == set()
    s.client.close()
