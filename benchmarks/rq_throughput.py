"""Jobs per second of our RQ workers against stock RQ's: ``SimpleWorker`` and forking ``Worker``.

``python -m benchmarks rq_throughput`` (or ``python -m benchmarks.rq_throughput``) prints one
JSON object. Each measurement enqueues N no-op jobs, then runs one worker in burst mode in
this process until the queue is empty; its rate is N over the time ``work()`` took. Three
modes of worker: ``stock`` (``rq.SimpleWorker`` / ``rq.Worker``), ``patched`` (ours, with
limits set so high they never bind) and ``patched_no_limits`` (ours, nothing at all set in
the namespace). Each round gives each mode N jobs in four chunks, the order of the modes
rotating chunk by chunk (ABC, BCA, CAB, ...), on the same Redis in the same run; a round's
ratio compares a mode's rate over its chunks with stock's, and the figures are medians over
the rounds. The forking ``Worker`` forks a work horse per job, so its cases run fewer jobs
(``QRL_BENCH_RQ_FORK_JOBS``, default 400, against ``QRL_BENCH_RQ_JOBS``, default 2000). Cases
(``fork_`` the same with the forking workers):

- ``plain_list``: the jobs wait on RQ's own list, as they do whenever the queue is not
  contended; the patched worker passes each through the gate (one script call) after
  finding the fair backlog empty.
- ``fair_backlog``: the jobs wait in the fair backlog (the queue was contended when they were
  enqueued); the patched worker takes each with one dispatch call that hands it over onto
  RQ's intermediate list. Stock RQ runs the same jobs from its plain list.

Redis commands per job come from ``INFO commandstats`` over the timed ``work()`` call; CPU per
job from this process's CPU time (with its waited-for children: the work horses) and the
server's (``INFO cpu``) over the same call.
``cpu_ratio`` (stock CPU per job over patched, worker and Redis together) is the figure the
machine's other load disturbs least; ``ratio`` is the measured one.
"""

from __future__ import annotations

import argparse
import json
import os
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
CHUNKS = 4  # per round and mode; the order of the modes rotates chunk by chunk
MODES = ("stock", "patched", "patched_no_limits")
# case -> (jobs wait in the fair backlog, forking Worker)
CASES = {
    "plain_list": (False, False),
    "fair_backlog": (True, False),
    "fork_plain_list": (False, True),
    "fork_fair_backlog": (True, True),
}


def noop() -> None:
    """The job: nothing, so the worker's own cost is what is measured."""


def _fresh(client: redis.Redis, *, limits: bool = True) -> None:
    client.flushdb()
    if limits:
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


