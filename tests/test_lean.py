"""The lean path of ``acquire`` (lua/buckets.lua, "The lean path") against the general one.

The lean path decides the admissions of plans that have plain buckets only, in the Functions
library; the ``EVALSHA`` form has no plan cached between calls and always takes the general
path. So the same calls, run on a ``FCALL`` limiter and on an ``EVALSHA`` one (namespaces of
their own on one server), compare the two paths: replies, and everything stored (buckets,
counters, expiries). ``lean.lua`` says which path a plan takes, so every test also checks
that the ``FCALL`` side really ran the lean path (or, for plans it must refuse, did not).

Buckets here refill about a token an hour (rates are primes per hour, bursts at most 3, costs
multiples of 0.5, so no two buckets' waits are ever close: which one denied cannot depend on
the microseconds between the two runs); tokens are compared to within TOKENS.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from bucket_state import stored_text, write_bucket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_decisions import Backend, drop, open_backend, store_state

from queue_ratelimit import CostExceedsBurst, Limit, Limiter, RateLimitError
from queue_ratelimit._scripts import SCRIPTS, script_source

HOUR = 3600.0
TOKENS = 1e-3
LUA = Path(__file__).resolve().parent.parent / "lua"
# Scopes a lean plan may have, each with a rate of its own (tokens an hour, distinct primes).
RATES = {
    "tenant:*": 7,
    "tenant:acme": 11,
    "tenant:*:queue:q": 13,
    "queue:q": 17,
    "global": 19,
    "queue:r": 23,
}


@pytest.fixture
def pair(redis_url: str) -> Iterator[tuple[Backend, Backend]]:
    """A Functions limiter (lean path) and an EVALSHA one (general path)."""
    lean = open_backend("functions", redis_url, f"l{uuid.uuid4().hex[:12]}")
    general = open_backend("evalsha", redis_url, f"g{uuid.uuid4().hex[:12]}")
    yield lean, general
    drop(lean)
    drop(general)


def path_of(backend: Backend, tenant: str, queue: str | None = None) -> str:
    """Which path decides the tenant's admissions: "lean", "general" or "none"."""
    keys = backend.keys
    reply = backend.raw("lean.lua", [keys.tenant(tenant), keys.shared], [queue or ""])
    return str(reply.decode() if isinstance(reply, bytes) else reply)


def outcome(backend: Backend, step: tuple[Any, ...]) -> dict[str, Any] | None:
    """Run one step; what a decision returned (or the error it raised)."""
    kind = step[0]
    if kind == "set":
        backend.call("set_limit", step[1], Limit(step[2], per=HOUR, burst=step[3]))
        return None
    if kind == "forget":  # the tenant hash gone (expired, deleted by an operator)
        # (Counts kept in memory first: a Functions library writes them up to a second
        # late, into the hash as it is then; the EVALSHA form wrote them already.)
        backend.flush()
        backend.client.delete(backend.keys.tenant(step[1]))
        return None
    if kind == "read":  # a reader of counters (metrics, top) in the middle of it all
        backend.flush()
        return None
    mode, tenant, queue, cost = step
    try:
        d = backend.call(mode, tenant, queue=queue, cost=cost)
    except RateLimitError as exc:
        return {"raises": type(exc)}
    return {
        "allowed": d.allowed,
        "denied_by": d.denied_by,
        "wait_ms": round(d.wait_ms, -3),
        "remaining": {s: round(v, 3) for s, v in d.remaining.items()},
        "would_deny": d.would_deny,
    }


