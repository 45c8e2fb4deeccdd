"""Jobs per second of our RQ ``SimpleWorker`` (limits that never bind) against stock RQ's.

``python -m benchmarks rq_throughput`` (or ``python -m benchmarks.rq_throughput``) prints one
JSON object. Each measurement enqueues N no-op jobs, then runs one ``SimpleWorker`` in burst
mode in this process until the queue is empty; its rate is N over the time ``work()`` took.
Each round gives each worker N jobs in four chunks, run stock/patched/patched/stock (ABBA),
on the same Redis in the same run; a round's ratio compares the two workers' rates over its
chunks, and the figures are medians over the rounds. Two cases:

- ``plain_list``: the jobs wait on RQ's own list, as they do whenever the queue is not
  contended; the patched worker passes each through the gate (one script call) after
  finding the fair backlog empty.
- ``fair_backlog``: the jobs wait in the fair backlog (the queue was contended when they were
  enqueued); the patched worker takes each with one dispatch call that hands it over onto
  RQ's intermediate list. Stock RQ runs the same jobs from its plain list.

Redis commands per job come from ``INFO commandstats`` over the timed ``work()`` call; CPU per
job from this process's CPU time and the server's (``INFO cpu``) over the same call.
``cpu_ratio`` (stock CPU per job over patched, worker and Redis together) is the figure the
machine's other load disturbs least; ``ratio`` is the measured one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import redis

from queue_ratelimit import Limit, Limiter

from ._common import command_stats, env_int, log, machine_info, median, reset_command_stats, sig

QUEUE = "bench"
NAMESPACE = "rqbench"
TENANTS = ("acme", "bigco", "tiny")
# High enough never to bind: the gate runs the full decision but always admits.
NEVER_BINDS = Limit(1_000_000, burst=1_000_000)
TARGET_RATIO = 0.9
CHUNKS = 4  # per round and worker; chunks of the two workers alternate


def noop() -> None:
    """The job: nothing, so the worker's own cost is what is measured."""


def _fresh(client: redis.Redis) -> None:
    client.flushdb()
    limiter = Limiter(client, namespace=NAMESPACE)
    limiter.set_limit("global", NEVER_BINDS)
    limiter.set_limit("tenant:*", NEVER_BINDS)


def _enqueue(client: redis.Redis, jobs: int, *, patched: bool, backlog: bool) -> None:
    """N no-op jobs, round-robin over three tenants, on RQ's list or in the fair backlog."""
    import rq

    from queue_ratelimit.rq import Queue

    queue: Any = (
        Queue(QUEUE, connection=client, rate_namespace=NAMESPACE)
        if patched
        else rq.Queue(QUEUE, connection=client)
    )
    datas = [
        Queue.prepare_data(noop, meta={"rate_tenant": TENANTS[i % len(TENANTS)]})
        for i in range(jobs)
    ]
    if patched and backlog:
        from rq.job import JobStatus

        # A first job in the backlog makes the queue contended: the rest are routed there.
        first = queue.create_job(noop, meta={"rate_tenant": TENANTS[0]}, status=JobStatus.QUEUED)
        first.save()
        queue.rate_scheduler.submit(TENANTS[0], first.id, queue=QUEUE)
        datas = datas[1:]
    for start in range(0, len(datas), 500):
        queue.enqueue_many(datas[start : start + 500])
    if patched:
        where = queue.rate_backlog if backlog else client.llen(queue.key)
        assert where == jobs, f"{where} of {jobs} jobs where they should wait"


def _work(client: redis.Redis, *, patched: bool) -> tuple[float, dict[str, float]]:
    """Run one burst worker until the queue is drained: (seconds, commands per name, and
    the CPU seconds of this process and of the Redis server)."""
    import rq

    from queue_ratelimit.rq import Queue, SimpleWorker

    if patched:
        queue: Any = Queue(QUEUE, connection=client, rate_namespace=NAMESPACE)
        worker: Any = SimpleWorker([queue], connection=client)
    else:
        queue = rq.Queue(QUEUE, connection=client)
        worker = rq.SimpleWorker([queue], connection=client)
    reset_command_stats(client)
    server_cpu = _server_cpu(client)
    cpu = time.process_time()
    started = time.perf_counter()
    # ERROR: RQ logs to stdout, which carries only the JSON result here (the durability
    # warning about this throwaway, diskless Redis would land in it).
    worker.work(burst=True, logging_level="ERROR")
    elapsed = time.perf_counter() - started
    stats: dict[str, float] = {name: s.calls for name, s in command_stats(client).items()}
    stats[":client_cpu_s"] = time.process_time() - cpu
    stats[":server_cpu_s"] = _server_cpu(client) - server_cpu
    left = client.llen(queue.key) + (queue.rate_backlog if patched else 0)
    assert left == 0, f"{left} jobs left after a burst run"
    return elapsed, stats


