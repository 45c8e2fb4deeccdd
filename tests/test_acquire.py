"""Table-driven tests of acquire / peek / refund and runtime config against a real Redis."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from bucket_state import approx, bucket_at, near, read_bucket, server_us, write_bucket
from conftest import RedisProcess
from redis.backoff import ConstantBackoff
from redis.cache import CacheConfig
from redis.retry import Retry

from queue_ratelimit import (
    ConfigError,
    ConfigSpec,
    CostExceedsBurst,
    Decision,
    InvalidCost,
    InvalidLimit,
    InvalidName,
    InvalidScope,
    Limit,
    Limiter,
    LimitNotFound,
    RateLimitError,
    Scope,
    ScopeLimit,
    config_from_env,
    load_config_file,
    parse_config,
)
from queue_ratelimit._core import MAX_WAIT
from queue_ratelimit._counters import flush_counters

HOUR = 3600.0


def counters(lim: Limiter, tenant: str) -> tuple[dict[str, float], dict[str, float]]:
    """Every numeric non-bucket field of the tenant hash and of the shared hash (the counts
    the server keeps in memory written first)."""
    flush_counters(lim)

    def numbers(key: str) -> dict[str, float]:
        raw = lim.client.hgetall(key)
        return {
            k.decode(): float(v)
            for k, v in raw.items()
            if not k.decode().startswith(("b", "_")) and k.decode() != "x"
        }

    return numbers(lim.keys.tenant(tenant)), numbers(lim.keys.shared)


# -- errors: cost above burst, bad costs, corrupt config ---------------------------------


@pytest.mark.parametrize(
    ("limits", "queue", "scope", "burst"),
    [
        ({"tenant:acme": Limit(10, burst=3)}, None, "tenant:acme", 3),
        ({"tenant:*": Limit(10, burst=3)}, None, "tenant:acme", 3),
        (
            {"tenant:acme:queue:q": Limit(1), "tenant:acme": Limit(50)},
            "q",
            "tenant:acme:queue:q",
            1,
        ),
        ({"tenant:*:queue:q": Limit(2)}, "q", "tenant:acme:queue:q", 2),
        ({"queue:q": Limit(2.5, burst=2.5)}, "q", "queue:q", 2.5),
        ({"global": Limit(4), "tenant:acme": Limit(100)}, None, "global", 4),
    ],
)
@pytest.mark.parametrize("method", ["acquire", "peek"])
def test_cost_above_burst_is_an_error_naming_the_scope(
    limiter: Limiter,
    limits: dict[str, Limit],
    queue: str | None,
    scope: str,
    burst: float,
    method: str,
) -> None:
    for s, limit in limits.items():
        limiter.set_limit(s, limit)
    before = limiter.peek("acme", queue=queue)
    with pytest.raises(CostExceedsBurst) as info:
        getattr(limiter, method)("acme", queue=queue, cost=5)
    error = info.value
    assert isinstance(error, RateLimitError)
    assert (error.scope, error.cost, error.burst) == (scope, 5, burst)
    assert f"cost 5 exceeds the burst {burst:g} of scope {scope!r}" in str(error)
    assert limiter.peek("acme", queue=queue) == before, "nothing may be consumed"
    assert not limiter.client.exists(limiter.keys.tenant("acme"))


def test_cost_equal_to_burst_within_rounding_is_not_an_error(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1, burst=1))
    assert limiter.acquire("acme", cost=0.1 + 0.2 + 0.7).allowed  # 1.0000000000000002


def test_cost_above_a_shadow_bucket_is_only_a_would_deny(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(10, burst=3), shadow=True)
    decision = limiter.acquire("acme", cost=5)
    assert decision.allowed
    assert decision.would_deny == ("tenant:acme",)


@pytest.mark.parametrize(
    "cost", [0, -1, -0.5, math.nan, math.inf, -math.inf, True, "1", None, 1e13, 2**1100, -(2**1100)]
)
@pytest.mark.parametrize("method", ["acquire", "peek", "refund"])
def test_invalid_costs(limiter: Limiter, cost: object, method: str) -> None:
    with pytest.raises(InvalidCost) as info:
        getattr(limiter, method)("acme", cost=cost)
    assert "cost must be" in str(info.value)


def test_corrupt_limit_in_redis_is_a_loud_error(limiter: Limiter) -> None:
    limiter.client.hset(limiter.keys.config, "tenant:acme", "fast please")
    with pytest.raises(ConfigError, match="corrupt limit for tenant:acme"):
        limiter.acquire("acme")


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"fail_mode": "sometimes"}, InvalidName, "fail_mode must be"),
        ({"closed_retry_ms": 0}, InvalidCost, r"closed_retry_ms must be a finite number in \(0, "),
        ({"closed_retry_ms": math.nan}, InvalidCost, "closed_retry_ms"),
        ({"counter_retention": -1}, InvalidCost, r"counter_retention \(seconds\) must be"),
        ({"counter_retention": math.inf}, InvalidCost, "counter_retention"),
        # Both become waits and expiries: bounded as the scripts bound waits (about ten
        # years). Before, a retention of 1e300 made every decision fail after it wrote.
        ({"closed_retry_ms": 1e300}, InvalidCost, "closed_retry_ms"),
        ({"counter_retention": 1e300}, InvalidCost, "counter_retention"),
        ({"counter_retention": 2**1100}, InvalidCost, "counter_retention"),
        ({"counter_retention": "900"}, InvalidCost, "counter_retention"),
    ],
)
def test_limiter_options_are_validated(
    redis_client: redis.Redis, kwargs: dict[str, object], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        Limiter(redis_client, namespace="ok", **kwargs)  # type: ignore[arg-type]


# -- time: edge rates, idle, refill without drift, exact waits ---------------------------


def test_one_per_hour_refills_after_an_hour(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR))
    assert limiter.acquire("acme").allowed
    denied = limiter.acquire("acme")
    assert not denied.allowed
    assert 3_599_000 < denied.wait_ms <= 3_600_000
    write_bucket(limiter, "tenant:acme", 0, age_s=HOUR)
    assert limiter.acquire("acme").allowed
    assert not limiter.acquire("acme").allowed


def test_long_idle_then_burst_is_capped_at_the_burst(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(10, burst=20))
    write_bucket(limiter, "tenant:acme", 0, age_s=86400)  # quiet for a day
    assert limiter.peek("acme").remaining["tenant:acme"] == 20
    with pytest.raises(CostExceedsBurst):
        limiter.acquire("acme", cost=21)
    assert limiter.acquire("acme", cost=20).allowed
    denied = limiter.acquire("acme", cost=20)
    assert not denied.allowed
    assert 1900 < denied.wait_ms <= 2000


def test_high_rate_admits_a_whole_burst_then_refills(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1e6))
    assert limiter.acquire("acme", cost=1e6).allowed
    denied = limiter.acquire("acme", cost=1e6)
    assert not denied.allowed
    assert 0 < denied.wait_ms <= 1000
    write_bucket(limiter, "tenant:acme", 0, age_s=1.0)
    assert limiter.acquire("acme", cost=1e6).allowed


def test_many_tiny_refill_steps_do_not_drift(limiter: Limiter) -> None:
    """Thousands of refills over real microsecond steps add up to exactly rate x elapsed."""
    rate, cost, steps = 1.0, 1e-4, 2000
    limiter.set_limit("tenant:acme", Limit(rate, burst=1e6))
    start = server_us(limiter.client)
    key, hfield = bucket_at(limiter, "tenant:acme")
    limiter.client.hset(key, mapping={hfield: "1.0", f"{hfield}:u": start})
    for _ in range(steps):
        assert limiter.acquire("acme", cost=cost).allowed
    before = server_us(limiter.client)
    remaining = limiter.peek("acme").remaining["tenant:acme"]
    after = server_us(limiter.client)
    low = 1.0 + rate * (before - start) / 1e6 - steps * cost
    high = 1.0 + rate * (after - start) / 1e6 - steps * cost
    assert low - 1e-9 <= remaining <= high + 1e-9


@pytest.mark.parametrize(
    ("limit", "tokens", "cost"),
    [
        (Limit(1, per=60), 0, 1),
        (Limit(100), 0.5, 1),
        (Limit(3, per=7, burst=5), 1.25, 4.5),
        (Limit(1e6), 0, 1e6),
        (Limit(1, per=HOUR, burst=2), 0.999, 2),
    ],
)
def test_wait_ms_is_exactly_what_is_needed(
    limiter: Limiter, limit: Limit, tokens: float, cost: float
) -> None:
    limiter.set_limit("tenant:acme", limit)
    write_bucket(limiter, "tenant:acme", tokens)
    denied = limiter.acquire("acme", cost=cost)
    wait_ms = denied.wait_ms
    assert wait_ms == approx((cost - tokens) / limit.rate_per_second * 1000)
    # Nine tenths of the wait is not enough, and what is left is exactly the rest of it.
    write_bucket(limiter, "tenant:acme", tokens + 0.9 * wait_ms / 1000 * limit.rate_per_second)
    still = limiter.acquire("acme", cost=cost)
    assert not still.allowed
    assert still.wait_ms == pytest.approx(wait_ms * 0.1, rel=1e-6)
    # The whole wait, elapsed on Redis's clock, is enough.
    write_bucket(limiter, "tenant:acme", tokens, age_s=wait_ms / 1000)
    assert limiter.acquire("acme", cost=cost).allowed


def test_waiting_wait_ms_on_the_real_clock_is_enough(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(40, burst=1))
    limiter.set_limit("global", Limit(25, burst=2))
    admitted = 0
    for _ in range(6):
        decision = limiter.acquire("acme")
        while not decision.allowed:
            assert decision.wait_ms > 0
            time.sleep(decision.wait_ms / 1000)  # the behaviour under test: wait_ms suffices
            decision = limiter.acquire("acme")
            assert decision.allowed, "waiting wait_ms must be enough"
        admitted += 1
    assert admitted == 6


def test_wait_covers_every_bucket(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme:queue:q", Limit(10))
    limiter.set_limit("tenant:acme", Limit(2))
    limiter.set_limit("global", Limit(4))
    write_bucket(limiter, "tenant:acme:queue:q", 0)
    write_bucket(limiter, "tenant:acme", 0)
    write_bucket(limiter, "global", 0)
    decision = limiter.acquire("acme", queue="q", cost=1)
    assert (decision.denied_by, decision.wait_ms) == ("tenant:acme", approx(500))
    # After 300 ms only the tenant bucket is still short; after 500 ms every bucket admits.
    write_bucket(limiter, "tenant:acme:queue:q", 0, age_s=0.3)
    write_bucket(limiter, "tenant:acme", 0, age_s=0.3)
    write_bucket(limiter, "global", 0, age_s=0.3)
    assert limiter.peek("acme", queue="q").denied_by == "tenant:acme"
    for scope in ("tenant:acme:queue:q", "tenant:acme", "global"):
        write_bucket(limiter, scope, 0, age_s=0.5)
    assert limiter.acquire("acme", queue="q").allowed


# -- runtime limit changes ---------------------------------------------------------------


def test_lowered_burst_clamps_stored_tokens(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=100))
    assert limiter.acquire("acme", cost=10).remaining["tenant:acme"] == approx(90)
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=20))
    assert limiter.peek("acme").remaining["tenant:acme"] == approx(20)
    assert limiter.acquire("acme", cost=20).allowed
    assert not limiter.acquire("acme").allowed


def test_raised_limit_grants_no_windfall(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=5))
    assert limiter.acquire("acme", cost=5).allowed
    limiter.set_limit("tenant:acme", Limit(2, per=HOUR, burst=100))
    assert limiter.peek("acme").remaining["tenant:acme"] < 0.01
    denied = limiter.acquire("acme")
    assert not denied.allowed
    assert denied.wait_ms > 1_790_000  # one token at 2/h: about half an hour


def test_set_limit_applies_to_the_very_next_decision_of_another_limiter(
    limiter: Limiter, redis_url: str
) -> None:
    other = Limiter.from_url(redis_url, namespace=limiter.namespace)
    try:
        limiter.set_limit("tenant:acme", Limit(1, per=HOUR))
        assert other.acquire("acme").allowed
        assert not other.acquire("acme").allowed
        limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=1), shadow=True)
        assert other.acquire("acme").would_deny == ("tenant:acme",)
        limiter.delete_limit("tenant:acme")
        assert other.acquire("acme").remaining == {}
    finally:
        other.close()


# -- peek and refund ---------------------------------------------------------------------


def test_peek_consumes_nothing(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=3))
    limiter.set_limit("global", Limit(1, per=HOUR, burst=2))
    for _ in range(5):
        decision = limiter.peek("acme", priority="high", cost=2)
        assert decision.allowed
        assert decision.remaining == {"tenant:acme": approx(3), "global": approx(2)}
    assert limiter.client.exists(limiter.keys.tenant("acme")) == 0
    # Only the config revision the limits were set at (config.lua), nothing a peek wrote.
    assert limiter.client.hkeys(limiter.keys.shared) == [b"_rev"]
    assert limiter.acquire("acme", cost=2).allowed
    denied = limiter.peek("acme", cost=2)
    assert not denied.allowed
    assert denied.denied_by == "global"
    assert denied.wait_ms > 7_000_000
    assert not [k for k in counters(limiter, "acme")[0] if k.startswith("d:")]


def test_refund_returns_tokens_never_above_burst(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme:queue:q", Limit(1, per=HOUR, burst=4))
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=10))
    limiter.set_limit("global", Limit(1, per=HOUR, burst=6))
    assert limiter.acquire("acme", queue="q", cost=4).allowed
    counted = counters(limiter, "acme")
    refunded = limiter.refund("acme", queue="q", cost=3)
    assert refunded.allowed
    assert refunded.remaining == {
        "tenant:acme:queue:q": near(3),
        "tenant:acme": near(9),
        "global": near(5),
    }
    capped = limiter.refund("acme", queue="q", cost=100)
    assert capped.remaining == {
        "tenant:acme:queue:q": approx(4),
        "tenant:acme": approx(10),
        "global": approx(6),
    }
    assert counters(limiter, "acme") == counted, "a refund counts nothing"
    assert limiter.acquire("acme", queue="q", cost=4).allowed


# -- all-or-nothing ----------------------------------------------------------------------


def test_denied_global_bucket_leaves_the_tenant_bucket_untouched(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=10))
    limiter.set_limit("tenant:acme:queue:q", Limit(1, per=HOUR, burst=10))
    limiter.set_limit("queue:q", Limit(1, per=HOUR, burst=10))
    limiter.set_limit("global", Limit(1, per=HOUR, burst=1))
    assert limiter.acquire("other").allowed  # drains the global bucket
    tenant_before = limiter.client.hgetall(limiter.keys.tenant("acme"))
    shared_before = read_bucket(limiter, "queue:q")
    for _ in range(5):
        decision = limiter.acquire("acme", queue="q")
        assert not decision.allowed
        assert decision.denied_by == "global"
        assert decision.remaining["tenant:acme"] == approx(10)
    assert limiter.client.hgetall(limiter.keys.tenant("acme")).keys() <= {
        *tenant_before.keys(),
        b"d:global",
        b"x",
    }
    assert read_bucket(limiter, "tenant:acme") is None
    assert read_bucket(limiter, "tenant:acme:queue:q") is None
    assert read_bucket(limiter, "queue:q") == shared_before
    limiter.set_limit("global", Limit(1, per=HOUR, burst=100))
    assert limiter.peek("acme", queue="q").remaining["tenant:acme"] == approx(10)


def test_denied_tenant_queue_bucket_leaves_global_untouched(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme:queue:q", Limit(1, per=HOUR, burst=1))
    limiter.set_limit("global", Limit(1, per=HOUR, burst=10))
    assert limiter.acquire("acme", queue="q").allowed
    global_before = read_bucket(limiter, "global")
    assert not limiter.acquire("acme", queue="q").allowed
    assert read_bucket(limiter, "global") == global_before
    assert limiter.acquire("acme", queue="other").remaining == {"global": near(8)}


# -- TTL of tenant state -----------------------------------------------------------------


def test_tenant_hash_ttl_covers_the_refill_time(redis_client: redis.Redis, namespace: str) -> None:
    lim = Limiter(redis_client, namespace=namespace, counter_retention=1)
    lim.set_limit("tenant:acme", Limit(1, per=HOUR, burst=10))
    assert lim.acquire("acme", cost=10).allowed
    pttl = redis_client.pttl(lim.keys.tenant("acme"))
    refill_ms = 10 * HOUR * 1000
    assert refill_ms <= pttl <= refill_ms + 1000 + 1
    assert redis_client.pttl(lim.keys.config) == -1, "config never expires"
    assert redis_client.pttl(lim.keys.audit) == -1
    for key in redis_client.scan_iter(match=f"qrl:{{{namespace}}}:*"):
        redis_client.delete(key)


def test_tenant_hash_ttl_keeps_counters_for_the_retention(limiter: Limiter) -> None:
    limiter.set_limit("global", Limit(1000))
    assert limiter.acquire("acme").allowed
    pttl = limiter.client.pttl(limiter.keys.tenant("acme"))
    assert 890_000 < pttl <= 900_000 + 1
    assert limiter.client.pttl(limiter.keys.shared) == -1


def test_ttl_follows_a_lowered_rate_on_denial(redis_client: redis.Redis, namespace: str) -> None:
    """After a rate cut, a denied tenant's state must live until its bucket would be full:
    expiring earlier would hand it a full bucket too soon."""
    lim = Limiter(redis_client, namespace=namespace, counter_retention=1)
    lim.set_limit("tenant:acme", Limit(100, burst=10))
    assert lim.acquire("acme", cost=10).allowed
    lim.set_limit("tenant:acme", Limit(1, per=HOUR, burst=10))
    denied = lim.acquire("acme", cost=1)
    assert not denied.allowed
    tokens = denied.remaining["tenant:acme"]
    pttl = redis_client.pttl(lim.keys.tenant("acme"))
    assert pttl >= (10 - tokens) * HOUR * 1000 - 1000
    for key in redis_client.scan_iter(match=f"qrl:{{{namespace}}}:*"):
        redis_client.delete(key)


def test_expired_tenant_hash_reads_as_a_full_bucket(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=3))
    assert limiter.acquire("acme", cost=3).allowed
    assert not limiter.acquire("acme").allowed
    key = limiter.keys.tenant("acme")
    limiter.client.pexpire(key, 1)
    deadline = time.monotonic() + 10
    while limiter.client.exists(key):
        assert time.monotonic() < deadline, "the key did not expire"
        time.sleep(0.005)
    assert limiter.peek("acme").remaining == {"tenant:acme": 3}
    assert limiter.acquire("acme", cost=3).allowed


# -- NOSCRIPT ----------------------------------------------------------------------------


def test_decisions_use_redis_functions_when_the_server_has_them(limiter: Limiter) -> None:
    limiter.acquire("acme")
    assert limiter._scripts.transport == "fcall"
    # FUNCTION LIST replies [b"library_name", name, b"engine", ...] per library.
    libraries = limiter.client.function_list(library=limiter._scripts.library_name)
    assert [lib[1].decode() for lib in libraries] == [limiter._scripts.library_name]


@pytest.mark.parametrize("transport", ["fcall", "evalsha"])
def test_lost_scripts_are_loaded_again(limiter: Limiter, transport: str) -> None:
    """After SCRIPT FLUSH / FUNCTION FLUSH (or a restart without persistence)."""
    limiter._scripts.transport = transport  # type: ignore[assignment]

    def flush() -> None:
        if transport == "fcall":
            limiter.client.function_flush()
        else:
            limiter.client.script_flush()
            assert limiter.client.script_exists(limiter._scripts.sha("acquire.lua")) == [False]

    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=2))
    assert limiter.acquire("acme").allowed
    flush()
    assert limiter.acquire("acme").allowed
    assert not limiter.acquire("acme").allowed
    flush()
    assert limiter.peek("acme").remaining["tenant:acme"] < 0.01
    flush()
    assert limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=5)) == 2
    flush()
    assert limiter.refund("acme", cost=5).remaining["tenant:acme"] == 5
    assert limiter._scripts.transport == transport


def test_a_dropped_connection_is_reconnected_and_decides_once(
    limiter: Limiter, redis_client: redis.Redis, redis_url: str
) -> None:
    """Decisions are sent on a pooled connection directly; one the server dropped is
    connected again and the decision made once, not lost and not counted twice."""
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=5))
    assert limiter.acquire("acme").allowed
    # Dropped while idle in the pool: redis-py replaces it when it is taken out.
    redis_client.client_kill_filter(_id=limiter.client.client_id())
    assert limiter.acquire("acme").allowed
    # Dropped while a decision waits for its reply: writes are paused for longer than the
    # client's timeout, so the decision times out, its connection is closed (the server
    # drops the unanswered call with it) and the decision is made again, under the
    # client's retry policy, once Redis answers.
    client = redis.Redis.from_url(
        redis_url,
        socket_timeout=0.3,
        retry=Retry(ConstantBackoff(0.1), 20),
        retry_on_error=[redis.TimeoutError],
    )
    patient = Limiter(client, namespace=limiter.namespace)
    assert patient.acquire("acme").allowed
    redis_client.client_pause(700, all=False)
    assert patient.acquire("acme").allowed
    assert limiter.peek("acme").remaining == {"tenant:acme": near(1)}
    patient.close()


@pytest.mark.parametrize(
    "options",
    [{"single_connection_client": True}, {"decode_responses": True}, {"protocol": 3}],
    ids=["single-connection", "decoded", "resp3"],
)
def test_clients_of_every_kind_decide_alike(
    redis_url: str, namespace: str, options: dict[str, object]
) -> None:
    client = redis.Redis.from_url(redis_url, **options)
    limiter = Limiter(client, namespace=namespace)
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=2))
    decisions = [limiter.acquire("acme", "emails") for _ in range(3)]
    assert [d.allowed for d in decisions] == [True, True, False]
    assert decisions[1].remaining == {"tenant:acme": near(0)}
    assert decisions[2].denied_by == "tenant:acme"
    limiter.close()


def test_threads_sharing_one_limiter_get_their_own_replies(limiter: Limiter) -> None:
    """Threads share the client's pool: every decision reads its own reply (a reply read by
    the wrong thread would name another tenant's scope) and the bucket is never overspent."""
    limiter.set_limit("tenant:*", Limit(1, per=HOUR, burst=300))
    tenants = [f"t{n}" for n in range(8)]
    results: dict[str, list[Decision]] = {t: [] for t in tenants}

    def hammer(tenant: str) -> None:
        for _ in range(400):
            results[tenant].append(limiter.acquire(tenant))

    threads = [threading.Thread(target=hammer, args=(t,)) for t in tenants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for tenant, decisions in results.items():
        assert {name for d in decisions for name in d.remaining} == {f"tenant:{tenant}"}
        assert sum(d.allowed for d in decisions) == 300
        assert all(d.denied_by == f"tenant:{tenant}" for d in decisions if not d.allowed)


def test_decisions_are_sent_directly_only_where_nothing_is_bypassed(redis_url: str) -> None:
    """The packed, pooled path is for plain clients; the others keep redis-py's own path:
    a client pinned to one connection (its lock), one with client-side caching (its
    connections track what they send), a cluster client (routing)."""
    assert Limiter(redis.Redis.from_url(redis_url))._scripts._direct
    pinned = redis.Redis.from_url(redis_url, single_connection_client=True)
    assert not Limiter(pinned)._scripts._direct
    caching = redis.Redis(protocol=3, cache_config=CacheConfig())  # not connected here
    assert not Limiter(caching)._scripts._direct


def test_a_server_that_refuses_functions_gets_scripts(
    limiter: Limiter, redis_url: str, redis_client: redis.Redis
) -> None:
    """An ACL without FUNCTION and FCALL (or a Redis before 7): EVALSHA, same decisions."""
    user = f"qrl-nofunctions-{limiter.namespace}"
    redis_client.acl_setuser(
        user,
        enabled=True,
        nopass=True,
        keys=["*"],
        commands=["+@all", "-function", "-fcall", "-fcall_ro"],
    )
    try:
        client = redis.Redis.from_url(redis_url, username=user, password="")
        restricted = Limiter(client, namespace=limiter.namespace)
        restricted.set_limit("tenant:acme", Limit(1, per=HOUR, burst=2))
        assert [restricted.acquire("acme").allowed for _ in range(3)] == [True, True, False]
        assert restricted._scripts.transport == "evalsha"
        assert limiter.peek("acme").remaining == {"tenant:acme": near(0)}
        restricted.close()
    finally:
        redis_client.acl_deluser(user)


def test_decisions_stay_right_when_the_plan_cache_starts_over(limiter: Limiter) -> None:
    """The library's plans fill a byte budget (a few thousand plans) and then it starts
    over; tenants decided before and after the reset keep their own buckets."""
    limiter.set_limit("tenant:*", Limit(1, per=HOUR, burst=2))
    assert limiter.acquire("first").remaining == {"tenant:first": 1}
    pipe = limiter.client.pipeline(transaction=False)
    for n in range(10_050):  # one plan each: past the bound
        call = limiter._core.decision_call("acquire", f"t{n}", None, None, 1)
        limiter._scripts.queue(pipe, "acquire.lua", call.keys, call.args)
    assert all(reply.startswith(b"1 ") for reply in pipe.execute())
    assert limiter.acquire("first").remaining == {"tenant:first": near(0)}
    assert not limiter.acquire("first").allowed
    assert limiter.acquire("t5").remaining == {"tenant:t5": near(0)}
    limiter.set_limit("tenant:*", Limit(1, per=HOUR, burst=5))  # and changes still apply
    assert limiter.acquire("newcomer").remaining == {"tenant:newcomer": 4}
    assert limiter.acquire("t10049").remaining == {"tenant:t10049": near(0)}  # no windfall


def plan_cache_budget() -> int:
    """The byte budget of the plan cache, as lua/buckets.lua sets it."""
    source = (Path(__file__).parent.parent / "lua" / "buckets.lua").read_text()
    match = re.search(r"^local CACHE_BYTES = (\d+) \* 1024 \* 1024$", source, re.MULTILINE)
    assert match is not None
    return int(match[1]) * 1024 * 1024


def test_plan_cache_memory_is_bounded_across_namespaces(
    redis_process: Callable[..., RedisProcess],
) -> None:
    """Plans live in the Functions library's Lua VM, which maxmemory does not bound
    (used_memory_vm_functions). One-off tenants spread over three namespaces must not grow
    it past the budget, plus what Lua's incremental collector has yet to free (at most about
    the budget again) and the library itself. Before, it grew about 2 KB per tenant."""
    client = redis.Redis.from_url(redis_process().url)
    budget = plan_cache_budget()
    limiters = [Limiter(client, namespace=f"mem{i}") for i in range(3)]
    for lim in limiters:
        lim.set_limit("tenant:*", Limit(10))
        lim.set_limit("global", Limit(1e6))
    tenants = 3 * budget // 1024  # about six times what fits
    peak = 0
    for start in range(0, tenants, 600):
        pipe = client.pipeline(transaction=False)
        for n in range(start, min(start + 600, tenants)):
            lim = limiters[n % 3]
            call = lim._core.decision_call("acquire", f"u{n}", "q" if n % 2 else None, None, 1)
            lim._scripts.queue(pipe, "acquire.lua", call.keys, call.args)
        assert all(reply.startswith(b"1 ") for reply in pipe.execute())
        peak = max(peak, int(client.info("memory")["used_memory_vm_functions"]))
    assert peak < 2 * budget + 2 * 1024 * 1024, f"{peak / 2**20:.1f} MiB"
    client.close()


def test_configuration_cached_by_the_scripts_follows_a_recreated_namespace(
    limiter: Limiter,
) -> None:
    """Decisions keep what the configuration says per revision; deleting every key of the
    namespace and configuring it again (same version numbers) must not reuse it."""
    limiter.set_limit("tenant:*", Limit(1, per=HOUR, burst=2))
    assert limiter.acquire("acme").remaining == {"tenant:acme": 1}
    limiter.client.delete(*limiter.client.keys(f"{limiter.keys.base}:*"))
    limiter.set_limit("tenant:*", Limit(1, per=HOUR, burst=5))
    assert limiter.acquire("acme").remaining == {"tenant:acme": 4}
    limiter.client.delete(*limiter.client.keys(f"{limiter.keys.base}:*"))
    assert limiter.acquire("acme").remaining == {}


# -- shadow mode -------------------------------------------------------------------------


def test_shadow_scope_decides_but_never_denies(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=2), shadow=True)
    limiter.set_limit("global", Limit(1, per=HOUR, burst=100))
    results = [limiter.acquire("acme") for _ in range(5)]
    assert all(d.allowed for d in results)
    assert [d.would_deny for d in results] == [(), (), *[("tenant:acme",)] * 3]
    # The shadow bucket spends only what the enforced limiter would have granted.
    assert results[-1].remaining == {"tenant:acme": near(0), "global": near(95)}
    tenant, shared = counters(limiter, "acme")
    assert tenant["n:w"] == 3
    assert tenant["w:tenant:acme"] == 3
    assert shared["n:w"] == 3
    assert tenant["n:a"] == 5
    assert not [k for k in tenant if k.startswith("d:")]
    peeked = limiter.peek("acme")
    assert peeked.allowed
    assert peeked.would_deny == ("tenant:acme",)
    assert limiter.get_limit("tenant:acme").shadow is True
    # Enforced again, the bucket is one token short (not four): an hour's wait.
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=2))
    denied = limiter.acquire("acme")
    assert denied.denied_by == "tenant:acme"
    assert 3_590_000 < denied.wait_ms <= 3_600_000


