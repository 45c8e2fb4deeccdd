"""Concurrency caps in the CLI, the admin API, the metrics and ``top``, on a real Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
from click.testing import CliRunner
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from queue_ratelimit import Limiter
from queue_ratelimit.admin import create_app
from queue_ratelimit.cli import main
from queue_ratelimit.metrics import RateLimitCollector, snapshot
from queue_ratelimit.tui import build_view

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NO_ENV = {"REDIS_URL": None, "QUEUE_RATELIMIT_URL": None, "QUEUE_RATELIMIT_NAMESPACE": None}


@pytest.fixture
def cli(redis_url: str, namespace: str, redis_client: redis.Redis) -> CliRunner:
    return CliRunner(env={**NO_ENV, "REDIS_URL": redis_url, "QUEUE_RATELIMIT_NAMESPACE": namespace})


@pytest.fixture
def api(limiter: Limiter) -> Iterator[TestClient]:
    with TestClient(create_app(limiter, token=TOKEN)) as client:
        yield client


def ok(runner: CliRunner, *args: str) -> str:
    result = runner.invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


# -- CLI ---------------------------------------------------------------------------------


def test_cli_sets_lists_and_removes_caps(cli: CliRunner, limiter: Limiter) -> None:
    out = ok(cli, "limits", "concurrency", "tenant:*", "4")
    assert out.strip() == "tenant:*: at most 4 running at once; config version 1"
    ok(cli, "limits", "concurrency", "queue:reports", "2")
    assert limiter.concurrency() == {"queue:reports": 2, "tenant:*": 4}
    limiter.acquire("acme", "reports")
    listed = ok(cli, "limits", "list")
    assert "concurrency caps (jobs at once):" in listed
    lines = {line.split()[0]: line.split()[1:] for line in listed.splitlines() if line.strip()}
    assert lines["queue:reports"] == ["2", "1"]
    assert lines["tenant:*"] == ["4", "per", "tenant"]
    payload = json.loads(ok(cli, "limits", "list", "--json"))
    assert payload["concurrency"] == {
        "queue:reports": {"cap": 2, "running": 1},
        "tenant:*": {"cap": 4, "running": None},
    }
    out = ok(cli, "limits", "concurrency", "tenant:*", "none")
    assert out.strip() == "tenant:*: no concurrency cap; config version 3"
    assert limiter.concurrency() == {"queue:reports": 2}
    assert limiter.audit_log(1)[0].actor.startswith("cli")


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["tenant:*", "0"], 1, "between 1 and 1,000,000"),
        (["tenant:*", "10000000"], 1, "between 1 and 1,000,000"),
        (["tenant:*", "2.5"], 1, "whole number of jobs or 'none'"),
        (["tenant:*", "lots"], 1, "whole number of jobs or 'none'"),
        (["tenants:*", "2"], 1, "unknown scope 'tenants:*'"),
        (["tenant:nobody", "none"], 1, "no concurrency cap is set for scope 'tenant:nobody'"),
    ],
)
def test_cli_refuses_bad_caps_cleanly(
    cli: CliRunner, args: list[str], code: int, message: str
) -> None:
    result = cli.invoke(main, ["limits", "concurrency", *args])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert message in result.output


# -- admin API ---------------------------------------------------------------------------


def test_admin_caps_routes(api: TestClient, limiter: Limiter) -> None:
    reply = api.put("/concurrency/tenant:*", json={"jobs": 3}, headers={**AUTH, "X-Actor": "sre"})
    assert reply.status_code == 200
    assert reply.json() == {"version": 1}
    actor = limiter.audit_log(1)[0].actor
    assert actor.startswith("admin[")  # the admin token's fingerprint
    assert actor.endswith("]:sre")
    limiter.acquire("acme")
    assert api.put("/concurrency/tenant:acme", json={"jobs": 1}, headers=AUTH).status_code == 200
    assert api.get("/concurrency", headers=AUTH).json() == [
        {"scope": "tenant:*", "cap": 3, "running": None},
        {"scope": "tenant:acme", "cap": 1, "running": 1},
    ]
    assert api.get("/concurrency/tenant:acme", headers=AUTH).json() == {
        "scope": "tenant:acme",
        "cap": 1,
        "running": 1,
    }
    assert not limiter.acquire("acme").allowed, "the new cap applies to the next decision"
    assert api.delete("/concurrency/tenant:acme", headers=AUTH).json() == {"version": 3}
    missing = api.get("/concurrency/tenant:acme", headers=AUTH)
    assert missing.status_code == 404
    assert "no concurrency cap is set for scope 'tenant:acme" in missing.json()["detail"]
    assert api.delete("/concurrency/tenant:acme", headers=AUTH).status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "status", "detail"),
    [
        # Bad input is 400 however it is bad (#12: a range error was 400, a type error 422).
        ("/concurrency/tenant:*", {"jobs": 0}, 400, "jobs: Input should be greater than or"),
        ("/concurrency/tenant:*", {"jobs": 10**9}, 400, "less than or equal to 1000000"),
        ("/concurrency/tenant:*", {"jobs": 2.5}, 400, "jobs"),
        ("/concurrency/tenant:*", {"jobs": "4"}, 400, "jobs"),
        ("/concurrency/tenant:*", {"jobs": True}, 400, "jobs"),
        ("/concurrency/tenant:*", {}, 400, "jobs"),
        ("/concurrency/tenant:*", {"jobs": 2, "extra": 1}, 400, "extra"),
        ("/concurrency/planet:mars", {"jobs": 2}, 400, "unknown scope"),
    ],
)
def test_admin_refuses_bad_caps(
    api: TestClient, limiter: Limiter, path: str, body: object, status: int, detail: str
) -> None:
    reply = api.put(path, json=body, headers=AUTH)
    assert reply.status_code == status, reply.text
    assert detail in reply.text
    assert limiter.concurrency() == {}


def test_admin_caps_want_the_token(api: TestClient) -> None:
    for method in ("GET", "PUT", "DELETE"):
        for path in ("/concurrency", "/concurrency/global"):
            if method != "GET" and path == "/concurrency":
                continue
            reply = api.request(method, path, json={"jobs": 1})
            assert reply.status_code == 401, (method, path)


# -- metrics and top ---------------------------------------------------------------------


def test_snapshot_metrics_and_top_show_running_and_cap(limiter: Limiter) -> None:
    limiter.set_concurrency("global", 10)
    limiter.set_concurrency("tenant:*", 2)
    limiter.set_concurrency("tenant:acme", 3)  # a tenant of its own: listed by name
    held = [limiter.acquire("acme") for _ in range(2)]
    assert all(d.allowed for d in held)
    snap = snapshot(limiter)
    assert snap["concurrency"] == {
        "global": {"cap": 10, "running": 2, "limit": "global"},
        "tenant:acme": {"cap": 3, "running": 2, "limit": "tenant:acme"},
    }
    registry = CollectorRegistry()
    registry.register(RateLimitCollector(limiter))
    text = generate_latest(registry).decode()
    ns = limiter.namespace
    assert f'queue_ratelimit_concurrency_running{{namespace="{ns}",scope="global"}} 2.0' in text
    assert f'queue_ratelimit_concurrency_cap{{namespace="{ns}",scope="tenant:acme"}} 3.0' in text
    view = build_view(snap, None)
    rows = {row[0]: row for row in view.budgets}
    assert rows["tenant:acme running"][1:3] == ("cap 3", "2/3")
    assert rows["global running"][3].endswith(" 80%"), "the bar shows the free share"
    assert rows["tenant:* running"][1] == "cap 2"  # the default, no tenant of its own shown
    limiter.release(held[0])
    assert snapshot(limiter)["concurrency"]["tenant:acme"]["running"] == 1


def test_snapshot_without_caps_has_none(limiter: Limiter) -> None:
    limiter.set_limit("global", "10/s")
    assert snapshot(limiter)["concurrency"] == {}
