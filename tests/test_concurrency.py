"""Concurrency caps (``Limiter.set_concurrency``): slots taken atomically with the tokens,
held under a lease, released once; on a real Redis server and on the embedded engine."""

from __future__ import annotations

import math
import multiprocessing
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from bucket_state import server_us
from conftest import scratch_limiter, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from queue_ratelimit import (
    ConfigError,
    Decision,
    InvalidCost,
    InvalidLimit,
    InvalidName,
    InvalidScope,
    Limit,
    Limiter,
    LimitNotFound,
    Slot,
    config_from_env,
    parse_config,
)
from queue_ratelimit._embedded import embedded_client

HOUR_US = 3600 * 1_000_000


def slots_key(lim: Limiter, scope: str) -> str:
    return lim.keys.slots(scope)


def hold_slots(lim: Limiter, scope: str, live: int = 0, expired: int = 0) -> list[str]:
    """Put holders into a scope's slot set directly: ``live`` ones an hour from their end,
    ``expired`` ones whose lease ran out a second ago (not yet reclaimed)."""
    now = server_us(lim.client)
    holders = {f"pre-{scope}-{i}": now + HOUR_US + i for i in range(live)}
    holders |= {f"old-{scope}-{i}": now - 1_000_000 - i for i in range(expired)}
    if holders:
        lim.client.zadd(slots_key(lim, scope), holders)
    return list(holders)


def holders(lim: Limiter, scope: str) -> dict[str, float]:
    return {
        k.decode(): v for k, v in lim.client.zrange(slots_key(lim, scope), 0, -1, withscores=True)
    }


def expire(lim: Limiter, slot: Slot) -> None:
    """Make a slot's lease run out now (a worker that was killed), as Redis's clock sees it."""
    past = server_us(lim.client) - 1_000_000
    for scope in slot.scopes:
        assert lim.client.zadd(slots_key(lim, scope), {slot.token: past}, xx=True, ch=True) == 1


# -- table-driven decisions --------------------------------------------------------------


@dataclass
class Case:
    """One decision: caps (and limits, exemptions), holders already in the slot sets, and
    what the decision must be."""

    id: str
    caps: dict[str, int]
    allowed: bool
    slot_scopes: tuple[str, ...] = ()
    denied_by: str | None = None
    concurrency: bool = False
    held: dict[str, tuple[int, int]] = field(default_factory=dict)  # scope -> (live, expired)
    limits: dict[str, str] = field(default_factory=dict)
    empty_buckets: bool = False  # the tenant bucket emptied before the decision
    exempt: str | None = None
    tenant: str = "acme"
    queue: str | None = "q"


def full(id: str, caps: dict[str, int], scope: str, live: int, **fields: Any) -> Case:
    """A case denied by the cap of ``scope``, whose slots ``live`` holders hold."""
    return Case(
        id, caps, False, denied_by=scope, concurrency=True, held={scope: (live, 0)}, **fields
    )