def test_shadow_scope_does_not_hide_an_enforced_one(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=1), shadow=True)
    limiter.set_limit("global", Limit(1, per=HOUR, burst=1))
    assert limiter.acquire("acme").allowed
    denied = limiter.acquire("acme")
    assert not denied.allowed
    assert denied.denied_by == "global"
    assert denied.would_deny == ("tenant:acme",)


def test_shadow_counters_land_in_the_right_hash(limiter: Limiter) -> None:
    limiter.set_limit("global", Limit(1, per=HOUR, burst=1), shadow=True)
    limiter.set_limit("queue:q", Limit(1, per=HOUR, burst=1), shadow=True)
    limiter.acquire("acme", queue="q")
    decision = limiter.acquire("acme", queue="q")
    assert set(decision.would_deny) == {"queue:q", "global"}
    tenant, shared = counters(limiter, "acme")
    assert (shared["w:global"], shared["w:queue:q"], shared["n:w"], tenant["n:w"]) == (1, 1, 1, 1)


def test_namespace_wide_shadow(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=1))
    limiter.set_limit("global", Limit(1, per=HOUR, burst=1))
    assert limiter.acquire("acme").allowed
    assert not limiter.acquire("acme").allowed
    limiter.set_shadow(True)
    decision = limiter.acquire("acme", cost=3)  # above both bursts: only a would-deny
    assert decision.allowed
    assert set(decision.would_deny) == {"tenant:acme", "global"}
    assert counters(limiter, "acme")[1]["n:w"] == 1
    limiter.set_shadow(False)
    assert not limiter.acquire("acme").allowed
    with pytest.raises(CostExceedsBurst):
        limiter.acquire("acme", cost=3)


