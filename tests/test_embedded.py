"""Parity: the same decision table runs on a real Redis server and on the embedded engine."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from queue_ratelimit import ConfigError, CostExceedsBurst, Limit, Limiter, RateLimitError
from queue_ratelimit._embedded import (
    describe_engine,
    embedded_client,
    limiter_from_env,
    url_from_env,
)

# Rates of a few tokens per hour refill about 0.001 token per second, so a case that runs in
# well under a second sees the exact token counts below, give or take TOKENS.
TOKENS = 0.02
WAIT_REL = 2e-3

# Each case: steps run in order. A decision step names its mode ("acquire", "peek",
# "refund") with the tenant, optional "queue" / "cost" / "priority", and what it must return.
CASES: list[dict[str, Any]] = [
    {
        "id": "default-tenant-bucket",
        "steps": [
            {"set": "tenant:*", "limit": "3/h"},
            {"acquire": "acme", "allowed": True, "remaining": {"tenant:acme": 2}},
            {"acquire": "acme", "allowed": True, "remaining": {"tenant:acme": 1}},
            {"acquire": "acme", "allowed": True, "remaining": {"tenant:acme": 0}},
            {
                "acquire": "acme",
                "allowed": False,
                "denied_by": "tenant:acme",
                "wait_ms": 1_200_000,
                "remaining": {"tenant:acme": 0},
            },
            # Every tenant has a bucket of its own: acme's flood leaves beta's full.
            {"acquire": "beta", "allowed": True, "remaining": {"tenant:beta": 2}},
        ],
    },
    {
        "id": "own-limit-overrides-default",
        "steps": [
            {"set": "tenant:*", "limit": "1/h"},
            {"set": "tenant:acme", "limit": "5/h"},
            {"acquire": "acme", "allowed": True, "remaining": {"tenant:acme": 4}},
            {"acquire": "beta", "allowed": True, "remaining": {"tenant:beta": 0}},
            {
                "acquire": "beta",
                "allowed": False,
                "denied_by": "tenant:beta",
                "wait_ms": 3_600_000,
                "remaining": {"tenant:beta": 0},
            },
        ],
    },
    {
        "id": "all-or-nothing-global",
        "steps": [
            {"set": "global", "limit": "2/h"},
            {"set": "tenant:*", "limit": "10/h"},
            {"acquire": "acme", "allowed": True, "remaining": {"tenant:acme": 9, "global": 1}},
            {"acquire": "beta", "allowed": True, "remaining": {"tenant:beta": 9, "global": 0}},
            # Denied by global: acme's own bucket keeps its 9 tokens.
            {
                "acquire": "acme",
                "priority": "high",
                "allowed": False,
                "denied_by": "global",
                "wait_ms": 1_800_000,
                "remaining": {"tenant:acme": 9, "global": 0},
            },
            {
                "peek": "acme",
                "allowed": False,
                "denied_by": "global",
                "wait_ms": 1_800_000,
                "remaining": {"tenant:acme": 9, "global": 0},
            },
        ],
    },
    {
        "id": "cost-and-burst",
        "steps": [
            {"set": "tenant:*", "limit": "10/h"},
            {"acquire": "acme", "cost": 4, "allowed": True, "remaining": {"tenant:acme": 6}},
            {
                "acquire": "acme",
                "cost": 7,
                "allowed": False,
                "denied_by": "tenant:acme",
                "wait_ms": 360_000,
                "remaining": {"tenant:acme": 6},
            },
            {"acquire": "acme", "cost": 6, "allowed": True, "remaining": {"tenant:acme": 0}},
            {"acquire": "acme", "cost": 11, "raises": CostExceedsBurst},
            {"peek": "acme", "cost": 11, "raises": CostExceedsBurst},
            {
                "acquire": "acme",
                "cost": 10,
                "allowed": False,
                "denied_by": "tenant:acme",
                "wait_ms": 3_600_000,
                "remaining": {"tenant:acme": 0},
            },
        ],
    },
    {
        "id": "fractional-cost-burst-one",
        "steps": [
            {"set": "tenant:*", "limit": "1/h"},
            {"acquire": "acme", "cost": 0.5, "allowed": True, "remaining": {"tenant:acme": 0.5}},
            {"acquire": "acme", "cost": 0.5, "allowed": True, "remaining": {"tenant:acme": 0}},
            {
                "acquire": "acme",
                "cost": 0.5,
                "allowed": False,
                "denied_by": "tenant:acme",
                "wait_ms": 1_800_000,
                "remaining": {"tenant:acme": 0},
            },
        ],
    },
    {
        "id": "peek-and-refund",
        "steps": [
            {"set": "tenant:*", "limit": "5/h"},
            {"peek": "acme", "cost": 2, "allowed": True, "remaining": {"tenant:acme": 5}},
            {"acquire": "acme", "cost": 3, "allowed": True, "remaining": {"tenant:acme": 2}},
            {"peek": "acme", "cost": 2, "allowed": True, "remaining": {"tenant:acme": 2}},
            {"refund": "acme", "cost": 2, "allowed": True, "remaining": {"tenant:acme": 4}},
            {"refund": "acme", "cost": 5, "allowed": True, "remaining": {"tenant:acme": 5}},
        ],
    },
    {
        "id": "tenant-queue",
        "steps": [
            {"set": "tenant:acme", "limit": "5/h"},
            {"set": "tenant:acme:queue:emails", "limit": "2/h"},
            {
                "acquire": "acme",
                "queue": "emails",
                "allowed": True,
                "remaining": {"tenant:acme:queue:emails": 1, "tenant:acme": 4},
            },
            {
                "acquire": "acme",
                "queue": "emails",
                "allowed": True,
                "remaining": {"tenant:acme:queue:emails": 0, "tenant:acme": 3},
            },
            {
                "acquire": "acme",
                "queue": "emails",
                "allowed": False,
                "denied_by": "tenant:acme:queue:emails",
                "wait_ms": 1_800_000,
                "remaining": {"tenant:acme:queue:emails": 0, "tenant:acme": 3},
            },
            {
                "acquire": "acme",
                "queue": "reports",
                "allowed": True,
                "remaining": {"tenant:acme": 2},
            },
            # No limit applies to beta at all.
            {"acquire": "beta", "queue": "emails", "allowed": True, "remaining": {}},
        ],
    },
    {
        "id": "default-tenant-queue",
        "steps": [
            {"set": "tenant:*:queue:emails", "limit": "1/h"},
            {
                "acquire": "acme",
                "queue": "emails",
                "allowed": True,
                "remaining": {"tenant:acme:queue:emails": 0},
            },
            {
                "acquire": "beta",
                "queue": "emails",
                "allowed": True,
                "remaining": {"tenant:beta:queue:emails": 0},
            },
            {
                "acquire": "acme",
                "queue": "emails",
                "allowed": False,
                "denied_by": "tenant:acme:queue:emails",
                "wait_ms": 3_600_000,
                "remaining": {"tenant:acme:queue:emails": 0},
            },
        ],
    },
    {
        "id": "queue-scope-is-shared",
        "steps": [
            {"set": "queue:emails", "limit": "2/h"},
            {
                "acquire": "acme",
                "queue": "emails",
                "allowed": True,
                "remaining": {"queue:emails": 1},
            },
            {
                "acquire": "beta",
                "queue": "emails",
                "priority": "low",
                "allowed": True,
                "remaining": {"queue:emails": 0},
            },
            {
                "acquire": "gamma",
                "queue": "emails",
                "allowed": False,
                "denied_by": "queue:emails",
                "wait_ms": 1_800_000,
                "remaining": {"queue:emails": 0},
            },
        ],
    },
    {
        "id": "shadow-scope",
        "steps": [
            {"set": "tenant:*", "limit": "1/h", "shadow": True},
            {"acquire": "acme", "allowed": True, "remaining": {"tenant:acme": 0}},
            # Would deny, is allowed; the shadow bucket spends only what it could grant.
            {
                "acquire": "acme",
                "allowed": True,
                "would_deny": ("tenant:acme",),
                "remaining": {"tenant:acme": 0},
            },
            {
                "peek": "acme",
                "allowed": True,
                "would_deny": ("tenant:acme",),
                "remaining": {"tenant:acme": 0},
            },
        ],
    },
    {
        "id": "namespace-dry-run",
        "steps": [
            {"set": "global", "limit": "1/h"},
            {"dry_run": True},
            {"acquire": "acme", "allowed": True, "remaining": {"global": 0}},
            {
                "acquire": "beta",
                "allowed": True,
                "would_deny": ("global",),
                "remaining": {"global": 0},
            },
            {"dry_run": False},
            {
                "acquire": "gamma",
                "allowed": False,
                "denied_by": "global",
                "wait_ms": 3_600_000,
                "remaining": {"global": 0},
            },
        ],
    },
    {
        "id": "exempt-tenants",
        "steps": [
            {"set": "global", "limit": "3/h"},
            {"set": "tenant:*", "limit": "1/h"},
            {"exempt": "vip", "mode": "tenant"},
            {"acquire": "vip", "allowed": True, "remaining": {"global": 2}},
            {"acquire": "vip", "allowed": True, "remaining": {"global": 1}},
            {"acquire": "acme", "allowed": True, "remaining": {"tenant:acme": 0, "global": 0}},
            {
                "acquire": "vip",
                "allowed": False,
                "denied_by": "global",
                "wait_ms": 1_200_000,
                "remaining": {"global": 0},
            },
            {"exempt": "boss", "mode": "all"},
            {"acquire": "boss", "allowed": True, "remaining": {}},
            {"exempt": "vip", "mode": None},
            {
                "acquire": "vip",
                "allowed": False,
                "denied_by": "global",
                "wait_ms": 1_200_000,
                "remaining": {"tenant:vip": 1, "global": 0},
            },
        ],
    },
    {
        "id": "limit-lowered-then-raised",
        "steps": [
            {"set": "tenant:*", "limit": "10/h"},
            {"acquire": "acme", "allowed": True, "remaining": {"tenant:acme": 9}},
            {"set": "tenant:*", "limit": "5/h"},
            {"acquire": "acme", "allowed": True, "remaining": {"tenant:acme": 4}},
            # A raised limit grants no windfall: the bucket refills at the new rate.
            {"set": "tenant:*", "limit": "20/h"},
            {"acquire": "acme", "allowed": True, "remaining": {"tenant:acme": 3}},
        ],
    },
    {
        "id": "delete-and-set-again",
        "steps": [
            {"set": "tenant:acme", "limit": "2/h"},
            {"acquire": "acme", "allowed": True, "remaining": {"tenant:acme": 1}},
            {"acquire": "acme", "allowed": True, "remaining": {"tenant:acme": 0}},
            {"delete": "tenant:acme"},
            {"acquire": "acme", "allowed": True, "remaining": {}},
            # Deleting a limit keeps its bucket: setting it again hands out no fresh burst.
            {"set": "tenant:acme", "limit": "2/h", "burst": 3},
            {
                "acquire": "acme",
                "allowed": False,
                "denied_by": "tenant:acme",
                "wait_ms": 1_800_000,
                "remaining": {"tenant:acme": 0},
            },
        ],
    },
]
MODES = ("acquire", "peek", "refund")


def run_case(limiter: Limiter, case: dict[str, Any]) -> list[dict[str, Any]]:
    """Run a case's steps; returns what each decision step produced, in order."""
    outcomes: list[dict[str, Any]] = []
    for step in case["steps"]:
        if "set" in step:
            limit = Limit.parse(step["limit"], burst=step.get("burst"))
            limiter.set_limit(step["set"], limit, shadow=step.get("shadow", False))
        elif "delete" in step:
            limiter.delete_limit(step["delete"])
        elif "exempt" in step:
            limiter.set_exempt(step["exempt"], step["mode"])
        elif "dry_run" in step:
            limiter.set_shadow(step["dry_run"])
        else:
            mode = next(m for m in MODES if m in step)
            call = getattr(limiter, mode)
            args = {"queue": step.get("queue"), "priority": step.get("priority")}
            try:
                d = call(step[mode], cost=step.get("cost", 1), **args)
            except RateLimitError as exc:
                outcomes.append({"raises": type(exc)})
                continue
            outcomes.append(
                {
                    "allowed": d.allowed,
                    "denied_by": d.denied_by,
                    "wait_ms": d.wait_ms,
                    "remaining": dict(d.remaining),
                    "would_deny": d.would_deny,
                }
            )
    return outcomes