CASES = [
    Case("cap1-free", {"tenant:acme": 1}, True, ("tenant:acme",)),
    full("cap1-full", {"tenant:acme": 1}, "tenant:acme", 1),
    Case(
        "cap1-expired-holder-reclaimed",
        {"tenant:acme": 1},
        True,
        ("tenant:acme",),
        held={"tenant:acme": (0, 1)},
    ),
    Case("capn-below", {"tenant:acme": 3}, True, ("tenant:acme",), held={"tenant:acme": (2, 0)}),
    full("capn-full", {"tenant:acme": 3}, "tenant:acme", 3),
    Case(
        "capn-full-but-one-expired",
        {"tenant:acme": 3},
        True,
        ("tenant:acme",),
        held={"tenant:acme": (2, 1)},
    ),
    Case(
        "rate-denies-while-cap-admits",
        {"tenant:acme": 2},
        False,
        denied_by="tenant:acme",
        concurrency=False,
        limits={"tenant:acme": "1/h"},
        empty_buckets=True,
    ),
    full(
        "cap-denies-while-rate-admits",
        {"tenant:acme": 1},
        "tenant:acme",
        1,
        limits={"tenant:acme": "100/s"},
    ),
    Case(
        "tenant-default-counts-per-tenant",
        {"tenant:*": 1},
        True,
        ("tenant:acme",),
        held={"tenant:bigco": (1, 0)},
    ),
    full("tenant-default-full", {"tenant:*": 1}, "tenant:acme", 1),
    Case(
        "own-cap-overrides-default",
        {"tenant:*": 1, "tenant:acme": 2},
        True,
        ("tenant:acme",),
        held={"tenant:acme": (1, 0)},
    ),
    Case(
        "tenant-queue-default-per-tenant",
        {"tenant:*:queue:q": 1},
        True,
        ("tenant:acme:queue:q",),
        held={"tenant:bigco:queue:q": (1, 0)},
    ),
    Case(
        "tenant-queue-cap-other-queue-free",
        {"tenant:*:queue:q": 1},
        True,
        (),
        held={"tenant:acme:queue:q": (1, 0)},
        queue="other",
    ),
    full("queue-cap-full", {"queue:q": 2}, "queue:q", 2),
    Case(
        "queue-cap-without-a-queue", {"queue:q": 1}, True, (), held={"queue:q": (1, 0)}, queue=None
    ),
    full("global-cap-full", {"global": 1}, "global", 1, queue=None),
    Case(
        "every-cap-at-once",
        {"tenant:acme:queue:q": 1, "tenant:acme": 2, "queue:q": 3, "global": 4},
        True,
        ("tenant:acme:queue:q", "tenant:acme", "queue:q", "global"),
    ),
    full("all-or-nothing-global-full", {"tenant:acme": 2, "global": 1}, "global", 1),
    Case(
        "exempt-tenant-skips-tenant-caps-only",
        {"tenant:acme": 1, "global": 2},
        True,
        ("global",),
        held={"tenant:acme": (1, 0)},
        exempt="tenant",
    ),
    full(
        "exempt-tenant-still-meets-the-global-cap",
        {"tenant:acme": 1, "global": 1},
        "global",
        1,
        exempt="tenant",
    ),
    Case(
        "exempt-all-skips-every-cap",
        {"tenant:acme": 1, "global": 1},
        True,
        (),
        held={"tenant:acme": (1, 0), "global": (1, 0)},
        exempt="all",
    ),
]