# -- exempt (VIP) tenants ----------------------------------------------------------------


def test_tenant_exemption_skips_tenant_caps_but_counts_toward_global(limiter: Limiter) -> None:
    limiter.set_limit("tenant:*", Limit(1, per=HOUR, burst=1))
    limiter.set_limit("tenant:*:queue:q", Limit(1, per=HOUR, burst=1))
    limiter.set_limit("queue:q", Limit(1, per=HOUR, burst=5))
    limiter.set_limit("global", Limit(1, per=HOUR, burst=3))
    limiter.set_exempt("vip", "tenant")
    assert limiter.exemptions() == {"vip": "tenant"}
    first = limiter.acquire("vip", queue="q")
    assert first.remaining == {"queue:q": approx(4), "global": approx(2)}
    assert limiter.acquire("vip", queue="q").allowed
    assert limiter.acquire("vip", queue="q").allowed
    denied = limiter.acquire("vip", queue="q")
    assert not denied.allowed
    assert denied.denied_by == "global"
    assert not limiter.acquire("plain", queue="q").allowed, "the VIP used the global budget"
    with pytest.raises(CostExceedsBurst) as info:
        limiter.acquire("vip", cost=4)
    assert info.value.scope == "global"


def test_all_exemption_skips_every_cap(limiter: Limiter) -> None:
    limiter.set_limit("tenant:*", Limit(1, per=HOUR, burst=1))
    limiter.set_limit("queue:q", Limit(1, per=HOUR, burst=1))
    limiter.set_limit("global", Limit(1, per=HOUR, burst=1))
    assert limiter.acquire("plain", queue="q").allowed
    limiter.set_exempt("vip", "all")
    for _ in range(10):
        decision = limiter.acquire("vip", queue="q", cost=100)
        assert decision.allowed
        assert decision.remaining == {}
    assert counters(limiter, "vip")[0]["n:a"] == 10
    limiter.set_exempt("vip", None)
    assert limiter.exemptions() == {}
    assert not limiter.acquire("vip", queue="q").allowed


