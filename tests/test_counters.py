"""Counters kept in the Functions library's memory (lua/buckets.lua, "Counters kept in
memory"): written within a second or 100 decisions, at once by a read, exact after any
flush, and what a server that loses its VM loses stays within the documented bound.

Each test runs on a ``redis-server`` of its own: the library's memory is the server's, and
a shared server carries other tests' namespaces (at most 64 keep counts in memory at once).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
from conftest import RedisProcess, wait_until

from queue_ratelimit import Limit, Limiter
from queue_ratelimit._counters import flush_counters

# PENDING_MAX in lua/buckets.lua: decisions counted in memory before a decision writes them.
PENDING_MAX = 100
HIGH = Limit(1_000_000, per=1.0)
TIGHT = Limit(1, per=3600.0)


def fresh(redis_process: Callable[..., RedisProcess], transport: str = "fcall") -> Limiter:
    server = redis_process()
    limiter = Limiter(redis.Redis.from_url(server.url), namespace="n")
    limiter._scripts.transport = transport  # type: ignore[assignment]
    if transport == "fcall":
        limiter._scripts.load()
    limiter.set_limit("tenant:*", HIGH)
    return limiter


def allowed(limiter: Limiter, tenant: str = "acme") -> float:
    """The admissions written to the tenant's hash (raw: no flush)."""
    return float(limiter.client.hget(limiter.keys.tenant(tenant), "n:a") or 0)


def redis_seconds(limiter: Limiter) -> float:
    seconds, micros = limiter.client.time()
    return float(seconds + micros / 1e6)


def by_queue(limiter: Limiter, queue: str = "-") -> float:
    return float(limiter.client.hget(limiter.keys.shared, f"a:q:{queue}") or 0)


def test_counts_wait_in_memory_until_read(redis_process: Callable[..., RedisProcess]) -> None:
    limiter = fresh(redis_process)
    for _ in range(5):
        assert limiter.acquire("acme").allowed
    assert (allowed(limiter), by_queue(limiter)) == (0, 0), "kept in memory"
    assert flush_counters(limiter) == 5
    assert (allowed(limiter), by_queue(limiter)) == (5, 5)
    assert flush_counters(limiter) == 0, "written once"
    assert (allowed(limiter), by_queue(limiter)) == (5, 5)


def test_evalsha_writes_every_count_at_once(redis_process: Callable[..., RedisProcess]) -> None:
    limiter = fresh(redis_process, "evalsha")
    for _ in range(5):
        assert limiter.acquire("acme").allowed
    assert (allowed(limiter), by_queue(limiter)) == (5, 5)
    assert flush_counters(limiter) == 0


def test_a_decision_writes_counts_after_the_most_kept(
    redis_process: Callable[..., RedisProcess],
) -> None:
    limiter = fresh(redis_process)
    for _ in range(PENDING_MAX):
        limiter.acquire("acme")
    assert allowed(limiter) == 0
    limiter.acquire("acme")  # the 101st writes the first 100, and keeps its own
    assert (allowed(limiter), by_queue(limiter)) == (PENDING_MAX, PENDING_MAX)
    flush_counters(limiter)
    assert allowed(limiter) == PENDING_MAX + 1


def test_a_decision_writes_counts_a_second_old(
    redis_process: Callable[..., RedisProcess],
) -> None:
    limiter = fresh(redis_process)
    limiter.acquire("acme")
    limiter.acquire("beta", "emails")
    start = redis_seconds(limiter)
    limiter.acquire("acme")
    assert allowed(limiter) == 0
    # The flush is due on Redis's clock: wait for it to move on by a second.
    wait_until(
        lambda: redis_seconds(limiter) > start + 1.05, timeout=5, what="Redis time a second on"
    )
    limiter.acquire("gamma")  # any tenant of the namespace writes what is due
    assert (allowed(limiter, "acme"), allowed(limiter, "beta")) == (2, 1)
    assert (by_queue(limiter), by_queue(limiter, "emails")) == (2, 1)
    assert allowed(limiter, "gamma") == 0


def test_denials_histogram_and_zset_exact_after_flush(
    redis_process: Callable[..., RedisProcess],
) -> None:
    limiter = fresh(redis_process)
    limiter.set_limit("tenant:acme", TIGHT)
    assert limiter.acquire("acme").allowed
    for _ in range(3):
        assert not limiter.acquire("acme").allowed
    shared = limiter.keys.shared
    assert limiter.client.hget(shared, "h:inf") is None
    flush_counters(limiter)
    assert float(limiter.client.hget(shared, "h:inf") or 0) == 3
    assert float(limiter.client.hget(shared, "h:us") or 0) == pytest.approx(3 * 3600e6, rel=1e-3)
    assert float(limiter.client.hget(shared, "d:tenant:acme") or 0) == 3
    assert float(limiter.client.hget(limiter.keys.tenant("acme"), "d:tenant:acme") or 0) == 3
    assert limiter.client.zscore(limiter.keys.tenant_denials, "acme") == 3
    assert allowed(limiter) == 1


