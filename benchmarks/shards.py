"""One namespace over shards on a local three-primary Redis Cluster (``Limiter(shards=N)``).

``python -m benchmarks shards`` starts its own cluster (three ``redis-server
--cluster-enabled yes`` on free loopback ports, ``redis-cli --cluster create``, stopped by
pid at the end; the ``--redis-url`` server only for ``one_server``) and prints one JSON object:

- ``spread``: a uniform load over ``QRL_SH_TENANTS`` tenants (each decision: its tenant's
  bucket and the global one, never binding) from ``QRL_SH_PROCS`` processes for
  ``QRL_BENCH_SECONDS``, with 1, 3 and 6 shards: each primary's share of the server time
  (``INFO commandstats``, the FCALLs' usec per node), the busiest primary's share (goal
  <= 40% with shards, against 100% with one slot), decisions per second (client-bound on
  this machine) and server microseconds per decision;
- ``accuracy``: a global cap of ``RATE``/s (burst ``BURST``) under saturating demand, with
  3 shards and a rebalance every 0.25 s, uniform over the tenants and skewed (only one
  shard's tenants): delivered / (R*T) in the window after the first 1.5 s, and the most
  admitted in any 1 s window against the bound R*T + B + N (docs/design.md, "Shards");
- ``rebalance``: what one rebalance that moves the slices costs: client milliseconds and
  server microseconds (all primaries, all commands), and the extra server time of the
  decisions that plan again afterwards (one per active tenant and shard);
- ``one_server``: the FCALL's server time per decision with 1 and 3 shards on the
  ``--redis-url`` server (one process serving both: the cost of a decision itself);
- ``capacity``: from the measured server microseconds per decision, the decisions per
  second one primary's core can serve, and N primaries at the measured imbalance.

The spread is measured in ``QRL_BENCH_ROUNDS`` (default 3) interleaved rounds, medians
reported, both as the FCALLs' time (``INFO commandstats``) and as each node's CPU time
(``INFO cpu``: the whole process, network included, and not inflated by waiting for a core
on a busy machine).

Environment: ``QRL_BENCH_SECONDS`` (default 4), ``QRL_SH_PROCS`` (default 2),
``QRL_SH_TENANTS`` (default 300), ``QRL_BENCH_ROUNDS``.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.cluster import RedisCluster

from queue_ratelimit import Limit, Limiter
from queue_ratelimit._shards import ShardedLimiter

from ._common import env_float, env_int, log, sig

DEFAULT_ROUNDS = 3

RATE, BURST = 500.0, 50.0
WARM_S = 1.5


def _free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


@contextmanager
def cluster() -> Iterator[list[int]]:
    """Three primaries, no replicas, on free ports; stopped by pid afterwards."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        raise RuntimeError("redis-server and redis-cli are needed")
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    with tempfile.TemporaryDirectory() as base:
        try:
            for i in range(3):
                port = _free_port()
                args = [server, "--port", str(port), "--bind", "127.0.0.1", "--dir", base]
                args += ["--cluster-enabled", "yes", "--cluster-config-file", f"n{i}.conf"]
                args += ["--save", "", "--appendonly", "no"]
                procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
                ports.append(port)
            for port in ports:
                _wait(lambda p=port: redis.Redis(port=p).ping())
            create = [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports)]
            subprocess.run(
                [*create, "--cluster-replicas", "0", "--cluster-yes"],
                capture_output=True,
                check=True,
                timeout=60,
            )
            for port in ports:
                _wait(
                    lambda p=port: (
                        redis.Redis(port=p).execute_command("CLUSTER INFO")["cluster_state"] == "ok"
                    )
                )
            yield ports
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=10)