def _cpu() -> float:
    """CPU seconds of this process and of its waited-for children (a forking worker's
    work horses)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _work(
    client: redis.Redis, *, patched: bool, fork: bool = False
) -> tuple[float, dict[str, float]]:
    """Run one burst worker until the queue is drained: (seconds, commands per name, and
    the CPU seconds of this process and of the Redis server)."""
    import rq

    from queue_ratelimit.rq import Queue, SimpleWorker, Worker

    if patched:
        queue: Any = Queue(QUEUE, connection=client, rate_namespace=NAMESPACE)
        worker: Any = (Worker if fork else SimpleWorker)([queue], connection=client)
    else:
        queue = rq.Queue(QUEUE, connection=client)
        worker = (rq.Worker if fork else rq.SimpleWorker)([queue], connection=client)
    reset_command_stats(client)
    server_cpu = _server_cpu(client)
    cpu = _cpu()
    started = time.perf_counter()
    # ERROR: RQ logs to stdout, which carries only the JSON result here (the durability
    # warning about this throwaway, diskless Redis would land in it).
    worker.work(burst=True, logging_level="ERROR")
    elapsed = time.perf_counter() - started
    stats: dict[str, float] = {name: s.calls for name, s in command_stats(client).items()}
    stats[":client_cpu_s"] = _cpu() - cpu
    stats[":server_cpu_s"] = _server_cpu(client) - server_cpu
    left = client.llen(queue.key) + (queue.rate_backlog if patched else 0)
    assert left == 0, f"{left} jobs left after a burst run"
    return elapsed, stats


def _server_cpu(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _measure(
    client: redis.Redis, jobs: int, *, mode: str, backlog: bool, fork: bool = False
) -> dict[str, Any]:
    patched = mode != "stock"
    _fresh(client, limits=mode == "patched")
    _enqueue(client, jobs, patched=patched, backlog=backlog)
    seconds, stats = _work(client, patched=patched, fork=fork)
    finished = client.zcard(f"rq:finished:{QUEUE}")
    assert finished == jobs, f"{finished} of {jobs} jobs finished"
    return {"seconds": seconds, "stats": stats}


def _round(
    client: redis.Redis, jobs: int, r: int, *, backlog: bool, fork: bool = False
) -> dict[str, Any]:
    """One round: ``jobs`` jobs for each mode, in chunks whose order of modes rotates
    (ABC, BCA, CAB, ...), so that drift in the machine's speed falls on every mode alike."""
    chunk = max(1, jobs // CHUNKS)
    sides: dict[str, dict[str, Any]] = {n: {"seconds": 0.0, "jobs": 0, "stats": {}} for n in MODES}
    for c in range(CHUNKS):
        shift = (c + r) % len(MODES)
        for name in MODES[shift:] + MODES[:shift]:
            result = _measure(client, chunk, mode=name, backlog=backlog, fork=fork)
            side = sides[name]
            side["seconds"] += result["seconds"]
            side["jobs"] += chunk
            for cmd, calls in result["stats"].items():
                side["stats"][cmd] = side["stats"].get(cmd, 0) + calls
    for side in sides.values():
        side["per_second"] = side["jobs"] / side["seconds"]
    stock = sides["stock"]["per_second"]
    ratios = {n: sides[n]["per_second"] / stock for n in MODES[1:]}
    log(
        f"   round {r + 1}: stock {stock:6.0f} jobs/s, patched "
        f"{sides['patched']['per_second']:6.0f} jobs/s (ratio {ratios['patched']:.3f}), "
        f"no limits {sides['patched_no_limits']['per_second']:6.0f} jobs/s "
        f"(ratio {ratios['patched_no_limits']:.3f})"
    )
    return {**sides, "ratio": ratios["patched"], "ratio_no_limits": ratios["patched_no_limits"]}


def _case(
    client: redis.Redis, jobs: int, rounds: int, *, backlog: bool, fork: bool = False
) -> dict[str, Any]:
    results = [_round(client, jobs, r, backlog=backlog, fork=fork) for r in range(rounds)]
    out: dict[str, Any] = {}
    for name in MODES:
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
    no_limits = median(res["ratio_no_limits"] for res in results)
    out["ratio_no_limits"] = sig(no_limits, 3)
    out["rounds_ratio_no_limits"] = [sig(res["ratio_no_limits"], 3) for res in results]
    out["no_limits_meets_target"] = no_limits >= TARGET_RATIO
    # CPU per job (worker and Redis together), which the machine's other load disturbs
    # less than it does the rates: the ratio the rates would show on otherwise idle cores.
    cpu = {n: out[n]["worker_cpu_us_per_job"] + out[n]["redis_cpu_us_per_job"] for n in MODES}
    out["cpu_ratio"] = sig(cpu["stock"] / cpu["patched"], 3)
    out["cpu_ratio_no_limits"] = sig(cpu["stock"] / cpu["patched_no_limits"], 3)
    return out


def run(redis_url: str) -> dict[str, Any]:
    """Patched vs stock ``SimpleWorker`` throughput; see the module docstring."""
    import rq

    jobs = env_int("QRL_BENCH_RQ_JOBS", 2000)
    fork_jobs = env_int("QRL_BENCH_RQ_FORK_JOBS", 400)
    cases = os.environ.get("QRL_BENCH_RQ_CASES", ",".join(CASES)).split(",")
    rounds = env_int("QRL_BENCH_ROUNDS", 3)
    client = redis.Redis.from_url(redis_url)
    try:
        result: dict[str, Any] = {
            "config": {
                "jobs_per_round": jobs,
                "fork_jobs_per_round": fork_jobs,
                "rounds": rounds,
                "worker": "SimpleWorker / forking Worker (fork_ cases), burst mode, in process",
                "modes": list(MODES),
                "rq": rq.__version__,
                "target_ratio": TARGET_RATIO,
            },
            "machine": machine_info(client),
        }
        for case, (backlog, fork) in CASES.items():
            if case not in cases:
                continue
            log(f"== rq_throughput: {case}")
            n = fork_jobs if fork else jobs
            result[case] = _case(client, n, rounds, backlog=backlog, fork=fork)
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
