"""Pauses and priority scopes where operators look: ``limits list`` and ``limits pause`` /
``resume`` (CLI), the admin API, the metrics and ``top``."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from test_admin import AUTH, TOKEN
from test_cli import cli, failed, ok  # noqa: F401 (cli: a fixture)

from queue_ratelimit import Limiter
from queue_ratelimit.admin import create_app
from queue_ratelimit.cli import main
from queue_ratelimit.metrics import RateLimitCollector, snapshot
from queue_ratelimit.tui import build_view


def test_cli_pauses_resumes_and_lists(cli: CliRunner, limiter: Limiter) -> None:  # noqa: F811
    ok(cli, "limits", "set", "priority:low", "20/s")
    out = ok(cli, "limits", "pause", "tenant:acme", "30")
    assert out.startswith("tenant:acme: paused until ")
    assert limiter.acquire("acme").paused

    listed = ok(cli, "limits", "list")
    assert "priority:low" in listed
    assert "paused (nothing admitted until then):" in listed
    assert "tenant:acme" in listed.split("paused")[1]
    doc = json.loads(ok(cli, "limits", "list", "--json"))
    assert doc["limits"]["priority:low"]["limit"] == "20/s"
    assert set(doc["pauses"]) == {"tenant:acme"}
    assert 0 < doc["pauses"]["tenant:acme"]["remaining_s"] <= 30

    assert ok(cli, "limits", "resume", "tenant:acme").strip() == "tenant:acme: resumed"
    assert ok(cli, "limits", "resume", "tenant:acme").strip() == "tenant:acme: was not paused"
    assert "paused" not in ok(cli, "limits", "list")
    ops = [(e.op, e.field) for e in limiter.audit_log()]
    assert ("pause", "pause:tenant:acme") in ops
    assert ("resume", "pause:tenant:acme") in ops


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["tenant:*", "30"], "is a default"),
        (["nothing", "30"], "unknown scope"),
        (["global", "-1"], "pause (seconds)"),
        (["global", "nan"], "pause (seconds)"),
        (["global", "1e9"], "pause (seconds)"),
    ],
)
def test_cli_refuses_bad_pauses_cleanly(cli: CliRunner, args: list[str], says: str) -> None:  # noqa: F811
    assert says in failed(cli.invoke(main, ["limits", "pause", *args]))


def test_admin_api_pauses(limiter: Limiter) -> None:
    with TestClient(create_app(limiter, token=TOKEN)) as api:
        made = api.put("/pauses/queue:emails", json={"seconds": 60}, headers=AUTH)
        assert made.status_code == 200, made.text
        assert made.json()["scope"] == "queue:emails"
        assert 0 < made.json()["remaining_s"] <= 60
        listed = api.get("/pauses", headers=AUTH).json()
        assert [p["scope"] for p in listed] == ["queue:emails"]
        assert limiter.acquire("acme", queue="emails").paused
        for bad in ({"seconds": 0}, {"seconds": -5}, {"seconds": "30"}, {"seconds": 1e9}):
            assert api.put("/pauses/global", json=bad, headers=AUTH).status_code == 400
        assert api.put("/pauses/tenant:*", json={"seconds": 5}, headers=AUTH).status_code in (
            400,
            404,
            422,
        )
        assert api.delete("/pauses/queue:emails", headers=AUTH).json() == {"resumed": True}
        assert api.delete("/pauses/queue:emails", headers=AUTH).status_code == 404
        assert api.get("/pauses", headers=AUTH).json() == []
        # Priority scopes take limits, not concurrency caps.
        assert api.put("/limits/priority:low", json={"limit": "5/s"}, headers=AUTH).is_success
        assert api.put("/concurrency/priority:low", json={"jobs": 3}, headers=AUTH).status_code in (
            400,
            404,
            422,
        )


def test_metrics_snapshot_and_top_show_pauses_and_priority_buckets(limiter: Limiter) -> None:
    limiter.set_limit("priority:low", "10/s")
    limiter.acquire("acme", priority="low")
    limiter.pause("tenant:acme", 120)
    assert limiter.acquire("acme").paused

    snap = snapshot(limiter)
    assert set(snap["pauses"]) == {"tenant:acme"}
    assert 0 < snap["pauses"]["tenant:acme"]["remaining_s"] <= 120
    assert snap["buckets"]["priority:low"]["tokens"] == pytest.approx(9, abs=0.5)
    # Denied by a pause: counted under the pause, one name for every tenant's.
    assert snap["denied_by"] == {"pause:tenant:*": 1}

    registry = CollectorRegistry()
    registry.register(RateLimitCollector(limiter))
    text = generate_latest(registry).decode()
    assert 'queue_ratelimit_pause_remaining_seconds{namespace="' in text
    assert 'scope="tenant:acme"' in text
    assert (
        f'queue_ratelimit_bucket_tokens{{namespace="{limiter.namespace}",scope="priority:low"}}'
        in text
    )

    budgets = build_view(snap, None).budgets
    assert budgets[0][:2] == ("tenant:acme", "PAUSED")
    assert any(row[0] == "priority:low" for row in budgets)