def same_outcomes(got: list[Any], want: list[Any]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if g is None or "raises" in g or "raises" in w:
            assert g == w, f"step {i}"
            continue
        assert (g["allowed"], g["denied_by"], g["would_deny"]) == (
            w["allowed"],
            w["denied_by"],
            w["would_deny"],
        ), f"step {i}"
        assert list(g["remaining"]) == list(w["remaining"]), f"step {i}"
        for scope, value in w["remaining"].items():
            assert g["remaining"][scope] == pytest.approx(value, abs=TOKENS), f"step {i}"
        assert g["wait_ms"] == pytest.approx(w["wait_ms"], rel=1e-3, abs=1000), f"step {i}"


def same_state(lean: Backend, general: Backend) -> None:
    """Everything stored alike (buckets rounded: the runs were microseconds apart)."""

    def rounded(backend: Backend) -> dict[str, Any]:
        # (The total of waits, in us, differs by the microseconds between the runs.)
        state = store_state(backend)
        for entry in state.values():
            if isinstance(entry, dict) and "fields" in entry:
                entry["fields"].pop("h:us", None)
        return state

    assert rounded(lean) == rounded(general)


def run_both(pair: tuple[Backend, Backend], steps: list[tuple[Any, ...]]) -> None:
    """Each step on both, in turn; after each, the tenant hashes have an expiry (x, and a
    TTL) alike; at the end, the same outcomes and the same store."""
    lean, general = pair
    got, want = [], []
    for i, step in enumerate(steps):
        got.append(outcome(lean, step))
        want.append(outcome(general, step))
        for tenant in ("acme", "beta"):
            keys = [b.keys.tenant(tenant) for b in pair]
            has_x = [b.client.hexists(k, "x") for b, k in zip(pair, keys, strict=True)]
            expires = [b.client.pttl(k) > 0 for b, k in zip(pair, keys, strict=True)]
            assert has_x[0] == has_x[1], f"step {i}: {tenant}"
            assert expires[0] == expires[1], f"step {i}: {tenant}"
    same_outcomes(got, want)
    same_state(lean, general)


# -- every shape of plan the lean path knows -------------------------------------------

SHAPES = {
    # (tenant buckets, shared buckets): the scopes configured, and the queue decided on
    (0, 0): (["queue:r"], None),  # (a limit elsewhere: a configured namespace)
    (1, 0): (["tenant:*"], None),
    (0, 1): (["global"], None),
    (2, 0): (["tenant:*", "tenant:*:queue:q"], "q"),
    (1, 1): (["tenant:acme", "global"], None),
    (0, 2): (["queue:q", "global"], "q"),
    (2, 1): (["tenant:*", "tenant:*:queue:q", "global"], "q"),
    (1, 2): (["tenant:*", "queue:q", "global"], "q"),
    (2, 2): (["tenant:*", "tenant:*:queue:q", "queue:q", "global"], "q"),
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=[f"{t}t{s}s" for t, s in SHAPES])
def test_every_shape_decides_as_the_general_path(
    pair: tuple[Backend, Backend], shape: tuple[int, int]
) -> None:
    scopes, queue = SHAPES[shape]
    steps: list[tuple[Any, ...]] = [("set", s, RATES[s], 3) for s in scopes]
    # Admissions until one bucket is empty, denials, a refund, fractional and larger costs,
    # a cost above every burst, a reader in the middle, a forgotten tenant hash.
    steps += [("acquire", "acme", queue, 1)] * 2
    steps += [("acquire", "acme", queue, 0.5), ("read",), ("acquire", "acme", queue, 0.5)]
    steps += [("acquire", "acme", queue, 1), ("acquire", "acme", queue, 2)]
    steps += [("refund", "acme", queue, 1), ("acquire", "acme", queue, 1)]
    steps += [("acquire", "acme", queue, 4), ("forget", "acme"), ("acquire", "acme", queue, 1)]
    steps += [("acquire", "beta", queue, 2), ("acquire", "beta", queue, 1)]
    run_both(pair, steps)
    lean, general = pair
    assert path_of(lean, "acme", queue) == "lean"
    assert path_of(general, "acme", queue) == "none"


def test_a_cost_above_a_burst_is_refused_as_by_the_general_path(
    pair: tuple[Backend, Backend],
) -> None:
    for backend in pair:
        backend.call("set_limit", "tenant:*", Limit(7, per=HOUR, burst=3))
        backend.call("set_limit", "global", Limit(19, per=HOUR, burst=5))
        backend.call("acquire", "acme")
        backend.call("acquire", "acme")  # (the lean plan made)
        with pytest.raises(CostExceedsBurst):
            backend.call("acquire", "acme", cost=4)
    same_state(*pair)


# -- the expiry of the tenant hash ------------------------------------------------------


def test_the_expiry_is_kept_when_another_plan_moved_it_or_the_hash_went(
    pair: tuple[Backend, Backend],
) -> None:
    """Two queues of one tenant share its bucket (two plans); the hash is also deleted and
    comes back: the lean plan's idea of the expiry must never let the hash expire early or
    live without one."""
    steps: list[tuple[Any, ...]] = [
        ("set", "tenant:*", 7, 3),
        ("set", "tenant:*:queue:q", 13, 3),
        ("set", "queue:r", 23, 3),
    ]
    for queue in ("q", "r", "q"):
        # Admissions until the plan knows what it wrote, then the hash gone, then another
        # plan of the tenant (the other queue) writes the tenant's bucket.
        steps += [("acquire", "acme", queue, 0.5)] * 3
        steps += [("forget", "acme"), ("acquire", "acme", queue, 0.5)]
        steps += [("acquire", "acme", "r" if queue == "q" else "q", 0.5)]
        steps += [("acquire", "acme", queue, 0.5)]
    run_both(pair, steps)
    lean, general = pair
    for backend in pair:
        ttl = backend.client.pttl(backend.keys.tenant("acme"))
        assert ttl > 0, "the tenant hash must keep an expiry"
    x_lean = float(lean.client.hget(lean.keys.tenant("acme"), "x") or 0)
    x_general = float(general.client.hget(general.keys.tenant("acme"), "x") or 0)
    assert x_lean == pytest.approx(x_general, abs=5_000), "the same expiry, give or take"


def test_a_short_retention_moves_the_expiry_as_the_general_path(redis_url: str) -> None:
    """A retention of a second: each admission pushes the expiry by the time a token takes
    to come back, so every decision moves it (and the lean plan reads it)."""
    backends = []
    for name in ("functions", "evalsha"):
        client = redis.Redis.from_url(redis_url)
        lim = Limiter(client, namespace=f"x{uuid.uuid4().hex[:12]}", counter_retention=1)
        lim._scripts.transport = "fcall" if name == "functions" else "evalsha"
        backends.append(Backend(name, lim, client))
    try:
        for backend in backends:
            backend.call("set_limit", "tenant:*", Limit(7, per=HOUR, burst=10))
            for _ in range(6):
                assert backend.call("acquire", "acme").allowed
        same_state(backends[0], backends[1])
        assert path_of(backends[0], "acme") == "lean"
        x = [float(b.client.hget(b.keys.tenant("acme"), "x") or 0) for b in backends]
        assert x[0] == pytest.approx(x[1], abs=5_000)
        for backend in backends:
            ttl = backend.client.pttl(backend.keys.tenant("acme"))
            # 6 tokens at 7 an hour, plus the second of retention.
            assert 6 / 7 * HOUR * 1000 < ttl <= 6 / 7 * HOUR * 1000 + 1_000
    finally:
        for backend in backends:
            drop(backend)


# -- plans the lean path must refuse ----------------------------------------------------

REFUSED: dict[str, list[tuple[str, tuple[Any, ...]]]] = {
    "shadow limit": [("set_limit", ("tenant:*", Limit(7, per=HOUR, burst=3)))],
    "dry run": [("set_shadow", (True,))],
    "concurrency cap": [("set_concurrency", ("tenant:*", 5))],
    "recording": [("set_recording", (900,))],
    "burst credit": [("set_limit", ("tenant:*", Limit(7, per=HOUR, burst=3, credit=2)))],
    "two windows": [("set_limit", ("tenant:*", [Limit(7, per=HOUR), Limit(20, per=86400)]))],
}


@pytest.mark.parametrize("feature", list(REFUSED))
def test_plans_with_other_features_take_the_general_path(
    pair: tuple[Backend, Backend], feature: str
) -> None:
    for backend in pair:
        backend.call("set_limit", "global", Limit(19, per=HOUR, burst=3))
        for method, args in REFUSED[feature]:
            kwargs = {"shadow": True} if feature == "shadow limit" else {}
            backend.call(method, *args, **kwargs)
        for _ in range(3):
            backend.call("acquire", "acme")
    lean, general = pair
    assert path_of(lean, "acme") == "general"
    same_state(lean, general)


def test_an_exempt_tenant_is_lean_with_no_bucket(pair: tuple[Backend, Backend]) -> None:
    steps: list[tuple[Any, ...]] = [("set", "tenant:*", 7, 3), ("set", "global", 19, 3)]
    for backend in pair:
        backend.call("set_exempt", "acme", "all")
    steps += [("acquire", "acme", None, 1)] * 5
    run_both(pair, steps)
    assert path_of(pair[0], "acme") == "lean"


def test_a_configuration_change_binds_the_next_lean_decision(
    pair: tuple[Backend, Backend],
) -> None:
    steps: list[tuple[Any, ...]] = [("set", "tenant:*", 7, 3)]
    steps += [("acquire", "acme", None, 1)] * 2
    steps += [("set", "tenant:*", 7, 1), ("acquire", "acme", None, 1)]
    steps += [("set", "global", 19, 1), ("acquire", "beta", None, 1), ("acquire", "beta", None, 1)]
    run_both(pair, steps)


# -- tokens as stored (lua/buckets.lua, tokens_text): the lean path prints them inline ------

# (burst, stored text, cost): fractions of each grid (1e-9, 1e-6, 1e-3 tokens), products that
# round up to a step (test_token_texts.py), a cost near the bucket, whole numbers.
STORED_TEXTS = [
    (3, "2.7000000000000002", 1),
    (3, "1.0000000005", 1),
    (3, "0.9999999995", 1),
    (3, "2.5", 0.5),
    (1e7, "9000000.875", 0.5),
    (1e10, "8999999999.75", 0.5),
    (1e10, "9007199254.75", 0.5),
    (1e12, "999999999999.75", 0.5),
    (2e6, repr(1797086.3454948459 + 0.5), 0.5),
    (5e9, repr(4960769592.3751955 + 0.5), 0.5),
    (7e11, repr(688568549218.7369 + 0.5), 0.5),
]


@pytest.mark.parametrize(("burst", "text", "cost"), STORED_TEXTS)
def test_the_lean_path_stores_tokens_as_the_general_one(
    pair: tuple[Backend, Backend], burst: float, text: str, cost: float
) -> None:
    for backend in pair:
        backend.call("set_limit", "tenant:*", Limit(burst, per=HOUR, burst=burst))
        backend.call("acquire", "acme")  # (the plan cached: the next decision is lean)
        write_bucket(backend, "tenant:acme", text)  # frozen: no refill
        assert backend.call("acquire", "acme", cost=cost).allowed
    assert path_of(pair[0], "acme") == "lean"
    _, tokens_text = library_function("tokens_text")
    want, _ = tokens_text(float(text) - cost)
    assert [stored_text(backend, "tenant:acme") for backend in pair] == [want, want]


# -- the selection, read in the library's own Lua (lupa) --------------------------------


def library_function(name: str) -> Any:
    """A local function of buckets.lua, in Lua 5.1 (as Redis runs it)."""
    lua51 = pytest.importorskip("lupa.lua51")
    runtime = lua51.LuaRuntime()
    source = (LUA / "buckets.lua").read_text(encoding="utf-8")
    return runtime, runtime.execute(f"{source}\nreturn {name}")


PLAN = """
local b = {scope = 'tenant:acme', name = 'tenant:acme', src = 'tenant:*', in_tenant = true,
           field = 'b', clock = 'b:u', at = 1, rate = 1e-6, burst = 3, shadow = false,
           per = 3600, limit_rate = 3}
return {tenant = 'acme', denials = 'dt', credit = false, buckets = {b}, tf = {'b', 'b:u', 'x'},
        sf = {'_rev'}, x_at = 3, rev_at = 1, refill_ms = 3600000, aq = 'a:q:-', ap = false,
        record = false, caps = false}
"""


@pytest.mark.parametrize(
    ("change", "lean"),
    [
        ("", True),
        ("plan.pauses = {{scope = 'global', untl = 1}}", False),  # a feature it does not know
        ("plan.pauses = false", True),  # (one that is off)
        ("plan.buckets[1].window = '3/h'", False),
        ("plan.buckets[1].scope = 'priority:high'; plan.buckets[1].name = 'priority:high'", False),
        ("plan.buckets[1].shadow = true", False),
        ("plan.tf = {'b', 'b:u', 'x', 'y'}; plan.x_at = 4", False),
        ("plan.caps = {{}}", False),
    ],
)
def test_the_lean_path_refuses_what_it_does_not_know(change: str, lean: bool) -> None:
    runtime, lean_known = library_function("lean_known")
    plan = runtime.execute(PLAN)
    runtime.execute(f"local plan = ...; {change}", plan)
    assert bool(lean_known(plan)) is lean


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_generated_source_compiles_for_every_shape(shape: tuple[int, int]) -> None:
    runtime, lean_source = library_function("lean_source")
    source = lean_source(*shape)
    compiled, error = runtime.execute("local f, e = loadstring(...) return f ~= nil, e", source)
    assert compiled, error
    for marker in ("{{", "<<", ">>", "$", "@"):
        assert marker not in source


# -- random sequences, both paths -------------------------------------------------------

scopes = st.sampled_from(sorted(RATES))
limits = st.tuples(st.just("set"), scopes, st.integers(1, 3)).map(
    lambda s: ("set", s[1], RATES[s[1]], s[2])
)
decisions = st.tuples(
    st.sampled_from(["acquire", "acquire", "acquire", "peek", "refund"]),
    st.sampled_from(["acme", "beta"]),
    st.sampled_from([None, "q", "r"]),
    st.sampled_from([0.5, 1, 1, 1.5, 2]),
)
others = st.sampled_from([("read",), ("forget", "acme")])
sequences = st.tuples(
    st.lists(limits, min_size=1, max_size=4),
    st.lists(st.one_of(decisions, decisions, decisions, limits, others), max_size=30),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sequence=sequences)
def test_random_sequences_decide_and_store_alike(
    redis_url: str, sequence: tuple[list[Any], list[Any]]
) -> None:
    setup, steps = sequence
    lean = open_backend("functions", redis_url, f"l{uuid.uuid4().hex[:12]}")
    general = open_backend("evalsha", redis_url, f"g{uuid.uuid4().hex[:12]}")
    try:
        run_both((lean, general), setup + steps)
    finally:
        drop(lean)
        drop(general)


def test_the_wait_histogram_field_is_the_first_bound_not_exceeded() -> None:
    _, wait_bucket = library_function("wait_bucket")
    bounds = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]
    waits = [0, 0.5, 60001, 1e12, *bounds, *(b + 1e-9 for b in bounds), *(b - 1e-9 for b in bounds)]
    for wait in waits:
        want = next((f"h:{b}" for b in bounds if wait <= b), "h:inf")
        assert wait_bucket(wait) == want, wait


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_script_compiles_in_its_evalsha_form(redis_url: str, name: str) -> None:
    """A Lua function may hold at most 200 locals: the library's and a script's together
    passed that once the lean path was added, and only the EVALSHA form (one chunk) failed."""
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.script_load(script_source(name))
    finally:
        client.close()
