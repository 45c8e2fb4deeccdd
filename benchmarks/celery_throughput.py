"""Celery worker throughput with the gate on vs off, and publish latency with the hook on vs off.

``python -m benchmarks celery_throughput`` (or ``python -m benchmarks.celery_throughput``)
prints one JSON object.

Throughput: one real worker (``celery worker -P prefork -c 2``, Redis broker) runs N no-op
tasks that were queued before it started, once with ``install(app)`` (limits set so high
they never bind) and once without, in interleaved rounds on the same broker. A round is
timed on Redis's clock from the worker's ``worker_ready`` signal to the moment its queue and
the broker's unacked set are both empty (every task started; a no-op finishes at once).
Throughput is N over that time; the figure is the median over rounds of each mode, and the
ratio is the median of the per-round ratios (pairs run back to back, so slow load changes
on the machine cancel).

The CPU each task costs the worker's main process (the consumer, where the gate runs), its
pool and the Redis server is read from ``/proc`` and ``INFO cpu`` over the same interval: on a
busy machine it varies much less than the throughput.

Publish latency: ``apply_async`` per call (µs, to the same Redis broker, nobody consuming)
from an app without the integration, with it and hints off (rate options into headers only),
and with it and hints on (one pipelined peek per publish), in interleaved rounds.

Environment: ``QRL_BENCH_ROUNDS`` (default 3), ``QRL_CELERY_TASKS`` (N, default 2000),
``QRL_CELERY_PUBLISHES`` (calls per latency round, default 2000), ``QRL_CELERY_MODES`` (the
worker modes to run, comma-separated: of ``MODES`` and ``EXTRA_MODES``; plain always runs),
``QRL_CELERY_SHARDS`` (the shards of the ``fair_shards`` modes, default 3),
``QRL_CELERY_CLUSTER`` (a ``redis+cluster://`` URL for the ``fair_shards_cluster`` modes; by
default they start a cluster of three primaries of their own, ``benchmarks/shards.py``).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.signals import before_task_publish, worker_ready
from redis.cluster import RedisCluster

from queue_ratelimit import Limit, Limiter
from queue_ratelimit.celery import install

from ._common import broker_url_for, env_int, log, machine_info, median, sig

ROOT = Path(__file__).resolve().parent.parent
TENANTS = 10  # published round-robin, so the gate keeps ten tenant buckets busy
NEVER_BINDS = Limit(1e8, burst=1e9)
CONCURRENCY = 2
DRAIN_POLL_S = 0.005


def ready_key(namespace: str) -> str:
    return f"bench:celery:{namespace}:ready"


def done_key_of(namespace: str) -> str:
    return f"bench:celery:{namespace}:done"


# Worker modes: no plugin; the plugin with fair dispatch of worker capacity and limits that
# never bind; the same with no limit configured at all; fair only under rate contention.
MODES = ("plain", "fair", "fair_no_limits", "rate_only")
# Run when named in QRL_CELERY_MODES: "fair" on a namespace over QRL_CELERY_SHARDS shards
# (default 3; docs/design.md, "Shards"), its gate's calls on the event-loop wire; and the
# same with the calls made the ordinary way, waited for (as before the wire took them). The
# "_cluster" ones keep the limiter on a 3-primary Redis Cluster (the broker and the
# benchmark's own counters stay on the one server): a wire per primary, or waited-for calls.
EXTRA_MODES = (
    "fair_shards",
    "fair_shards_sync",
    "fair_shards_cluster",
    "fair_shards_cluster_sync",
)


def shards_of(mode: str) -> int:
    return env_int("QRL_CELERY_SHARDS", 3) if mode.startswith("fair_shards") else 1


def _no_wire() -> None:
    """The gate's calls made the ordinary way (the workers of the "_sync" modes)."""
    from queue_ratelimit.celery import _settler

    _settler.usable = lambda scheduler: False  # type: ignore[assignment]