def _wait(condition: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the cluster did not come up")
        time.sleep(0.05)


def _node_usec(ports: list[int], names: frozenset[str] | None = None) -> dict[int, int]:
    """Server microseconds per node since the last reset: FCALLs (the decisions, the shard
    writes), or every command named in ``names`` (None: all of them)."""
    out = {}
    for port in ports:
        stats = redis.Redis(port=port).info("commandstats")
        out[port] = sum(
            int(v["usec"])
            for k, v in stats.items()
            if k not in ("cmdstat_info", "cmdstat_config|resetstat")
            and (names is None or k.removeprefix("cmdstat_") in names)
        )
    return out


def _reset(ports: list[int]) -> None:
    for port in ports:
        redis.Redis(port=port).config_resetstat()


def _limiter(port: int, namespace: str, shards: int, interval: float = 1.0) -> Limiter:
    client = RedisCluster(host="127.0.0.1", port=port, socket_timeout=5)
    return Limiter(client, namespace=namespace, shards=shards, rebalance_interval=interval)


def _worker(args: tuple[int, str, int, list[str], float, int, float]) -> list[tuple[float, float]]:
    """Decide for ``tenants`` in turn until the deadline: the admissions, as (sent,
    answered) times, and as the first entry (-1, decisions made)."""
    port, namespace, shards, tenants, deadline, offset, interval = args
    lim = _limiter(port, namespace, shards, interval)
    admitted: list[tuple[float, float]] = []
    i, n = offset, 0
    while (sent := time.time()) < deadline:
        i += 1
        n += 1
        if lim.acquire(tenants[i % len(tenants)]).allowed:
            admitted.append((sent, time.time()))
    lim.close()
    return [(-1.0, float(n)), *admitted]


def _load(
    port: int,
    namespace: str,
    shards: int,
    tenants: list[str],
    seconds: float,
    procs: int,
    interval: float = 1.0,
) -> tuple[int, list[tuple[float, float]], float]:
    """(decisions, admissions, start time) of ``procs`` processes deciding for ``seconds``."""
    start = time.time() + 0.5  # (the processes are up by then)
    jobs = [
        (port, namespace, shards, tenants, start + seconds, k * 7, interval) for k in range(procs)
    ]
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        results = pool.map(_worker, jobs)
    decisions = sum(int(r[0][1]) for r in results)
    admitted = sorted(a for r in results for a in r[1:])
    return decisions, admitted, start - 0.5


def _node_cpu(ports: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) each node's process has used: its whole server time,
    network and event loop included, and not inflated by waiting for a core."""
    out = {}
    for port in ports:
        cpu = redis.Redis(port=port).info("cpu")
        out[port] = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return out


def _spread_once(
    ports: list[int], shards: int, seconds: float, procs: int, tenants: list[str]
) -> dict[str, Any]:
    namespace = f"b{uuid.uuid4().hex[:8]}"
    lim = _limiter(ports[0], namespace, shards)
    lim.set_limit("tenant:*", Limit(1e6, per=1, burst=1e6))
    lim.set_limit("global", Limit(1e9, per=1, burst=1e9))
    _reset(ports)
    cpu_before = _node_cpu(ports)
    decisions, _, _ = _load(ports[0], namespace, shards, tenants, seconds, procs)
    cpu_after = _node_cpu(ports)
    usec = _node_usec(ports, frozenset({"fcall"}))
    cpu = {p: cpu_after[p] - cpu_before[p] for p in ports}
    return {"decisions": decisions, "usec": usec, "cpu": cpu}


def _spread(
    ports: list[int], seconds: float, procs: int, tenants: list[str], rounds: int
) -> dict[str, Any]:
    """Interleaved rounds (1, 3, 6 shards in turn), medians over rounds."""
    runs: dict[int, list[dict[str, Any]]] = {1: [], 3: [], 6: []}
    for r in range(rounds):
        for shards, samples in runs.items():
            samples.append(_spread_once(ports, shards, seconds, procs, tenants))
            log(f"  spread round {r + 1} shards={shards}: {samples[-1]['decisions']}")
    out: dict[str, Any] = {}
    for shards, samples in runs.items():
        rows = []
        for sample in samples:
            usec, cpu, n = sample["usec"], sample["cpu"], sample["decisions"]
            rows.append(
                {
                    "per_s": n / seconds,
                    "us": sum(usec.values()) / n,
                    "cpu_us": sum(cpu.values()) * 1e6 / n,
                    "busiest": max(usec.values()) / sum(usec.values()),
                    "busiest_cpu": max(cpu.values()) / sum(cpu.values()),
                    "shares": sorted((u / sum(usec.values()) for u in usec.values()), reverse=True),
                }
            )

        def med(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return float(statistics.median(row[key] for row in rows))

        out[f"shards_{shards}"] = {
            "decisions_per_s": round(med("per_s")),
            "server_us_per_decision": sig(med("us"), 3),
            "server_cpu_us_per_decision": sig(med("cpu_us"), 3),
            "busiest_primary_share": sig(med("busiest"), 3),
            "busiest_primary_cpu_share": sig(med("busiest_cpu"), 3),
            "primary_shares_per_round": [[sig(x, 3) for x in row["shares"]] for row in rows],
        }
        log(f"  spread shards={shards}: {out[f'shards_{shards}']}")
    one = out["shards_1"]["decisions_per_s"]
    for key in ("shards_3", "shards_6"):
        out[key]["decisions_per_s_vs_1_shard"] = sig(out[key]["decisions_per_s"] / one, 3)
    return out


def most_in_any_window(admitted: list[tuple[float, float]], window: float) -> int:
    best = 0
    for i, (start, _) in enumerate(admitted):
        end = start + window
        best = max(best, sum(1 for s, r in admitted[i:] if s >= start and r <= end))
    return best


def _accuracy(ports: list[int], seconds: float, procs: int, tenants: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    shards = 3
    for demand in ("uniform", "skewed"):
        namespace = f"b{uuid.uuid4().hex[:8]}"
        lim = _limiter(ports[0], namespace, shards)
        assert isinstance(lim, ShardedLimiter)
        lim.set_limit("global", Limit(RATE, per=1, burst=BURST))
        chosen = tenants if demand == "uniform" else [t for t in tenants if lim.shard_of(t) == 0]
        length = max(seconds, WARM_S + 2.0)
        decisions, admitted, start = _load(
            ports[0], namespace, shards, chosen, length, procs, interval=0.25
        )
        low, high = start + 0.5 + WARM_S, start + 0.5 + length - 0.1
        delivered = sum(1 for s, r in admitted if s >= low and r <= high)
        most = most_in_any_window(admitted, 1.0)
        out[demand] = {
            "decisions": decisions,
            "delivered_fraction": sig(delivered / (RATE * (high - low)), 4),
            "most_in_1s": most,
            "bound_1s": RATE + BURST + shards,
            "shares_after": [sig(s, 3) for s in lim.shares().get("global", [])],
        }
        log(f"  accuracy {demand}: {out[demand]}")
    return out


def _rebalance(ports: list[int], tenants: list[str]) -> dict[str, Any]:
    """Rounds that move the slices (denials alternate between two shards' tenants), each
    timed alone; then the decisions' extra cost of planning again after a slice moved."""
    namespace = f"b{uuid.uuid4().hex[:8]}"
    lim = _limiter(ports[0], namespace, 3, interval=3600)
    assert isinstance(lim, ShardedLimiter)
    lim.set_limit("global", Limit(30, per=3600, burst=30))
    lim.set_limit("tenant:*", Limit(1e6, per=1, burst=1e6))
    lim.rebalance()
    by_shard = {s: [t for t in tenants if lim.shard_of(t) == s] for s in range(3)}
    client_ms, server_us, writes = [], [], []
    for k in range(6):
        hot = by_shard[k % 2]
        for tenant in hot[:40]:
            lim.acquire(tenant)
        _reset(ports)
        report = lim.rebalance()
        server_us.append(sum(_node_usec(ports).values()))
        client_ms.append(report.seconds * 1000)
        writes.append(report.writes)
    # Planning again: each active tenant's first decision after a slice moved.
    active = by_shard[0]
    for tenant in active:
        lim.acquire(tenant)  # plans cached
    _reset(ports)
    for tenant in active:
        lim.acquire(tenant)
    cached = sum(_node_usec(ports, frozenset({"fcall"})).values()) / len(active)
    keys = lim.shard_keys[0]
    lim.write_shard(0, lim.config_version(), "", "", ["global", "10.0 3600.0 10.0 -", "1"])
    _reset(ports)
    for tenant in active:
        lim.acquire(tenant)
    replanned = sum(_node_usec(ports, frozenset({"fcall"})).values()) / len(active)
    del keys
    result = {
        "rounds": len(client_ms),
        "writes_per_round": writes,
        "client_ms_per_round": sig(sorted(client_ms)[len(client_ms) // 2], 3),
        "server_us_per_round_all_primaries": sig(sorted(server_us)[len(server_us) // 2], 3),
        "decision_server_us_cached_plan": sig(cached, 3),
        "decision_server_us_first_after_move": sig(replanned, 3),
        "replan_extra_us_per_active_tenant": sig(replanned - cached, 3),
    }
    log(f"  rebalance: {result}")
    return result


def _one_server(redis_url: str, tenants: list[str], rounds: int) -> dict[str, Any]:
    """The FCALL's server time per decision with 1 and 3 shards on one server (the
    ``--redis-url`` one): the same process serves both, so the comparison is not blurred
    by three servers waiting for two cores. One client, interleaved rounds of 2 s."""
    admin = redis.Redis.from_url(redis_url)
    per: dict[int, list[float]] = {1: [], 3: []}
    for _ in range(rounds + 1):
        for shards, values in per.items():
            namespace = f"b{uuid.uuid4().hex[:8]}"
            lim = Limiter(admin, namespace=namespace, shards=shards)
            lim.set_limit("tenant:*", Limit(1e6, per=1, burst=1e6))
            lim.set_limit("global", Limit(1e9, per=1, burst=1e9))
            for tenant in tenants:
                lim.acquire(tenant)
            admin.config_resetstat()
            n, started = 0, time.perf_counter()
            while time.perf_counter() - started < 2.0:
                for tenant in tenants:
                    lim.acquire(tenant)
                n += len(tenants)
            values.append(int(admin.info("commandstats")["cmdstat_fcall"]["usec"]) / n)
            for key in admin.scan_iter(match=f"qrl:{{{namespace}*", count=1000):
                admin.delete(key)
    out = {f"shards_{k}_server_us": sig(statistics.median(v), 3) for k, v in per.items()}
    out["ratio_3_to_1"] = sig(out["shards_3_server_us"] / out["shards_1_server_us"], 3)
    log(f"  one server: {out}")
    return out


def run(redis_url: str) -> dict[str, Any]:
    seconds = env_float("QRL_BENCH_SECONDS", 4.0)
    procs = env_int("QRL_SH_PROCS", 2)
    rounds = env_int("QRL_BENCH_ROUNDS", DEFAULT_ROUNDS)
    load_before = os.getloadavg()[0]
    tenants = [f"tenant{i}" for i in range(env_int("QRL_SH_TENANTS", 300))]
    log(f"shards: a 3-primary cluster, {procs} processes, {len(tenants)} tenants, {seconds:g} s")
    with cluster() as ports:
        spread = _spread(ports, seconds, procs, tenants, rounds)
        accuracy = _accuracy(ports, seconds, procs, tenants)
        rebalance = _rebalance(ports, tenants)
        server_version = redis.Redis(port=ports[0]).info("server")["redis_version"]
    one_server = _one_server(redis_url, tenants, rounds)
    per_decision = spread["shards_3"]["server_cpu_us_per_decision"]
    one_core = 1e6 / per_decision
    busiest = spread["shards_3"]["busiest_primary_cpu_share"]
    capacity = {
        "server_cpu_us_per_decision": per_decision,
        "one_primary_decisions_per_s": round(one_core),
        # The busiest primary saturates first: N primaries carry 1/busiest of its load.
        "three_primaries_at_measured_spread": round(one_core / busiest),
        "n_primaries_even_spread": "N x one_primary_decisions_per_s",
    }
    return {
        "settings": {
            "seconds": seconds,
            "processes": procs,
            "tenants": len(tenants),
            "rate": RATE,
            "burst": BURST,
            "redis": server_version,
            "rounds": rounds,
            "cpus": multiprocessing.cpu_count(),
            "load_average_before_after": [load_before, os.getloadavg()[0]],
        },
        "spread": spread,
        "accuracy": accuracy,
        "rebalance": rebalance,
        "one_server": one_server,
        "capacity": capacity,
    }