def expected(case: dict[str, Any]) -> list[dict[str, Any]]:
    """The outcome each decision step of a case promises, with the defaults filled in."""
    out = []
    for step in case["steps"]:
        if not any(m in step for m in MODES):
            continue
        if "raises" in step:
            out.append({"raises": step["raises"]})
            continue
        out.append(
            {
                "allowed": step["allowed"],
                "denied_by": step.get("denied_by"),
                "wait_ms": step.get("wait_ms", 0.0),
                "remaining": step["remaining"],
                "would_deny": step.get("would_deny", ()),
            }
        )
    return out


def assert_same(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    """Outcomes equal, token counts within TOKENS and waits within WAIT_REL."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if "raises" in w or "raises" in g:
            assert g == w, f"step {i}"
            continue
        assert (g["allowed"], g["denied_by"], g["would_deny"]) == (
            w["allowed"],
            w["denied_by"],
            w["would_deny"],
        ), f"step {i}"
        assert list(g["remaining"]) == list(w["remaining"]), f"step {i}: scopes or their order"
        for scope, tokens in w["remaining"].items():
            assert g["remaining"][scope] == pytest.approx(tokens, abs=TOKENS), f"step {i}"
        assert g["wait_ms"] == pytest.approx(w["wait_ms"], rel=WAIT_REL, abs=1), f"step {i}"


@pytest.fixture
def embedded(namespace: str) -> Iterator[Limiter]:
    with Limiter(embedded_client(), namespace=namespace) as lim:
        yield lim


@pytest.fixture(params=["redis", "embedded"])
def engine(request: pytest.FixtureRequest) -> Limiter:
    """The limiter of each engine in turn, each in a fresh namespace."""
    lim: Limiter = request.getfixturevalue("limiter" if request.param == "redis" else "embedded")
    return lim


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_decision_table(engine: Limiter, case: dict[str, Any]) -> None:
    assert_same(run_case(engine, case), expected(case))


def _state(lim: Limiter) -> dict[str, Any]:
    """Everything the scripts wrote, minus what depends on the moment it ran."""
    client = lim.client
    state: dict[str, Any] = {}
    for raw_key in sorted(client.scan_iter(match=f"{lim.keys.base}:*")):
        key = raw_key.decode()
        if key == lim.keys.audit:
            entries = client.xrange(key)
            state[key] = [
                {k.decode(): v.decode() for k, v in f.items() if k != b"at_ms"} for _, f in entries
            ]
            continue
        fields = {k.decode(): v.decode() for k, v in client.hgetall(key).items()}
        # Times differ between the runs: bucket clocks (<field>:u), the tenant hash's expiry
        # (x) and the config revision stamp (_rev) are left out; tokens and waits rounded.
        for name, value in list(fields.items()):
            if name in ("x", "_rev") or name.endswith(":u"):
                del fields[name]
            elif name == "b" or name.startswith(("bq:", "b:")):
                fields[name] = round(float(value), 1)
            elif name == "h:us":
                fields[name] = round(float(value), -7)  # waits of an hour or so, in us
        state[key] = {"fields": fields, "expires": client.pttl(key) > 0}
    return state


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_engines_agree(limiter: Limiter, embedded: Limiter, case: dict[str, Any]) -> None:
    """Same replies, and the same counters, buckets, expiries and audit trail in the store."""
    assert_same(run_case(embedded, case), run_case(limiter, case))
    assert _state(embedded) == _state(limiter)


def test_embedded_clients_do_not_share_state() -> None:
    first = Limiter(embedded_client(), namespace="same")
    second = Limiter(embedded_client(), namespace="same")
    first.set_limit("tenant:*", "1/h")
    assert first.acquire("acme").allowed
    assert not first.acquire("acme").allowed
    assert second.limits() == {}


def test_embedded_engine_recovers_from_script_flush(embedded: Limiter) -> None:
    embedded.set_limit("tenant:*", "2/h")
    embedded.acquire("acme")
    embedded.client.script_flush()
    assert embedded.acquire("acme").remaining == {"tenant:acme": pytest.approx(0, abs=TOKENS)}


def test_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lupa", None)
    with pytest.raises(ImportError, match=r"install queue-ratelimit\[embedded\]"):
        embedded_client()


def test_embedded_engine_refuses_a_lua_redis_does_not_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKEREDIS_LUA_VERSION", "5.4")
    with pytest.raises(ConfigError, match=r"Lua 5\.1"):
        embedded_client()


def test_limiter_from_env_picks_the_engine(redis_url: str, redis_client: redis.Redis) -> None:
    namespace = f"t{uuid.uuid4().hex[:12]}"
    with limiter_from_env(namespace, environ={}) as lim:
        assert describe_engine(lim).startswith("embedded")
    with limiter_from_env(namespace, environ={"REDIS_URL": redis_url}) as lim:
        assert describe_engine(lim).startswith("Redis at ")
        lim.set_limit("global", "5/s")
        assert redis_client.hget(lim.keys.config, "global") is not None
        redis_client.delete(lim.keys.config, lim.keys.audit)
    # The package's own variable wins over the generic one; empty values count as unset.
    env = {"QUEUE_RATELIMIT_URL": "redis://a:1/0", "REDIS_URL": "redis://b:2/0"}
    assert url_from_env(env) == "redis://a:1/0"
    assert url_from_env({"QUEUE_RATELIMIT_URL": "", "REDIS_URL": "redis://b:2/0"}) == (
        "redis://b:2/0"
    )
    assert url_from_env({}) is None


def test_describe_engine_never_shows_a_password() -> None:
    lim = Limiter.from_url("redis://user:s3cret@db.example:6390/2")
    assert describe_engine(lim) == "Redis at db.example:6390 db 2"
    lim.close()
