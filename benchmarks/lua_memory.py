"""Lua memory under one-off tenants: what the Functions library's plan cache holds.

The library keeps a plan per (tenant, queue, priority) between calls in the Lua VM of Redis
Functions, which ``maxmemory`` does not bound (``INFO memory``: ``used_memory_vm_functions``).
This makes ``QRL_BENCH_TENANTS`` (default 60,000) decisions, each for a tenant never seen
before, over three namespaces (``tenant:*`` and ``global`` set; every other one with a
queue), and reports the VM's memory: before, its peak (sampled every 500 decisions), at the
end, and what is live after a full collection (a one-function helper library, loaded for
this and deleted after, runs ``collectgarbage``: the VM is shared by every library). Also
the slowest decision on the server (``SLOWLOG``, over 1 ms), where a cache reset would show.

The server's other libraries and their garbage count too: use a server of its own
(``tests/run_with_redis.sh`` starts one).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, cast

import redis

from queue_ratelimit import Limit, Limiter

from ._common import env_int, log, machine_info, sig

DEFAULT_TENANTS = 60_000
SAMPLE_EVERY = 500
HELPER = "qrl_bench_gc"
HELPER_SOURCE = f"""#!lua name={HELPER}
redis.register_function('{HELPER}_collect', function(keys, args)
  collectgarbage('collect')
  return tostring(collectgarbage('count') * 1024)
end)"""


def _vm_bytes(client: redis.Redis) -> int:
    return int(cast(dict[str, Any], client.info("memory"))["used_memory_vm_functions"])


def _live_bytes(client: redis.Redis) -> int:
    """The VM's memory after a full collection (garbage freed)."""
    return int(float(cast(str, client.fcall(f"{HELPER}_collect", 0))))


def run(redis_url: str) -> dict[str, Any]:
    tenants = env_int("QRL_BENCH_TENANTS", DEFAULT_TENANTS)
    client = redis.Redis.from_url(redis_url)
    client.function_load(HELPER_SOURCE, replace=True)
    run_id = uuid.uuid4().hex[:8]
    limiters = [Limiter(client, namespace=f"mem{run_id}{i}") for i in range(3)]
    slowlog = cast(dict[str, str], client.config_get("slowlog-log-slower-than"))
    slowlog_threshold = slowlog["slowlog-log-slower-than"]
    try:
        for lim in limiters:
            lim.set_limit("tenant:*", Limit(10))
            lim.set_limit("global", Limit(1e6))
        before, live_before = _vm_bytes(client), _live_bytes(client)
        client.config_set("slowlog-log-slower-than", 1000)
        client.slowlog_reset()
        peak = before
        started = time.perf_counter()
        for n in range(tenants):
            limiters[n % 3].acquire(f"one-off-{n}", queue="q" if n % 2 else None)
            if n % SAMPLE_EVERY == 0:
                peak = max(peak, _vm_bytes(client))
                if n % (SAMPLE_EVERY * 20) == 0:
                    log(f"  {n} tenants: {peak / 2**20:.1f} MiB peak")
        seconds = time.perf_counter() - started
        end = _vm_bytes(client)
        peak = max(peak, end)
        entries = cast(list[dict[str, Any]], client.slowlog_get(128))
        slow = [e["duration"] for e in entries if b"FCALL" in e["command"]]
        live_after = _live_bytes(client)
    finally:
        client.config_set("slowlog-log-slower-than", slowlog_threshold)
        client.function_delete(HELPER)
        for lim in limiters:
            keys = list(client.scan_iter(match=f"{lim.keys.base}:*", count=1000))
            if keys:
                client.delete(*keys)
        client.close()
    mib = 2**20
    result = {
        "settings": {"tenants": tenants, "namespaces": 3, "sample_every": SAMPLE_EVERY},
        "machine": machine_info(redis.Redis.from_url(redis_url)),
        "vm_functions_mib": {
            "before": sig(before / mib),
            "peak": sig(peak / mib),
            "end": sig(end / mib),
            "live_before": sig(live_before / mib),
            "live_after": sig(live_after / mib),
        },
        "peak_growth_bytes_per_tenant": sig((peak - before) / tenants),
        "decisions_per_second": sig(tenants / seconds),
        "fcalls_over_1ms": len(slow),
        "slowest_fcall_us": max(slow, default=0),
    }
    log(f"  peak {peak / mib:.1f} MiB (from {before / mib:.1f}), live after {live_after / mib:.1f}")
    return result