def test_a_tenant_hash_gone_before_the_flush_gets_an_expiry(
    redis_process: Callable[..., RedisProcess],
) -> None:
    limiter = fresh(redis_process)
    limiter.acquire("acme")
    key = limiter.keys.tenant("acme")
    limiter.client.delete(key)  # as if it expired before its counts were written
    flush_counters(limiter)
    assert allowed(limiter) == 1
    assert 0 < limiter.client.pttl(key) <= 900_000, "a counter alone must not outlive retention"


def test_counts_lost_with_the_vm_stay_within_the_bound(
    redis_process: Callable[..., RedisProcess],
) -> None:
    """FUNCTION FLUSH (as a restart without persistence of the library, or a failover to a
    replica) loses the counts kept in memory: at most PENDING_MAX decisions; every count
    written before stays, and counting goes on."""
    limiter = fresh(redis_process)
    for _ in range(PENDING_MAX + 30):
        limiter.acquire("acme")
    assert allowed(limiter) == PENDING_MAX  # written by the 101st decision
    limiter.client.function_flush()
    for _ in range(7):
        limiter.acquire("acme")  # the library is loaded again on the first
    flush_counters(limiter)
    lost = PENDING_MAX + 30 + 7 - allowed(limiter)
    assert lost == 30  # the counts kept since the 101st decision wrote the first 100
    assert lost <= PENDING_MAX
    assert by_queue(limiter) == PENDING_MAX + 7


def test_another_process_loading_the_library_keeps_its_memory(
    redis_process: Callable[..., RedisProcess],
) -> None:
    """A library loaded again with REPLACE starts over: pending counts and cached plans gone,
    each time a process starts."""
    limiter = fresh(redis_process)
    for _ in range(3):
        limiter.acquire("acme")
    other = Limiter(limiter.client, namespace="n")
    other._scripts.load()
    assert other._scripts.transport == "fcall"
    other.acquire("acme")
    assert flush_counters(other) == 4
    assert allowed(limiter) == 4


@pytest.mark.parametrize("writer", ["fcall", "evalsha"])
@pytest.mark.parametrize("decider", ["fcall", "evalsha"])
def test_a_config_change_binds_the_very_next_decision(
    redis_process: Callable[..., RedisProcess], writer: str, decider: str
) -> None:
    """Whichever form changes the configuration (another process may run another version of
    the package, or EVALSHA), the next decision sees it: the plan the library cached is
    checked against the stored revision on every decision."""
    limiter = fresh(redis_process, decider)
    for _ in range(3):
        assert limiter.acquire("acme").allowed  # a plan cached
    admin = Limiter(limiter.client, namespace="n")
    admin._scripts.transport = writer  # type: ignore[assignment]
    admin.set_limit("tenant:acme", TIGHT)
    assert limiter.acquire("acme").allowed  # the tight bucket's one token
    assert not limiter.acquire("acme").allowed
    admin.delete_limit("tenant:acme")
    assert limiter.acquire("acme").allowed


def test_namespaces_of_the_same_name_in_two_databases_keep_their_own_counts(
    redis_process: Callable[..., RedisProcess],
) -> None:
    """The library's memory is the server's, key names repeat across databases: counts of
    db 0 must never be written into db 1's hashes."""
    server = redis_process()
    zero, one = (
        Limiter(redis.Redis(host="127.0.0.1", port=server.port, db=db), namespace="n")
        for db in (0, 1)
    )
    for limiter in (zero, one):
        limiter._scripts.load()
        limiter.set_limit("tenant:*", HIGH)
    for _ in range(3):
        assert zero.acquire("acme").allowed
    for _ in range(5):
        assert one.acquire("acme").allowed
    assert (flush_counters(zero), flush_counters(one)) == (3, 5)
    assert (allowed(zero), allowed(one)) == (3, 5)


def test_a_namespace_never_configured_writes_its_counts_at_once(
    redis_process: Callable[..., RedisProcess],
) -> None:
    server = redis_process()
    limiter = Limiter(redis.Redis.from_url(server.url), namespace="n")
    limiter._scripts.load()
    assert limiter.acquire("acme").allowed
    assert allowed(limiter) == 1, "no revision names this database's namespace: not kept"


def test_a_configuration_change_writes_the_counts_of_the_revision_it_ends(
    redis_process: Callable[..., RedisProcess],
) -> None:
    limiter = fresh(redis_process)
    for _ in range(4):
        assert limiter.acquire("acme").allowed
    assert allowed(limiter) == 0
    limiter.set_limit("tenant:other", TIGHT)
    assert allowed(limiter) == 4
    assert flush_counters(limiter) == 0
