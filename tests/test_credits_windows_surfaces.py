"""Burst credits and several windows per scope (#13) as every surface shows and takes
them: get_limit, the static config, the CLI, the admin API, the metrics and ``top``."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from click.testing import CliRunner
from conftest import drop_namespace
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from test_cli import NO_ENV, ok

from queue_ratelimit import ConfigError, CostExceedsBurst, InvalidLimit, Limit, Limiter, ScopeLimit
from queue_ratelimit._config import config_from_env, parse_config
from queue_ratelimit._counters import flush_counters
from queue_ratelimit._decision import parse_reply
from queue_ratelimit.admin import create_app
from queue_ratelimit.cli import main
from queue_ratelimit.metrics import RateLimitCollector, bucket_state, snapshot
from queue_ratelimit.tui import build_view

TOKEN = "t" * 32
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DAY = 86400.0


@pytest.fixture
def cli(redis_url: str, namespace: str, redis_client: redis.Redis) -> Iterator[CliRunner]:
    env = {**NO_ENV, "REDIS_URL": redis_url, "QUEUE_RATELIMIT_NAMESPACE": namespace}
    yield CliRunner(env={**env, "QUEUE_RATELIMIT_CONFIG": None})
    drop_namespace(redis_client, namespace)


def test_get_limit_returns_what_was_set(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", ["100/s", Limit(10000, per=DAY, credit=500)])
    got = limiter.get_limit("tenant:acme")
    assert got.windows == (Limit(100), Limit(10000, per=DAY, credit=500))
    assert got.limit == Limit(100)
    assert limiter.limits() == {"tenant:acme": got}
    # A single window reads as it always did.
    limiter.set_limit("global", Limit(5, credit=20))
    assert limiter.get_limit("global") == ScopeLimit("global", Limit(5, credit=20))
    assert repr(Limit(5)) == "Limit(rate=5.0, per=1.0, burst=5.0)"
    assert str(Limit(5, credit=20)) == "5/1s burst 5 credit 20"


def test_a_single_window_without_credit_is_stored_as_before(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", "100/s")
    assert limiter.client.hget(limiter.keys.config, "tenant:acme") == b"100.0 1.0 100.0 -"
    limiter.acquire("acme")
    flush_counters(limiter)  # (the library keeps counts in memory until a reader asks)
    fields = set(limiter.client.hgetall(limiter.keys.tenant("acme")))
    assert fields == {b"b", b"b:u", b"x", b"n:a"}


@pytest.mark.parametrize(
    ("credit", "fragment"),
    [
        (-1, "credit must be a finite number from 0"),
        (float("nan"), "credit must be a finite number from 0"),
        (float("inf"), "credit must be a finite number from 0"),
        (1e13, "credit must be a finite number from 0"),
        (10**400, "credit must be a finite number from 0"),
        ("5", "credit must be a number"),
        (True, "credit must be a number"),
    ],
)
def test_bad_credit_is_a_clear_error(credit: object, fragment: str) -> None:
    with pytest.raises(InvalidLimit, match=fragment):
        Limit(10, credit=credit)  # type: ignore[arg-type]
    with pytest.raises(InvalidLimit, match=fragment):
        Limit.parse("10/s", credit=credit)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("windows", "fragment"),
    [
        ([], "needs at least one window"),
        (["1/s", "1/s"], "gives the window 1/s twice"),
        (["60/m", "60/60s"], "gives the window 60/m twice"),
        (["1/s", "1/m", "1/h", "1/d", "1/2d"], "at most 4 are allowed"),
        # A megabyte of windows is refused for its length before any is parsed.
        (["1/s"] * 4 + ["not a limit"] * 250_000, "has 250004 windows; at most 4"),
    ],
    ids=["none", "twice", "twice-spelt-apart", "five", "a-megabyte"],
)
def test_bad_window_lists_are_clear_errors(
    limiter: Limiter, windows: list[str], fragment: str
) -> None:
    with pytest.raises(InvalidLimit, match=fragment):
        limiter.set_limit("tenant:acme", windows)
    with pytest.raises(InvalidLimit, match=fragment):
        parse_config({"limits": {"tenant:acme": windows}})
    assert limiter.limits() == {}


def test_a_cost_above_a_windows_burst_names_that_burst(limiter: Limiter) -> None:
    limiter.set_limit("tenant:acme", ["5/h", "2/d"])
    with pytest.raises(CostExceedsBurst) as info:
        limiter.acquire("acme", cost=3)
    assert (info.value.scope, info.value.burst) == ("tenant:acme", 2)
    limiter.set_limit("tenant:beta", Limit(1, burst=2, credit=3))
    with pytest.raises(CostExceedsBurst) as info:
        limiter.acquire("beta", cost=5.5)
    assert info.value.burst == 5, "burst and credit: what the bucket can ever hold"


def test_corrupt_windows_in_redis_are_refused_by_the_script(limiter: Limiter) -> None:
    """A value no version of this package writes (five windows, a bad credit): the decision
    fails with the scope named, and writes nothing."""
    from queue_ratelimit import BackendError

    five = ";".join(f"1.0 {p}.0 1.0 -" for p in (1, 2, 3, 4, 5))
    for value in (five, "1.0 1.0 1.0 -c-5", "1.0 1.0 1.0 -cnan", "1.0 1.0 1.0 -;x"):
        limiter.client.hset(limiter.keys.config, "tenant:acme", value)
        limiter.client.hset(limiter.keys.shared, "_rev", value)  # a new revision
        with pytest.raises(BackendError, match=r"corrupt (limit|credit) for tenant:acme"):
            limiter.acquire("acme")
    assert not limiter.client.exists(limiter.keys.tenant("acme"))


def test_replies_with_credit_and_windows_parse() -> None:
    d = parse_reply("1 0 - tenant:acme 59:50 tenant:acme(10000/d) 9999 |")
    assert dict(d.remaining) == {"tenant:acme": 59, "tenant:acme (10000/d)": 9999}
    assert dict(d.credit) == {"tenant:acme": 50}
    assert d.window is None
    d = parse_reply("0 120 tenant:acme(10000/d) tenant:acme 5 tenant:acme(10000/d) 0 |")
    assert (d.denied_by, d.window, d.wait_ms) == ("tenant:acme", "10000/d", 120)
    d = parse_reply("0 5 tenant:acme tenant:acme 0:0 | global")
    assert (d.denied_by, d.window, dict(d.credit), d.would_deny) == (
        "tenant:acme",
        None,
        {"tenant:acme": 0},
        ("global",),
    )
    d = parse_reply("1 0 - tenant:acme 5 |")
    assert (dict(d.credit), d.window) == ({}, None)


def test_static_config_takes_credit_and_windows(limiter: Limiter) -> None:
    spec = parse_config(
        {
            "limits": {
                "tenant:*": {"rate": "10/s", "burst": 10, "credit": 50},
                "tenant:acme": ["100/s", "10000/d"],
                "tenant:beta": {"rate": ["5/s", {"rate": "100/h", "credit": 10}], "shadow": True},
            }
        }
    )
    assert spec.limits["tenant:*"] == (Limit(10, burst=10, credit=50), False)
    assert spec.limits["tenant:acme"] == ((Limit(100), Limit(10000, per=DAY)), False)
    assert spec.limits["tenant:beta"] == ((Limit(5), Limit(100, per=3600, credit=10)), True)
    limiter.apply_config(spec)
    assert limiter.get_limit("tenant:beta").windows == (Limit(5), Limit(100, per=3600, credit=10))
    assert limiter.get_limit("tenant:beta").shadow
    env = config_from_env({"QUEUE_RATELIMIT_LIMITS": "tenant:acme=100/s,10000/d;global=5/s"})
    assert env is not None
    assert env.limits["tenant:acme"] == ((Limit(100), Limit(10000, per=DAY)), False)
    with pytest.raises(InvalidLimit, match="without burst and credit, a list of windows"):
        parse_config({"limits": {"global": {"rate": ["1/s", "1/d"], "burst": 3}}})


@pytest.mark.parametrize(
    ("text", "error", "fragment"),
    [
        # (The last one silently won.)
        ("tenant:acme=1/s;global=5/s;tenant:acme=100/s", ConfigError, "'tenant:acme' twice"),
        (" global = 1/s ; global=2/s", ConfigError, "'global' twice"),
        ("tenant:acme=" + ",".join(["nope"] * 250_000), InvalidLimit, "has 250000 windows"),
    ],
    ids=["scope-twice", "spaced-scope-twice", "a-megabyte-of-windows"],
)
def test_the_environment_form_refuses_what_it_would_have_dropped_or_parsed_at_length(
    text: str, error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error, match=fragment):
        config_from_env({"QUEUE_RATELIMIT_LIMITS": text})


def test_cli_sets_windows_and_credit_and_shows_them(cli: CliRunner, limiter: Limiter) -> None:
    out = ok(cli, "limits", "set", "tenant:acme", "100/s", "10000/d")
    assert out.startswith("tenant:acme: 100/s burst 100 + 10000/d burst 10000 (enforce)")
    assert limiter.get_limit("tenant:acme").windows == (Limit(100), Limit(10000, per=DAY))
    ok(cli, "limits", "set", "tenant:*", "10/s", "--burst", "10", "--credit", "50")
    assert limiter.get_limit("tenant:*").limit == Limit(10, burst=10, credit=50)
    got = ok(cli, "limits", "get", "tenant:acme")
    assert got.strip() == "tenant:acme  100/s  burst 100  +  10000/d  burst 10000  enforce"
    assert "burst 10 (+50 credit)" in ok(cli, "limits", "get", "tenant:*")
    listed = ok(cli, "limits", "list")
    assert "100/s + 10000/d" in listed
    assert "10 (+50 credit)" in listed
    payload = json.loads(ok(cli, "limits", "list", "--json"))["limits"]
    assert payload["tenant:*"]["credit"] == 50
    assert [w["limit"] for w in payload["tenant:acme"]["windows"]] == ["100/s", "10000/d"]
    bad = cli.invoke(main, ["limits", "set", "tenant:acme", "1/s", "2/s", "3/s", "4/s", "5/s"])
    assert bad.exit_code == 1
    assert "at most 4 are allowed" in bad.output
    bad = cli.invoke(main, ["limits", "set", "tenant:acme", "1/s", "--credit", "-1"])
    assert bad.exit_code == 1
    assert "credit must be a finite number" in bad.output


def test_admin_api_takes_windows_and_credit(limiter: Limiter) -> None:
    with TestClient(create_app(limiter, token=TOKEN)) as api:
        put = api.put("/limits/tenant:acme", json={"limit": ["100/s", "10000/d"]}, headers=AUTH)
        assert put.status_code == 200, put.text
        got = api.get("/limits/tenant:acme", headers=AUTH).json()
        assert got["limit"] == "100/s"
        assert [w["limit"] for w in got["windows"]] == ["100/s", "10000/d"]
        assert "credit" not in got
        body = {"limit": "10/s", "burst": 10, "credit": 50}
        assert api.put("/limits/tenant:*", json=body, headers=AUTH).status_code == 200
        got = api.get("/limits/tenant:*", headers=AUTH).json()
        assert (got["burst"], got["credit"]) == (10, 50)
        assert "windows" not in got
        # burst and credit are the first window's; a window given twice counts once.
        body = {"limit": ["1/s", "100/d", "1/seconds"], "credit": 5}
        assert api.put("/limits/global", json=body, headers=AUTH).status_code == 200
        assert limiter.get_limit("global").windows == (Limit(1, credit=5), Limit(100, per=DAY))
        for bad in ({"limit": []}, {"limit": ["1/s"] * 5}, {"limit": "1/s", "credit": -1}):
            answer = api.put("/limits/global", json=bad, headers=AUTH)
            assert answer.status_code == 400, (bad, answer.text)
            assert answer.json()["error"] == "ValidationError"


def test_metrics_show_every_window_and_the_bank(limiter: Limiter) -> None:
    # (Slow refills: a loaded machine's delays change nothing here.)
    limiter.set_limit("tenant:acme", ["10/h", "100/d"])
    limiter.set_limit("global", Limit(1, per=3600, burst=2, credit=8))
    for _ in range(5):
        assert limiter.acquire("acme").allowed
    snap = snapshot(limiter)
    buckets = snap["buckets"]
    assert buckets["tenant:acme"]["tokens"] == pytest.approx(5, abs=0.1)
    assert buckets["tenant:acme (100/d)"]["tokens"] == pytest.approx(95, abs=0.01)
    assert buckets["tenant:acme (100/d)"]["limit"] == "tenant:acme"
    assert buckets["global"]["tokens"] == pytest.approx(0, abs=0.01)
    assert buckets["global"]["credit"] == pytest.approx(5, abs=0.01)
    assert buckets["global"]["credit_cap"] == 8
    assert snap["limits"]["tenant:acme"]["windows"] == ["10/h", "100/d"]
    assert snap["limits"]["global"]["credit"] == 8
    assert bucket_state(limiter, "global")["credit"] == pytest.approx(5, abs=0.01)
    registry = CollectorRegistry()
    registry.register(RateLimitCollector(limiter))
    samples = {
        (s.name, s.labels.get("scope")): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }
    assert samples[("queue_ratelimit_bucket_credit_tokens", "global")] == pytest.approx(5, abs=0.01)
    assert ("queue_ratelimit_bucket_credit_tokens", "tenant:acme") not in samples
    assert samples[("queue_ratelimit_bucket_tokens", "tenant:acme (100/d)")] == pytest.approx(
        95, abs=0.01
    )
    view = build_view(snap, None)
    rows = {row[0]: row for row in view.budgets}
    assert rows["global"][1] == "1/h (2+8)"
    assert rows["global"][2] == "0.0+5"
    assert rows["  (100/d)"][2] == "95.0"