def _server_cpu(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _measure(client: redis.Redis, jobs: int, *, patched: bool, backlog: bool) -> dict[str, Any]:
    _fresh(client)
    _enqueue(client, jobs, patched=patched, backlog=backlog)
    seconds, stats = _work(client, patched=patched)
    finished = client.zcard(f"rq:finished:{QUEUE}")
    assert finished == jobs, f"{finished} of {jobs} jobs finished"
    return {"seconds": seconds, "stats": stats}


def _round(client: redis.Redis, jobs: int, r: int, *, backlog: bool) -> dict[str, Any]:
    """One round: ``jobs`` jobs for each worker, in chunks run stock/patched/patched/stock
    (ABBA), so that drift in the machine's speed falls on both alike."""
    chunk = max(1, jobs // CHUNKS)
    sides: dict[str, dict[str, Any]] = {
        n: {"seconds": 0.0, "jobs": 0, "stats": {}} for n in ("stock", "patched")
    }
    for c in range(CHUNKS):
        order = ("stock", "patched") if (c + r) % 2 == 0 else ("patched", "stock")
        for name in order:
            result = _measure(client, chunk, patched=name == "patched", backlog=backlog)
            side = sides[name]
            side["seconds"] += result["seconds"]
            side["jobs"] += chunk
            for cmd, calls in result["stats"].items():
                side["stats"][cmd] = side["stats"].get(cmd, 0) + calls
    for side in sides.values():
        side["per_second"] = side["jobs"] / side["seconds"]
    ratio = sides["patched"]["per_second"] / sides["stock"]["per_second"]
    log(
        f"   round {r + 1}: stock {sides['stock']['per_second']:6.0f} jobs/s, patched "
        f"{sides['patched']['per_second']:6.0f} jobs/s, ratio {ratio:.3f}"
    )
    return {**sides, "ratio": ratio}


def _case(client: redis.Redis, jobs: int, rounds: int, *, backlog: bool) -> dict[str, Any]:
    results = [_round(client, jobs, r, backlog=backlog) for r in range(rounds)]
    out: dict[str, Any] = {}
    for name in ("stock", "patched"):
        sides = [res[name] for res in results]
        total = sum(side["jobs"] for side in sides)
        commands: dict[str, float] = {}
        for side in sides:
            for cmd, calls in side["stats"].items():
                commands[cmd] = commands.get(cmd, 0) + calls / total
        client_us = commands.pop(":client_cpu_s") * 1e6
        server_us = commands.pop(":server_cpu_s") * 1e6
        out[name] = {
            "jobs_per_s": sig(median(side["per_second"] for side in sides)),
            "rounds_jobs_per_s": [sig(side["per_second"]) for side in sides],
            "worker_cpu_us_per_job": sig(client_us, 3),
            "redis_cpu_us_per_job": sig(server_us, 3),
            "script_calls_per_job": sig(
                sum(commands.get(c, 0) for c in ("fcall", "evalsha", "eval")), 3
            ),
            "commands_per_job": {
                k: sig(v, 3)
                for k, v in sorted(commands.items(), key=lambda kv: -kv[1])
                if v >= 0.01
            },
        }
    ratio = median(res["ratio"] for res in results)
    out["ratio"] = sig(ratio, 3)
    out["rounds_ratio"] = [sig(res["ratio"], 3) for res in results]
    out["meets_target"] = ratio >= TARGET_RATIO
    # CPU per job (worker and Redis together), which the machine's other load disturbs
    # less than it does the rates: the ratio the rates would show on otherwise idle cores.
    cpu = {
        n: out[n]["worker_cpu_us_per_job"] + out[n]["redis_cpu_us_per_job"]
        for n in ("stock", "patched")
    }
    out["cpu_ratio"] = sig(cpu["stock"] / cpu["patched"], 3)
    return out


def run(redis_url: str) -> dict[str, Any]:
    """Patched vs stock ``SimpleWorker`` throughput; see the module docstring."""
    import rq

    jobs = env_int("QRL_BENCH_RQ_JOBS", 2000)
    rounds = env_int("QRL_BENCH_ROUNDS", 3)
    client = redis.Redis.from_url(redis_url)
    try:
        result: dict[str, Any] = {
            "config": {
                "jobs_per_round": jobs,
                "rounds": rounds,
                "worker": "SimpleWorker, burst mode, in process",
                "rq": rq.__version__,
                "target_ratio": TARGET_RATIO,
            },
            "machine": machine_info(client),
        }
        for case, backlog in (("plain_list", False), ("fair_backlog", True)):
            log(f"== rq_throughput: {case}")
            result[case] = _case(client, jobs, rounds, backlog=backlog)
        client.flushdb()
        return result
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rq_throughput")
    parser.add_argument("--redis-url", required=True)
    args = parser.parse_args(argv)
    json.dump(run(args.redis_url), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