def make_app(
    *,
    broker: str,
    redis_url: str,
    namespace: str,
    queue: str,
    gate: bool,
    hints: bool = True,
    fair_capacity: bool = True,
    shards: int = 1,
    limiter_url: str | None = None,
) -> Celery:
    """The benchmark's app: one no-op task; the integration installed when ``gate``, its
    limiter at ``limiter_url`` (default ``redis_url``, where the counters are kept)."""
    app = Celery(f"bench-{namespace}", broker=broker)
    app.conf.update(
        task_default_queue=queue,
        task_ignore_result=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    if gate:
        install(
            app,
            redis_url=limiter_url or redis_url,
            namespace=namespace,
            hints=hints,
            fair_capacity=fair_capacity,
            shards=shards,
        )

    done_key = done_key_of(namespace)
    counter: list[redis.Redis] = []

    @app.task(name="bench.noop", shared=False)
    def noop() -> None:
        """Counts itself done (one INCR): the run ends when every task has run, wherever it
        waited (the broker, or the fair backlog in Redis)."""
        if not counter:
            counter.append(redis.Redis.from_url(redis_url))
        counter[0].incr(done_key)

    @worker_ready.connect(weak=False)
    def announce(**_: Any) -> None:
        client = redis.Redis.from_url(redis_url)
        seconds, micros = client.time()
        client.set(ready_key(namespace), seconds + micros / 1e6)
        client.close()

    return app


def _app_from_env() -> Celery | None:
    env = os.environ
    if "QRL_BENCH_CELERY_BROKER" not in env:
        return None
    if env.get("QRL_BENCH_CELERY_MODE", "").endswith("_sync"):
        _no_wire()
    return make_app(
        broker=env["QRL_BENCH_CELERY_BROKER"],
        redis_url=env["QRL_BENCH_CELERY_REDIS"],
        namespace=env["QRL_BENCH_CELERY_NAMESPACE"],
        queue=env["QRL_BENCH_CELERY_QUEUE"],
        gate=env.get("QRL_BENCH_CELERY_MODE") != "plain",
        fair_capacity=env.get("QRL_BENCH_CELERY_MODE") != "rate_only",
        shards=shards_of(env.get("QRL_BENCH_CELERY_MODE", "")),
        limiter_url=env.get("QRL_BENCH_CELERY_LIMITER") or None,
    )


# The worker processes start this module with ``celery -A benchmarks.celery_throughput``.
app = _app_from_env()


def _uninstall(app: Celery) -> None:
    """Disconnect an app's publish hook: receivers are process-wide."""
    before_task_publish.disconnect(dispatch_uid=f"queue_ratelimit:{id(app)}")


def _redis_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as fh:
            return [int(p) for p in fh.read().split()]
    except OSError:
        return []


def _server_cpu(client: Any) -> float:
    """CPU seconds of the server, or of every primary of a cluster client."""
    if isinstance(client, RedisCluster):
        return sum(_server_cpu(node.redis_connection) for node in client.get_primaries())
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _limiter_cpu(limiter: Limiter) -> float:
    """The limiter's servers' CPU seconds when they are not the counters' server (a
    cluster's primaries)."""
    return _server_cpu(limiter.client) if isinstance(limiter.client, RedisCluster) else 0.0


def _fill(producer: Celery, count: int) -> None:
    noop = producer.tasks["bench.noop"]
    with producer.producer_or_acquire() as pub:
        for i in range(count):
            noop.apply_async(rate_tenant=f"t{i % TENANTS}", producer=pub)


def _worker_round(
    *, broker: str, redis_url: str, mode: str, count: int, logdir: Path, cluster_url: str = ""
) -> dict[str, float]:
    """Queue ``count`` tasks, start a worker, time it until the queue is drained."""
    namespace = f"bc{uuid.uuid4().hex[:8]}"
    queue = f"bench-{namespace}"
    limiter_url = cluster_url if "_cluster" in mode else redis_url
    limiter = Limiter.from_url(limiter_url, namespace=namespace, shards=shards_of(mode))
    if mode != "fair_no_limits":
        limiter.set_limit("global", NEVER_BINDS)
        limiter.set_limit("tenant:*", NEVER_BINDS)
    # Both modes get the same messages (with rate headers), from a hook without hints.
    producer = make_app(
        broker=broker, redis_url=redis_url, namespace=namespace, queue=queue, gate=True,
        hints=False, shards=shards_of(mode), limiter_url=limiter_url,
    )  # fmt: skip
    _fill(producer, count)
    _uninstall(producer)
    producer.close()

    broker_client = redis.Redis.from_url(broker)
    assert broker_client.llen(queue) == count
    env = dict(os.environ)
    env.update(
        QRL_BENCH_CELERY_BROKER=broker,
        QRL_BENCH_CELERY_REDIS=redis_url,
        QRL_BENCH_CELERY_NAMESPACE=namespace,
        QRL_BENCH_CELERY_QUEUE=queue,
        QRL_BENCH_CELERY_MODE=mode,
        QRL_BENCH_CELERY_LIMITER=limiter_url,
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    log_path = logdir / f"{namespace}-{mode}.log"
    args = [
        sys.executable, "-m", "celery", "-A", "benchmarks.celery_throughput", "worker",
        "-P", "prefork", "-c", str(CONCURRENCY), "--without-gossip", "--without-mingle",
        "--without-heartbeat", "-n", f"{namespace}@%h", "-Q", queue, "--loglevel", "WARNING",
    ]  # fmt: skip
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    client = redis.Redis.from_url(redis_url)  # the counters, on the one server
    try:
        deadline = time.monotonic() + 120
        started = None
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited: {log_path.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker did not drain the queue: {log_path}")
            if started is None:
                raw = client.get(ready_key(namespace))
                started = float(raw) if raw else None
                if started is not None:
                    pool = _children(proc.pid)
                    cpu0 = (_cpu_seconds(proc.pid), sum(map(_cpu_seconds, pool)))
                    server0 = _server_cpu(client) + _limiter_cpu(limiter)
            elif int(client.get(done_key_of(namespace)) or 0) >= count:
                ended = _redis_time(client)
                cpu1 = (_cpu_seconds(proc.pid), sum(map(_cpu_seconds, pool)))
                server1 = _server_cpu(client) + _limiter_cpu(limiter)
                break
            time.sleep(DRAIN_POLL_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        broker_client.delete(queue)
        broker_client.close()
        for target in (client, limiter.client):
            for key in list(target.scan_iter(match=f"*{namespace}*", count=1000)):
                target.delete(key)
        client.close()
        limiter.close()
    seconds = ended - started
    return {
        "seconds": seconds,
        "tasks_per_s": count / seconds,
        # CPU per task (µs): the main process (consumer, gate), the pool, the Redis server
        # (broker and limiter alike; it also serves this poller, equally in both modes).
        "main_cpu_us": (cpu1[0] - cpu0[0]) * 1e6 / count,
        "pool_cpu_us": (cpu1[1] - cpu0[1]) * 1e6 / count,
        "redis_cpu_us": (server1 - server0) * 1e6 / count,
    }


def _publish_round(app: Celery, calls: int) -> dict[str, float]:
    """Per-call ``apply_async`` latency in µs (mean, p50, p99) over ``calls`` calls."""
    noop = app.tasks["bench.noop"]
    with app.producer_or_acquire() as pub:
        for i in range(100):  # warm up connections and script caches
            noop.apply_async(rate_tenant=f"t{i % TENANTS}", producer=pub)
        samples = []
        clock = time.perf_counter
        for i in range(calls):
            start = clock()
            noop.apply_async(rate_tenant=f"t{i % TENANTS}", producer=pub)
            samples.append((clock() - start) * 1e6)
    samples.sort()
    return {
        "mean_us": statistics.fmean(samples),
        "p50_us": samples[len(samples) // 2],
        "p99_us": samples[int(len(samples) * 0.99)],
    }


def _publish_latency(broker: str, redis_url: str, rounds: int, calls: int) -> dict[str, Any]:
    modes = {"hook_off": None, "hook_on_hints_off": False, "hook_on_hints_on": True}
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    broker_client = redis.Redis.from_url(broker)
    for r in range(rounds):
        order = list(modes) if r % 2 == 0 else list(reversed(modes))
        for mode in order:
            hints = modes[mode]
            namespace = f"bp{uuid.uuid4().hex[:8]}"
            queue = f"bench-{namespace}"
            app = make_app(
                broker=broker, redis_url=redis_url, namespace=namespace, queue=queue,
                gate=hints is not None, hints=bool(hints),
            )  # fmt: skip
            if hints is not None:
                Limiter.from_url(redis_url, namespace=namespace).set_limit("tenant:*", "100/s")
            results[mode].append(_publish_round(app, calls))
            _uninstall(app)
            app.close()
            broker_client.delete(queue)
            log(f"   publish round {r + 1} {mode}: {results[mode][-1]['mean_us']:.0f} µs/call")
    broker_client.close()
    summary: dict[str, Any] = {
        mode: {k: sig(median(s[k] for s in samples), 4) for k in samples[0]}
        for mode, samples in results.items()
    }
    # What the hook adds: the median of per-round differences of the medians (p50), which
    # a spike of load in one round or on one call moves least.
    summary["hook_cost_p50_us"] = {
        name: sig(
            median(
                on["p50_us"] - off["p50_us"]
                for on, off in zip(results[mode], results["hook_off"], strict=True)
            ),
            3,
        )
        for name, mode in (("hints_off", "hook_on_hints_off"), ("hints_on", "hook_on_hints_on"))
    }
    return summary


def run(redis_url: str) -> dict[str, Any]:
    """Run both measurements; the broker is the next database of the same Redis server."""
    rounds = env_int("QRL_BENCH_ROUNDS", 3)
    count = env_int("QRL_CELERY_TASKS", 2000)
    calls = env_int("QRL_CELERY_PUBLISHES", 2000)
    broker = broker_url_for(redis_url)
    redis.Redis.from_url(broker).flushdb()
    logdir = Path(os.environ.get("TMPDIR", "/tmp")) / "qrl-bench-celery"
    logdir.mkdir(parents=True, exist_ok=True)

    chosen = os.environ.get("QRL_CELERY_MODES", ",".join(MODES)).split(",")
    modes = [m for m in MODES + EXTRA_MODES if m in chosen]
    if "plain" not in modes:
        modes.insert(0, "plain")
    with ExitStack() as stack:
        cluster_url = os.environ.get("QRL_CELERY_CLUSTER", "")
        if not cluster_url and any("_cluster" in m for m in modes):
            from .shards import cluster

            cluster_url = f"redis+cluster://127.0.0.1:{stack.enter_context(cluster())[0]}/0"
        per_mode, ratios = _worker_rounds(
            broker, redis_url, modes, rounds, count, logdir, cluster_url
        )
    latency = _publish_latency(broker, redis_url, rounds, calls)
    return _report(per_mode, ratios, latency, redis_url, rounds, count, calls)


def _worker_rounds(
    broker: str,
    redis_url: str,
    modes: list[str],
    rounds: int,
    count: int,
    logdir: Path,
    cluster_url: str,
) -> tuple[dict[str, list[dict[str, float]]], dict[str, list[float]]]:
    """``rounds`` rounds of every mode: the results by mode, and each round's ratio to plain."""
    per_mode: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    ratios: dict[str, list[float]] = {m: [] for m in modes if m != "plain"}
    for r in range(rounds):
        # Rotate the order round by round, so slow load changes on the machine spread over
        # every mode.
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        got = {}
        for mode in order:
            result = _worker_round(
                broker=broker, redis_url=redis_url, mode=mode, count=count, logdir=logdir,
                cluster_url=cluster_url,
            )  # fmt: skip
            got[mode] = result["tasks_per_s"]
            per_mode[mode].append(result)
            log(
                f"   worker round {r + 1} {mode}: {result['tasks_per_s']:.0f} tasks/s, "
                f"main process {result['main_cpu_us']:.0f} µs CPU/task"
            )
        for mode, per_round in ratios.items():
            per_round.append(got[mode] / got["plain"])
    return per_mode, ratios


def _report(
    per_mode: dict[str, list[dict[str, float]]],
    ratios: dict[str, list[float]],
    latency: dict[str, Any],
    redis_url: str,
    rounds: int,
    count: int,
    calls: int,
) -> dict[str, Any]:
    admin = redis.Redis.from_url(redis_url)
    return {
        "worker_throughput": {
            "tasks_per_round": count,
            "rounds": rounds,
            "pool": f"prefork -c {CONCURRENCY}",
            "broker": "redis",
            "tasks_per_s": {
                mode: sig(median(x["tasks_per_s"] for x in rows)) for mode, rows in per_mode.items()
            },
            "ratio_to_plain": {mode: sig(median(r), 3) for mode, r in ratios.items()},
            "ratio_per_round": {mode: [sig(x, 3) for x in r] for mode, r in ratios.items()},
            "cpu_us_per_task": {
                mode: {
                    part: sig(median(x[f"{part}_cpu_us"] for x in rows), 3)
                    for part in ("main", "pool", "redis")
                }
                for mode, rows in per_mode.items()
            },
            "target": 0.9,
            "met": {mode: median(r) >= 0.9 for mode, r in ratios.items()},
        },
        "publish_latency": {"calls_per_round": calls, "rounds": rounds, **latency},
        "machine": {**machine_info(admin), "loadavg": os.getloadavg()},
    }


if __name__ == "__main__":
    url = os.environ.get("REDIS_URL")
    if not url:
        sys.exit("set REDIS_URL (tests/run_with_redis.sh starts a throwaway server)")
    json.dump(run(url), sys.stdout, indent=2)
    sys.stdout.write("\n")