def test_exempt_mode_is_validated(limiter: Limiter) -> None:
    with pytest.raises(InvalidName, match="exempt mode must be"):
        limiter.set_exempt("vip", "everything")  # type: ignore[arg-type]


# -- counters ----------------------------------------------------------------------------


def test_counters_and_wait_histogram(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(10, burst=3))
    limiter.set_limit("global", Limit(1, per=HOUR, burst=100))
    assert limiter.acquire("acme", queue="q", priority="high", cost=1.5).allowed
    assert limiter.acquire("acme", queue="q", priority="low", cost=1).allowed
    assert limiter.acquire("acme", queue="r", cost=0.25).allowed
    write_bucket(limiter, "tenant:acme", 0.3)  # frozen: each denial waits exactly 70 ms
    assert limiter.acquire("acme", queue="q", priority="high").wait_ms == approx(70)
    assert limiter.acquire("acme").wait_ms == approx(70)
    write_bucket(limiter, "global", 0)  # frozen: global waits an hour
    assert limiter.acquire("acme").denied_by == "global"
    limiter.peek("acme")  # a peek counts nothing
    limiter.refund("acme")  # nor does a refund
    tenant, shared = counters(limiter, "acme")
    assert tenant == {"n:a": 3, "d:tenant:acme": 2, "d:global": 1}
    # Totals are sums: allowed over a:q:* ("-" without a queue), denied over the histogram.
    assert shared == {
        "n:ax": approx(2.75 - 3),
        "a:q:q": 2,
        "a:q:r": 1,
        "a:p:high": 1,
        "a:p:low": 1,
        "n:aq": 2,  # names with a counter of their own (bounded: lua/buckets.lua)
        "n:ap": 2,
        "d:global": 1,
        "d:tenant:acme": 2,  # tenant scopes too, under the limit as configured (#12)
        "h:100": 2,
        "h:inf": 1,
        "h:us": approx((140 + 3_600_000) * 1000),
    }