@pytest.mark.parametrize("transport", ["fcall", "evalsha"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decision_table(limiter: Limiter, case: Case, transport: str) -> None:
    limiter._scripts.transport = transport  # type: ignore[assignment]
    for scope, n in case.caps.items():
        limiter.set_concurrency(scope, n)
    for scope, limit in case.limits.items():
        limiter.set_limit(scope, limit)
    if case.exempt:
        limiter.set_exempt(case.tenant, case.exempt)  # type: ignore[arg-type]
    if case.empty_buckets:  # the tenant bucket, frozen empty for an hour
        key = limiter.keys.tenant(case.tenant)
        limiter.client.hset(key, mapping={"b": "0", "b:u": server_us(limiter.client) + HOUR_US})
    for scope, (live, expired) in case.held.items():
        hold_slots(limiter, scope, live, expired)
    before = {scope: holders(limiter, scope) for scope in case.held}
    tokens_before = limiter.client.hgetall(limiter.keys.tenant(case.tenant))

    peeked = limiter.peek(case.tenant, case.queue)
    decision = limiter.acquire(case.tenant, case.queue, hold=30)

    for result in (peeked, decision):
        assert result.allowed is case.allowed
        assert result.denied_by == case.denied_by
        assert result.concurrency is case.concurrency
    assert peeked.slot is None, "a peek takes no slot"
    if case.allowed and case.slot_scopes:
        assert decision.slot is not None
        assert decision.slot.scopes == case.slot_scopes
        for scope in case.slot_scopes:
            assert decision.slot.token in holders(limiter, scope)
    else:
        assert decision.slot is None
    if not case.allowed:
        # Nothing taken: no slot added anywhere, no token spent.
        for scope, (live, _) in case.held.items():
            now_live = {
                h for h, d in holders(limiter, scope).items() if d > server_us(limiter.client)
            }
            assert now_live == {h for h, d in before[scope].items() if h.startswith("pre-")}
            assert len(now_live) == live
        for scope in case.caps:
            if scope not in case.held and "*" not in scope:
                assert holders(limiter, scope) == {}
        if case.concurrency:
            assert limiter.client.hgetall(limiter.keys.tenant(case.tenant)).get(b"b") == (
                tokens_before.get(b"b")
            )
    for scope, (_, expired) in case.held.items():
        if expired and case.allowed:
            assert not any(h.startswith("old-") for h in holders(limiter, scope)), "reclaimed"


def test_a_concurrency_denial_waits_until_the_earliest_lease_ends(limiter: Limiter) -> None:
    limiter.set_concurrency("tenant:acme", 2)
    first = limiter.acquire("acme", hold=50)
    limiter.acquire("acme", hold=100)
    assert first.slot is not None
    deadline = holders(limiter, "tenant:acme")[first.slot.token]
    before = server_us(limiter.client)
    denied = limiter.acquire("acme")
    after = server_us(limiter.client)
    assert not denied.allowed
    assert denied.concurrency
    assert denied.denied_by == "tenant:acme"
    assert (deadline - after) / 1000 <= denied.wait_ms <= (deadline - before) / 1000


def test_a_longer_rate_wait_names_the_bucket(limiter: Limiter) -> None:
    """Both a cap (slot back within 1 s) and a bucket (an hour) deny: the longer wait wins."""
    limiter.set_concurrency("tenant:acme", 1)
    limiter.set_limit("tenant:acme", Limit(1, per=3600, burst=2))
    assert limiter.acquire("acme", hold=1).allowed
    assert limiter.acquire("acme", hold=1).concurrency  # the cap alone
    assert limiter.acquire("acme", hold=1).concurrency
    limiter.client.hset(limiter.keys.tenant("acme"), mapping={"b": "0"})
    denied = limiter.acquire("acme")
    assert denied.denied_by == "tenant:acme"
    assert denied.concurrency is False
    assert denied.wait_ms > 1000


# -- release, extend, expiry ---------------------------------------------------------------


@pytest.mark.parametrize("transport", ["fcall", "evalsha"])
@pytest.mark.parametrize("form", ["decision", "slot", "text"])
def test_release_frees_the_slot_once(limiter: Limiter, form: str, transport: str) -> None:
    limiter._scripts.transport = transport  # type: ignore[assignment]
    limiter.set_concurrency("tenant:*", 1)
    decision = limiter.acquire("acme")
    assert decision.slot is not None
    assert not limiter.acquire("acme").allowed
    held: Decision | Slot | str = {
        "decision": decision,
        "slot": decision.slot,
        "text": str(decision.slot),
    }[form]
    assert limiter.running("tenant:acme") == 1
    assert limiter.release(held) is True
    assert limiter.running("tenant:acme") == 0
    assert limiter.release(held) is False, "a second release changes nothing"
    again = limiter.acquire("acme")
    assert again.allowed
    assert again.slot is not None
    assert again.slot.token != decision.slot.token
    assert limiter.release(held) is False, "an old token cannot release the new holder"
    assert limiter.running("tenant:acme") == 1


def test_release_after_expiry_changes_nothing(limiter: Limiter) -> None:
    limiter.set_concurrency("tenant:acme", 1)
    first = limiter.acquire("acme")
    assert first.slot is not None
    expire(limiter, first.slot)
    assert limiter.running("tenant:acme") == 0
    second = limiter.acquire("acme")  # reclaims the expired holder
    assert second.allowed
    assert limiter.release(first) is False
    assert limiter.running("tenant:acme") == 1
    assert limiter.release(second) is True


def test_release_after_expiry_before_reclaim_returns_false(limiter: Limiter) -> None:
    limiter.set_concurrency("tenant:acme", 2)
    first = limiter.acquire("acme")
    assert first.slot is not None
    expire(limiter, first.slot)
    assert limiter.release(first) is False
    assert holders(limiter, "tenant:acme") == {}, "the expired holder is cleaned up"


def test_a_real_short_hold_runs_out(limiter: Limiter) -> None:
    limiter.set_concurrency("tenant:acme", 1)
    first = limiter.acquire("acme", hold=0.05)
    assert first.allowed
    wait_until(lambda: limiter.acquire("acme").allowed, timeout=10, what="the hold to run out")
    assert limiter.release(first) is False


@pytest.mark.parametrize("transport", ["fcall", "evalsha"])
def test_extend_renews_every_slot(limiter: Limiter, transport: str) -> None:
    limiter._scripts.transport = transport  # type: ignore[assignment]
    limiter.set_concurrency("tenant:acme", 1)
    limiter.set_concurrency("global", 5)
    decision = limiter.acquire("acme", hold=1)
    assert decision.slot is not None
    assert decision.slot.scopes == ("tenant:acme", "global")
    before = server_us(limiter.client)
    assert limiter.extend_slot(decision, 600) is True
    for scope in decision.slot.scopes:
        assert holders(limiter, scope)[decision.slot.token] >= before + 600_000_000
    expire(limiter, decision.slot)
    assert limiter.extend_slot(decision, 600) is False, "a lease that ran out is not revived"
    assert holders(limiter, "tenant:acme") == {}
    assert holders(limiter, "global") == {}
    assert limiter.release(decision) is False


def test_extend_after_release_is_false(limiter: Limiter) -> None:
    limiter.set_concurrency("queue:q", 1)
    decision = limiter.acquire("acme", "q")
    assert limiter.release(decision)
    assert limiter.extend_slot(decision) is False
    assert holders(limiter, "queue:q") == {}


def test_no_cap_means_no_slot_and_no_slot_keys(limiter: Limiter) -> None:
    limiter.set_limit("tenant:*", "100/s")
    decision = limiter.acquire("acme", "q", hold=5)
    assert decision.allowed
    assert decision.slot is None
    assert limiter.release(decision) is False
    assert limiter.extend_slot(decision) is False
    assert not list(limiter.client.scan_iter(match=f"{limiter.keys.base}:c:*"))
    assert limiter.client.hget(limiter.keys.shared, "n:lease") is None


def test_slot_set_keys_expire(limiter: Limiter) -> None:
    limiter.set_concurrency("tenant:acme", 3)
    limiter.acquire("acme")
    ttl = limiter.client.pttl(slots_key(limiter, "tenant:acme"))
    assert 0 < ttl <= 7 * 86400 * 1000


def test_removing_a_cap_applies_at_once(limiter: Limiter) -> None:
    limiter.set_concurrency("tenant:acme", 1)
    assert limiter.acquire("acme").allowed
    assert not limiter.acquire("acme").allowed
    limiter.set_concurrency("tenant:acme", None)
    decision = limiter.acquire("acme")
    assert decision.allowed
    assert decision.slot is None
    with pytest.raises(LimitNotFound):
        limiter.set_concurrency("tenant:acme", None)


def test_lowering_a_cap_keeps_running_jobs_and_admits_none_until_below(limiter: Limiter) -> None:
    limiter.set_concurrency("tenant:acme", 3)
    taken = [limiter.acquire("acme") for _ in range(3)]
    limiter.set_concurrency("tenant:acme", 1)
    assert not limiter.acquire("acme").allowed
    limiter.release(taken[0])
    assert not limiter.acquire("acme").allowed
    limiter.release(taken[1])
    assert not limiter.acquire("acme").allowed
    limiter.release(taken[2])
    assert limiter.acquire("acme").allowed


def test_namespace_shadow_mode_counts_a_full_cap_but_admits(limiter: Limiter) -> None:
    limiter.set_concurrency("tenant:acme", 1)
    limiter.set_shadow(True)
    first = limiter.acquire("acme")
    assert first.slot is not None, "a free slot is still taken, so running counts stay true"
    second = limiter.acquire("acme")
    assert second.allowed
    assert second.slot is None
    assert second.would_deny == ("tenant:acme",)
    assert limiter.running("tenant:acme") == 1


def test_cost_is_tokens_not_slots(limiter: Limiter) -> None:
    limiter.set_concurrency("tenant:acme", 2)
    limiter.set_limit("tenant:acme", Limit(1, per=3600, burst=10))
    decision = limiter.acquire("acme", cost=4)
    assert decision.slot is not None
    assert limiter.running("tenant:acme") == 1
    assert decision.remaining["tenant:acme"] == pytest.approx(6, abs=0.01)


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "n",
    [True, False, 0, -1, 1.5, math.nan, math.inf, -math.inf, 10**7, 1e300, "4", b"4", [4]],
)
def test_bad_caps_are_refused(limiter: Limiter, n: object) -> None:
    with pytest.raises(InvalidLimit):
        limiter.set_concurrency("tenant:acme", n)  # type: ignore[arg-type]
    assert limiter.concurrency() == {}


@pytest.mark.parametrize("scope", ["tenant", "tenant:a:b", "nope:x", "tenant:{x}", "queue:"])
def test_bad_scopes_are_refused(limiter: Limiter, scope: str) -> None:
    with pytest.raises((InvalidScope, InvalidName)):
        limiter.set_concurrency(scope, 2)


@pytest.mark.parametrize("hold", [0, -1, math.nan, math.inf, 8 * 86400, True, "5"])
def test_bad_holds_are_refused(limiter: Limiter, hold: object) -> None:
    with pytest.raises(InvalidCost):
        limiter.acquire("acme", hold=hold)  # type: ignore[arg-type]


def test_bad_slots_are_refused(limiter: Limiter) -> None:
    for bad in ("", "token-only", 42, None):
        with pytest.raises(InvalidName):
            limiter.release(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidScope):
        limiter.release(Slot("1", ("tenant:*",)))


def test_caps_are_versioned_audited_and_listed(limiter: Limiter) -> None:
    v1 = limiter.set_concurrency("tenant:*", 4, actor="ops")
    v2 = limiter.set_concurrency("global", 2.0)  # type: ignore[arg-type]  # whole float
    assert v2 == v1 + 1
    assert limiter.concurrency() == {"global": 2, "tenant:*": 4}
    assert limiter.get_concurrency("tenant:*") == 4
    assert limiter.get_concurrency("tenant:acme") is None
    assert limiter.limits() == {}, "caps are not rate limits"
    entry = limiter.audit_log(1)[0]
    assert (entry.field, entry.op, entry.new, entry.version) == ("conc:global", "set", "2", v2)
    assert limiter.audit_log(2)[1].actor == "ops"
    assert limiter.set_concurrency("global", None) == v2 + 1
    assert limiter.audit_log(1)[0].op == "del"


def test_running_needs_a_concrete_scope(limiter: Limiter) -> None:
    with pytest.raises(InvalidScope):
        limiter.running("tenant:*")
    assert limiter.running("tenant:acme") == 0


def test_static_config_seeds_caps(limiter: Limiter, tmp_path: Any) -> None:
    spec = parse_config({"concurrency": {"tenant:*": 4, "queue:reports": 10}})
    assert spec.concurrency == {"tenant:*": 4, "queue:reports": 10}
    written = limiter.apply_config(spec)
    assert sorted(written) == ["conc:queue:reports", "conc:tenant:*"]
    limiter.set_concurrency("tenant:*", 2)
    assert limiter.apply_config(spec) == [], "Redis holds the truth"
    assert limiter.get_concurrency("tenant:*") == 2
    toml = tmp_path / "qrl.toml"
    toml.write_text('[concurrency]\n"tenant:*" = 3\n')
    env = config_from_env({"QUEUE_RATELIMIT_CONFIG": str(toml)})
    assert env is not None
    assert env.concurrency == {"tenant:*": 3}
    env = config_from_env({"QUEUE_RATELIMIT_CONCURRENCY": "tenant:*=4; global=100"})
    assert env is not None
    assert env.concurrency == {"tenant:*": 4, "global": 100}


@pytest.mark.parametrize(
    "raw",
    [
        {"concurrency": {"tenant:*": 0}},
        {"concurrency": {"tenant:*": True}},
        {"concurrency": {"tenant:*": 2.5}},
        {"concurrency": {"tenant:*": "4"}},
        {"concurrency": {"bogus": 4}},
        {"concurrency": [4]},
    ],
)
def test_bad_static_caps_are_config_errors(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parse_config(raw)


@pytest.mark.parametrize("text", ["tenant:*=x", "tenant:*", "tenant:*=0", "global=1.5"])
def test_bad_env_caps_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        config_from_env({"QUEUE_RATELIMIT_CONCURRENCY": text})


def test_a_corrupt_cap_in_redis_is_a_loud_error(limiter: Limiter) -> None:
    limiter.client.hset(limiter.keys.config, "conc:tenant:acme", "many")
    limiter.set_limit("global", "100/s")  # a new revision: the plan is made again
    with pytest.raises(ConfigError, match="concurrency cap"):
        limiter.acquire("acme")


# -- the embedded engine ------------------------------------------------------------------


def test_the_embedded_engine_runs_the_same_caps() -> None:
    with Limiter(embedded_client(), namespace="conc") as lim:
        lim.set_concurrency("tenant:*", 1)
        first = lim.acquire("acme")
        assert first.slot is not None
        denied = lim.acquire("acme")
        assert denied.concurrency
        assert denied.denied_by == "tenant:acme"
        assert lim.acquire("bigco").allowed
        assert lim.release(first) is True
        assert lim.release(first) is False
        assert lim.acquire("acme").allowed
        assert lim.running("tenant:acme") == 1


# -- async -------------------------------------------------------------------------------


def test_async_limiter_has_the_same_caps(redis_url: str, namespace: str) -> None:
    import asyncio

    from queue_ratelimit import AsyncLimiter

    async def run() -> None:
        async with AsyncLimiter.from_url(redis_url, namespace=namespace) as lim:
            await lim.set_concurrency("tenant:*", 1)
            assert await lim.concurrency() == {"tenant:*": 1}
            assert await lim.get_concurrency("tenant:*") == 1
            first = await lim.acquire("acme", hold=30)
            assert first.slot is not None
            assert not (await lim.acquire("acme")).allowed
            assert await lim.running("tenant:acme") == 1
            assert await lim.extend_slot(first, 60) is True
            assert await lim.release(first) is True
            assert await lim.release(first) is False
            assert await lim.running("tenant:acme") == 0
            await lim.set_concurrency("tenant:*", None)
            assert await lim.concurrency() == {}

    asyncio.run(run())


# -- a reference model, under hypothesis ---------------------------------------------------


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.sampled_from(["acme", "bigco"])),
        st.tuples(st.just("release"), st.integers(0, 30)),
        st.tuples(st.just("expire"), st.integers(0, 30)),
        st.tuples(st.just("extend"), st.integers(0, 30)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cap=st.integers(1, 3), tenant_cap=st.integers(1, 2), ops=OPS)
def test_running_never_exceeds_the_cap_nor_releases_twice(
    client: redis.Redis, cap: int, tenant_cap: int, ops: list[tuple[str, Any]]
) -> None:
    """A global cap and a per-tenant default under random acquires, releases, expiries and
    renewals, against a model of which holders are live: admissions, running counts and the
    replies of release and extend agree with it at every step."""
    with scratch_limiter(client) as lim:
        lim.set_concurrency("global", cap)
        lim.set_concurrency("tenant:*", tenant_cap)
        taken: list[tuple[str, Decision]] = []
        live: set[int] = set()  # indexes into taken
        for op, arg in ops:
            if op == "acquire":
                tenant_live = sum(1 for i in live if taken[i][0] == arg)
                decision = lim.acquire(arg, hold=3600)
                assert decision.allowed is (len(live) < cap and tenant_live < tenant_cap)
                if decision.allowed:
                    taken.append((arg, decision))
                    live.add(len(taken) - 1)
            elif taken:
                i = arg % len(taken)
                decision = taken[i][1]
                if op == "release":
                    assert lim.release(decision) is (i in live)
                    live.discard(i)
                elif op == "extend":
                    assert lim.extend_slot(decision, 3600) is (i in live)
                elif i in live:  # expire
                    assert decision.slot is not None
                    expire(lim, decision.slot)
                    live.discard(i)
            assert lim.running("global") == len(live) <= cap
            for tenant in ("acme", "bigco"):
                count = sum(1 for i in live if taken[i][0] == tenant)
                assert lim.running(f"tenant:{tenant}") == count <= tenant_cap


# -- many processes ----------------------------------------------------------------------

PROCESSES = 6
CAP = 2
RUNS = 60
RUN_STEPS = 5


def worker(url: str, namespace: str, counter: str, ready: Any, start: Any, results: Any) -> None:
    """Run RUNS jobs under the cap: acquire, count the job as running in a shared counter
    (INCR), note the most seen running at once while it "runs", stop counting it (DECR),
    release."""
    lim = Limiter.from_url(url, namespace=namespace)
    lim.peek("acme")
    ready.put(1)
    start.wait(60)
    most = done = denied = 0
    while done < RUNS:
        decision = lim.acquire("acme", hold=60)
        if not decision.allowed:
            denied += 1
            continue
        running = int(lim.client.incr(counter))
        for _ in range(RUN_STEPS):  # the job "runs" for a few round trips, watching others
            running = max(running, int(lim.client.get(counter) or 0))
        most = max(most, running)
        lim.client.decr(counter)
        assert lim.release(decision)
        done += 1
    results.put((most, done, denied))
    lim.close()


@pytest.mark.slow
def test_processes_never_run_more_than_the_cap_at_once(limiter: Limiter, redis_url: str) -> None:
    limiter.set_concurrency("tenant:acme", CAP)
    counter = f"{limiter.keys.base}:test-running"
    ctx = multiprocessing.get_context("spawn")
    ready, start, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=worker, args=(redis_url, limiter.namespace, counter, ready, start, results)
        )
        for _ in range(PROCESSES)
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:  # every worker at the line before any starts, so they overlap
            ready.get(timeout=120)
        start.set()
        reports = [results.get(timeout=120) for _ in procs]
    finally:
        for proc in procs:
            proc.join(timeout=30)
    assert [done for _, done, _ in reports] == [RUNS] * PROCESSES
    assert max(most for most, _, _ in reports) <= CAP
    assert limiter.running("tenant:acme") == 0, "every slot released"
    assert int(limiter.client.get(counter) or 0) == 0