def test_counters_add_up_across_limiters(limiter: Limiter, redis_url: str) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=7))
    others = [Limiter.from_url(redis_url, namespace=limiter.namespace) for _ in range(3)]
    try:
        results = [lim.acquire("acme").allowed for _ in range(4) for lim in [limiter, *others]]
    finally:
        for other in others:
            other.close()
    assert results.count(True) == 7
    tenant, shared = counters(limiter, "acme")
    assert (tenant["n:a"], tenant["d:tenant:acme"], shared["a:q:-"], shared["h:inf"]) == (
        7,
        9,
        7,
        9,
    )


# -- priority ----------------------------------------------------------------------------


def test_priority_does_not_change_a_plain_acquire(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=2))
    assert limiter.acquire("acme", priority="low").allowed
    assert limiter.acquire("acme", priority="high").allowed
    for priority in ("high", "normal", "low", None):
        denied = limiter.acquire("acme", priority=priority)
        assert not denied.allowed
        assert denied.denied_by == "tenant:acme"


@pytest.mark.parametrize("priority", ["HIGH", "", "urgent!", "1", "p" * 33, 1, b"high"])
def test_priority_is_validated(limiter: Limiter, priority: object) -> None:
    with pytest.raises(InvalidName, match="invalid priority"):
        limiter.acquire("acme", priority=priority)  # type: ignore[arg-type]


# -- configuration: versions, audit, listing ---------------------------------------------


def test_config_versions_and_audit_trail(limiter: Limiter) -> None:
    assert limiter.config_version() == 0
    assert limiter.set_limit("tenant:acme", "10/s", actor="alice") == 1
    assert limiter.set_limit("tenant:acme", "10/s", actor="alice") == 1, "no change, no bump"
    assert limiter.set_limit("tenant:acme", "20/s", actor="bob") == 2
    assert limiter.set_exempt("vip", "all", actor="carol") == 3
    assert limiter.set_shadow(True) == 4
    assert limiter.delete_limit("tenant:acme", actor="dave") == 5
    assert limiter.config_version() == 5
    entries = limiter.audit_log()
    assert [(e.version, e.op, e.field, e.actor) for e in entries] == [
        (5, "del", "tenant:acme", "dave"),
        (4, "set", "mode:shadow", "api"),
        (3, "set", "exempt:vip", "carol"),
        (2, "set", "tenant:acme", "bob"),
        (1, "set", "tenant:acme", "alice"),
    ]
    assert entries[3].old == entries[4].new == "10.0 1.0 10.0 -"
    assert entries[3].new == entries[0].old == "20.0 1.0 20.0 -"
    assert entries[0].new == ""
    now_ms = server_us(limiter.client) // 1000
    assert all(now_ms - 60_000 < e.at_ms <= now_ms for e in entries)
    assert [e.version for e in limiter.audit_log(count=2)] == [5, 4]


def test_get_limit_and_listing(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(6000, per=60, burst=200))
    limiter.set_limit("global", "1000/s", shadow=True)
    limiter.set_limit("tenant:*", "5/2s")
    limiter.set_exempt("vip")
    limiter.set_shadow(True)
    assert limiter.get_limit("tenant:acme") == ScopeLimit(
        "tenant:acme", Limit(6000, per=60, burst=200), False
    )
    assert limiter.get_limit(Scope.parse("global")) == ScopeLimit("global", Limit(1000), True)
    assert list(limiter.limits()) == ["global", "tenant:*", "tenant:acme"]
    assert limiter.limits()["tenant:*"].limit == Limit(5, per=2)
    assert limiter.exemptions() == {"vip": "tenant"}


def test_unknown_scopes_raise_limit_not_found(limiter: Limiter) -> None:
    with pytest.raises(LimitNotFound) as info:
        limiter.delete_limit("tenant:ghost")
    assert isinstance(info.value, KeyError)
    assert isinstance(info.value, RateLimitError)
    assert str(info.value) == "no limit is set for scope 'tenant:ghost'"
    with pytest.raises(LimitNotFound, match="global"):
        limiter.get_limit("global")
    assert limiter.config_version() == 0, "a failed delete changes nothing"
    assert limiter.audit_log() == []


def test_delete_then_set_again_grants_no_fresh_burst(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=2))
    limiter.set_limit("global", Limit(1, per=HOUR, burst=2))
    assert limiter.acquire("acme", cost=2).allowed
    limiter.delete_limit("tenant:acme")
    limiter.delete_limit("global")
    assert limiter.acquire("acme").remaining == {}, "no limit, no bucket applies"
    with pytest.raises(LimitNotFound):
        limiter.delete_limit("tenant:acme")
    limiter.set_limit("tenant:acme", Limit(1, per=HOUR, burst=2))
    limiter.set_limit("global", Limit(1, per=HOUR, burst=2))
    assert limiter.peek("acme").remaining == {"tenant:acme": near(0), "global": near(0)}
    assert not limiter.acquire("acme").allowed


def test_set_limit_refuses_bad_limits(limiter: Limiter) -> None:
    with pytest.raises(InvalidLimit):
        limiter.set_limit("global", "0/s")
    with pytest.raises(InvalidLimit):
        limiter.set_limit("global", "fast")
    with pytest.raises(ConfigError, match="limit must be a Limit"):
        limiter.set_limit("global", 100)  # type: ignore[arg-type]
    with pytest.raises(InvalidScope):
        limiter.set_limit("everyone", "1/s")
    assert limiter.config_version() == 0


# -- static configuration ----------------------------------------------------------------


def test_apply_config_does_not_overwrite_unless_asked(limiter: Limiter) -> None:
    limiter.set_limit("tenant:*", "7/s", actor="operator")
    config = {
        "limits": {
            "global": "1000/s",
            "tenant:*": {"rate": "50/s", "burst": 100},
            "tenant:acme:queue:emails": {"rate": "10/s", "shadow": True},
        },
        "exempt": {"vip": "all"},
        "shadow": True,
    }
    written = limiter.apply_config(config)
    assert written == ["global", "tenant:acme:queue:emails", "exempt:vip", "mode:shadow"]
    assert limiter.get_limit("tenant:*").limit == Limit(7)
    assert limiter.get_limit("tenant:acme:queue:emails").shadow is True
    assert limiter.apply_config(config) == []
    assert limiter.audit_log(count=1)[0].actor == "config"
    written = limiter.apply_config(parse_config(config), overwrite=True, actor="deploy")
    assert written == [
        "global",
        "tenant:*",
        "tenant:acme:queue:emails",
        "exempt:vip",
        "mode:shadow",
    ]
    assert limiter.get_limit("tenant:*").limit == Limit(50, burst=100)
    assert limiter.audit_log(count=1)[0].actor == "deploy"
    assert limiter.acquire("vip", cost=1e6).allowed


def test_load_config_file(tmp_path: Path, limiter: Limiter) -> None:
    path = tmp_path / "limits.toml"
    path.write_text(
        """
shadow = false
record = 900
[limits]
"global" = "1000/s"
"tenant:*" = { rate = "50/s", burst = 100 }
"tenant:acme:queue:emails" = { rate = "10/s", shadow = true }
[exempt]
vip = "tenant"
""",
        encoding="utf-8",
    )
    spec = load_config_file(path)
    assert spec == ConfigSpec(
        limits={
            "global": (Limit(1000), False),
            "tenant:*": (Limit(50, burst=100), False),
            "tenant:acme:queue:emails": (Limit(10), True),
        },
        exempt={"vip": "tenant"},
        shadow=False,
        record=900,
    )
    limiter.apply_config(spec)
    assert limiter.recording() == 900
    assert limiter.acquire("acme", queue="emails").remaining == {
        "tenant:acme:queue:emails": approx(9),
        "tenant:acme": approx(99),
        "global": approx(999),
    }


def test_load_config_file_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[limits\nglobal = 1", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_config_file(broken)
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\n"global" = "0/s"\n', encoding="utf-8")
    with pytest.raises(InvalidLimit, match="greater than 0"):
        load_config_file(bad)


def test_config_from_env(tmp_path: Path) -> None:
    assert config_from_env({}) is None
    assert config_from_env({"QUEUE_RATELIMIT_LIMITS": ""}) is None
    spec = config_from_env({"QUEUE_RATELIMIT_LIMITS": " global=1000/s ; tenant:*=50/s ;"})
    assert spec is not None
    assert spec.limits == {"global": (Limit(1000), False), "tenant:*": (Limit(50), False)}
    path = tmp_path / "c.toml"
    path.write_text('[limits]\n"global" = "5/s"\n', encoding="utf-8")
    from_file = config_from_env(
        {"QUEUE_RATELIMIT_CONFIG": str(path), "QUEUE_RATELIMIT_LIMITS": "global=1/s"}
    )
    assert from_file is not None
    assert from_file.limits == {"global": (Limit(5), False)}, "the file wins"


def test_config_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUEUE_RATELIMIT_CONFIG", raising=False)
    monkeypatch.setenv("QUEUE_RATELIMIT_LIMITS", "tenant:acme=3/m")
    spec = config_from_env()
    assert spec is not None
    assert spec.limits == {"tenant:acme": (Limit(3, per=60), False)}


@pytest.mark.parametrize(
    ("env", "error", "fragment"),
    [
        ({"QUEUE_RATELIMIT_LIMITS": "global:1000/s"}, ConfigError, "must look like 'scope=100/s'"),
        ({"QUEUE_RATELIMIT_LIMITS": "global=lots"}, InvalidLimit, "cannot parse limit 'lots'"),
        ({"QUEUE_RATELIMIT_LIMITS": "users=1/s"}, InvalidScope, "unknown scope 'users'"),
        ({"QUEUE_RATELIMIT_CONFIG": "/nonexistent/limits.toml"}, OSError, "limits.toml"),
    ],
)
def test_config_from_env_errors(env: dict[str, str], error: type[Exception], fragment: str) -> None:
    with pytest.raises(error) as info:
        config_from_env(env)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("raw", "error", "fragment"),
    [
        ({"limit": {}}, ConfigError, "unknown configuration keys ['limit']"),
        ({"limits": ["global"]}, ConfigError, "must be tables"),
        ({"exempt": "vip"}, ConfigError, "must be tables"),
        ({"limits": {"global": 5}}, InvalidLimit, "must be a string or a table"),
        ({"limits": {"global": {"burst": 3}}}, InvalidLimit, "must have 'rate'"),
        ({"limits": {"global": {"rate": "1/s", "bursts": 3}}}, InvalidLimit, "'bursts'"),
        ({"limits": {"global": {"rate": 10}}}, InvalidLimit, "must be a string like"),
        ({"limits": {"global": {"rate": "1/s", "burst": "3"}}}, InvalidLimit, "must be a number"),
        ({"limits": {"global": {"rate": "1/s", "burst": 0.5}}}, InvalidLimit, "at least 1"),
        ({"limits": {"global": "fast"}}, InvalidLimit, "cannot parse limit 'fast'"),
        ({"limits": {"tenant:a b": "1/s"}}, InvalidName, "invalid tenant name 'a b'"),
        ({"limits": {"users:acme": "1/s"}}, InvalidScope, "unknown scope 'users:acme'"),
        ({"exempt": {"vip": "everything"}}, ConfigError, "must be 'tenant' or 'all'"),
        ({"exempt": {"v{i}p": "all"}}, InvalidName, "invalid tenant name"),
        ({"shadow": "false"}, ConfigError, "shadow must be true or false"),
        ({"record": 5}, ConfigError, "60 to 86400 seconds"),
        ({"record": "900"}, ConfigError, "60 to 86400 seconds"),
        ({"records": 900}, ConfigError, "unknown configuration keys ['records']"),
        (
            {"limits": {"global": {"rate": "1/s", "shadow": "no"}}},
            ConfigError,
            "shadow must be true or false",
        ),
    ],
)
def test_bad_config_is_a_config_error(
    raw: dict[str, object], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error) as info:
        parse_config(raw)
    assert isinstance(info.value, ConfigError)
    assert fragment in str(info.value)


# -- the client's clock is never used ----------------------------------------------------


def run_sequence(lim: Limiter) -> list[Decision]:
    lim.set_limit("tenant:acme", Limit(1, per=HOUR, burst=2))
    lim.set_limit("global", Limit(10, burst=5))
    return [lim.acquire("acme", cost=c) for c in (1, 0.5, 0.5, 1)] + [lim.peek("acme")]


@pytest.mark.parametrize(
    "skew_s",
    [10 * 365 * 86400.0, -30 * 365 * 86400.0, 1e9],
    ids=["ten years ahead", "thirty years behind", "1e9 s ahead"],
)
def test_a_skewed_client_clock_changes_nothing(
    limiter: Limiter,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    skew_s: float,
) -> None:
    reference = run_sequence(limiter)
    real: dict[str, Callable[[], float]] = {
        "time": time.time,
        "monotonic": time.monotonic,
        "perf_counter": time.perf_counter,
    }
    real_ns: dict[str, Callable[[], int]] = {"time_ns": time.time_ns}
    for name, func in real.items():
        monkeypatch.setattr(time, name, lambda f=func: f() + skew_s)
    monkeypatch.setattr(time, "time_ns", lambda: real_ns["time_ns"]() + int(skew_s * 1e9))
    assert abs(time.time() - real["time"]() - skew_s) < 1
    skewed_limiter = Limiter.from_url(redis_url, namespace=f"{limiter.namespace}-skew")
    try:
        with caplog.at_level(logging.WARNING, logger="queue_ratelimit"):
            skewed = run_sequence(skewed_limiter)
        stored = read_bucket(skewed_limiter, "tenant:acme")
    finally:
        monkeypatch.undo()
        keys = list(limiter.client.scan_iter(match=f"qrl:{{{skewed_limiter.namespace}}}:*"))
        limiter.client.delete(*keys)
        skewed_limiter.close()
    expected = [True, True, True, False, False]
    assert [d.allowed for d in skewed] == [d.allowed for d in reference] == expected
    for ours, theirs in zip(skewed, reference, strict=True):
        assert ours.denied_by == theirs.denied_by
        assert ours.wait_ms == pytest.approx(theirs.wait_ms, abs=5_000)
        assert ours.remaining.keys() == theirs.remaining.keys()
        for scope, tokens in ours.remaining.items():
            assert tokens == pytest.approx(theirs.remaining[scope], abs=0.5)
    assert skewed[3].wait_ms > 3_500_000, "an hour per token, whatever the client's clock says"
    # The state was stamped with Redis's clock, not the skewed one.
    assert stored is not None
    assert abs(stored[1] - server_us(limiter.client)) < 60 * 1_000_000
    assert not caplog.records


def test_huge_waits_never_overflow_the_wait_total(limiter: Limiter) -> None:
    """A tenant that picks huge costs on a slow bucket cannot break denials for everyone:
    each wait is clamped, and their total is a float, never an overflowing integer. (The
    one-call variant, burst and cost 1e5, is a case of test_decisions.py.)"""
    limiter.set_limit("tenant:attacker", Limit.parse("1/115d", burst=9000))
    limiter.set_limit("tenant:*", Limit(1, per=3600, burst=1))
    assert limiter.acquire("attacker", cost=9000).allowed
    for _ in range(200):
        decision = limiter.acquire("attacker", cost=9000)
        assert not decision.allowed
        assert decision.wait_ms == MAX_WAIT * 1000
    assert limiter.acquire("quiet").allowed
    assert not limiter.acquire("quiet").allowed  # an ordinary denial still works


@pytest.mark.parametrize(
    ("call", "args"),
    [
        # (mode, queue, priority, cost, hold) -> what acquire.lua is sent after its 2 keys
        (("acquire", None, None, 1, None), []),
        (("acquire", "q", None, 1, None), [b"q"]),
        (("acquire", "q", "high", 1, None), [b"q", b"high"]),
        (("acquire", None, None, 2.5, None), [b"", b"", b"2.5"]),
        (("peek", None, None, 1, None), [b"", b"", b"1", b"", b"peek"]),
        (("acquire", None, None, 1, 30), [b"", b"", b"1", b"", b"acquire", b"30000"]),
    ],
)
def test_a_decision_sends_two_keys_and_only_the_arguments_it_needs(
    limiter: Limiter, call: tuple[Any, ...], args: list[bytes]
) -> None:
    """Each key or argument costs Redis about 1,300 instructions (docs/benchmarks.md, "Two
    keys, no tenant argument"): the usual call sends the tenant hash, the shared hash and
    at most its queue; a trailing default is never sent."""
    mode, queue, priority, cost, hold = call
    sent = limiter._core.decision_call(mode, "acme", queue, priority, cost, hold)
    assert list(sent.keys) == [limiter.keys.tenant("acme").encode(), limiter.keys.shared.encode()]
    assert list(sent.args) == args
