"""The admin HTTP API, against a real Redis server (and once as a real `serve` process)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from conftest import NO_RETRY, free_port, wait_until
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from queue_ratelimit import ConfigError, Limit, Limiter
from queue_ratelimit._limit import LIMIT_PATTERN, MAX_WINDOWS
from queue_ratelimit._scopes import (
    CONCRETE_SCOPE_PATTERN,
    NAME_PATTERN,
    PRIORITY_PATTERN,
    SCOPE_PATTERN,
    check_name,
    check_priority,
    scope_name,
)
from queue_ratelimit.admin import MAX_BODY_BYTES, create_app, fingerprint

TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
READ_TOKEN = "test-read-token"
READ = {"Authorization": f"Bearer {READ_TOKEN}"}
HOUR = 3600.0


@pytest.fixture
def api(limiter: Limiter) -> Iterator[TestClient]:
    with TestClient(create_app(limiter, token=TOKEN)) as client:
        yield client


def test_every_route_but_health_wants_the_token(api: TestClient) -> None:
    assert api.get("/healthz").json()["status"] == "ok"
    for method, path in [
        ("GET", "/limits"),
        ("PUT", "/limits/global"),
        ("DELETE", "/limits/global"),
        ("GET", "/scopes/global"),
        ("GET", "/audit"),
        ("GET", "/metrics"),
        ("PUT", "/shadow"),
        ("PUT", "/weights/tenant/acme"),
        ("POST", "/preview/tenant:*"),
        ("GET", "/recording"),
        ("PUT", "/recording"),
        ("DELETE", "/recording"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = api.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.json()["error"] == "Unauthorized"
            assert response.headers["WWW-Authenticate"] == "Bearer"


def test_an_app_without_a_token_is_refused_unless_asked_for(limiter: Limiter) -> None:
    with pytest.raises(ValueError, match="needs a token"):
        create_app(limiter, token=None)
    with TestClient(create_app(limiter, token=None, allow_anonymous=True)) as open_api:
        assert open_api.get("/limits").status_code == 200


def test_a_limit_set_through_the_api_applies_to_the_next_decision(
    api: TestClient, limiter: Limiter
) -> None:
    assert limiter.acquire("acme").remaining == {}
    reply = api.put("/limits/tenant:*", json={"limit": "2/h"}, headers=AUTH)
    assert reply.status_code == 200
    assert reply.json() == {"version": 1}
    assert [limiter.acquire("acme").allowed for _ in range(3)] == [True, True, False]
    listed = api.get("/limits", headers=AUTH).json()
    assert listed == [
        {
            "scope": "tenant:*",
            "limit": "2/h",
            "rate": 2.0,
            "per": HOUR,
            "burst": 2.0,
            "rate_per_second": 2 / HOUR,
            "shadow": False,
        }
    ]
    reply = api.put(
        "/limits/tenant:*", json={"limit": "2/h", "burst": 5, "shadow": True}, headers=AUTH
    )
    assert reply.json() == {"version": 2}
    decision = limiter.acquire("acme")
    assert decision.allowed  # shadow: counted, never denied
    assert decision.would_deny == ("tenant:acme",)
    assert api.get("/limits/tenant:*", headers=AUTH).json()["shadow"] is True
    assert api.delete("/limits/tenant:*", headers=AUTH).json() == {"version": 3}
    assert limiter.limits() == {}


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error", "fragment"),
    [
        ("PUT", "/limits/tenant:a b", {"limit": "1/s"}, 400, "InvalidName", "invalid tenant"),
        ("PUT", "/limits/planet:mars", {"limit": "1/s"}, 400, "InvalidScope", "unknown scope"),
        ("PUT", "/limits/global", {"limit": "-1/s"}, 400, "InvalidLimit", "cannot parse"),
        ("PUT", "/limits/global", {"limit": "1/s", "burst": 0}, 400, "ValidationError", "burst"),
        ("GET", "/limits/global", None, 404, "LimitNotFound", "no limit is set"),
        ("DELETE", "/limits/queue:q", None, 404, "LimitNotFound", "no limit is set"),
        ("GET", "/scopes/tenant:acme", None, 404, "LimitNotFound", "no limit"),
        ("GET", "/scopes/tenant:*", None, 400, "InvalidScope", "is a default"),
        ("PUT", "/exemptions/acme", {"mode": "everything"}, 400, "ValidationError", "mode"),
        ("PUT", "/weights/tenant/acme", {"weight": 0}, 400, "ValidationError", "weight"),
        ("PUT", "/weights/tenant/x", {"weight": 1e-320}, 400, "ValidationError", "0.001"),
        ("PUT", "/weights/priority/p", {"weight": 1e7}, 400, "ValidationError", "1000000"),
        ("PUT", "/weights/priority/P", {"weight": 1}, 400, "InvalidName", "invalid priority"),
        ("PUT", "/weights/planet/mars", {"weight": 1}, 404, None, "Not Found"),
        ("DELETE", "/weights/tenant/acme", None, 404, "LimitNotFound", "no weight"),
        (
            "PUT",
            "/limits/global",
            {"limit": "1/s", "colour": "red"},
            400,
            "ValidationError",
            "colour",
        ),
        ("GET", "/audit?count=0", None, 400, "ValidationError", "count"),
        # #12: the same kind of mistake got 400 or 422 depending on the value.
        ("PUT", "/weights/tenant/acme", {"weight": -5}, 400, "ValidationError", "weight"),
        ("PUT", "/weights/tenant/acme", {"weight": 1e300}, 400, "ValidationError", "weight"),
        ("PUT", "/weights/tenant/acme", {"weight": "x"}, 400, "ValidationError", "weight"),
        ("PUT", "/recording", {"seconds": -5}, 400, "ValidationError", "seconds"),
        ("PUT", "/recording", {"seconds": 30}, 400, "ValidationError", "seconds"),
        ("POST", "/preview/global", {"limit": "1/s", "window": -5}, 400, None, "window"),
        ("PUT", "/concurrency/global", {"jobs": 0}, 400, "ValidationError", "jobs"),
        ("PUT", "/concurrency/global", {"jobs": 1.5}, 400, "ValidationError", "jobs"),
        # #12: deletes of what is not set are all 404 (an exemption's was 200).
        ("DELETE", "/exemptions/nobody", None, 404, "LimitNotFound", "is not exempt"),
        ("DELETE", "/concurrency/queue:q", None, 404, "LimitNotFound", "no concurrency cap"),
        ("DELETE", "/recording", None, 404, "LimitNotFound", "not being recorded"),
        ("DELETE", "/weights/priority/bulk", None, 404, "LimitNotFound", "no weight"),
    ],
)
def test_bad_requests_get_a_clear_error(
    api: TestClient,
    method: str,
    path: str,
    body: object,
    status: int,
    error: str | None,
    fragment: str,
) -> None:
    response = api.request(method, path, json=body, headers=AUTH)
    assert response.status_code == status, response.text
    if error is not None:
        assert response.json() == {"error": error, "detail": response.json()["detail"]}
    assert fragment in response.text


def test_exemptions_shadow_and_weights(api: TestClient, limiter: Limiter) -> None:
    limiter.set_limit("tenant:*", Limit(1, per=HOUR))
    assert api.put("/exemptions/vip", json={"mode": "tenant"}, headers=AUTH).status_code == 200
    assert api.get("/exemptions", headers=AUTH).json() == {"vip": "tenant"}
    assert all(limiter.acquire("vip").allowed for _ in range(3))
    assert api.delete("/exemptions/vip", headers=AUTH).status_code == 200
    assert api.get("/exemptions", headers=AUTH).json() == {}

    assert api.put("/shadow", json={"enabled": True}, headers=AUTH).status_code == 200
    assert all(limiter.acquire("acme").allowed for _ in range(3))
    assert api.put("/shadow", json={"enabled": False}, headers=AUTH).status_code == 200
    assert not limiter.acquire("acme").allowed

    assert api.put("/weights/tenant/bigco", json={"weight": 5}, headers=AUTH).status_code == 200
    assert api.put("/weights/priority/urgent", json={"weight": 9}, headers=AUTH).status_code == 200
    assert api.get("/weights", headers=AUTH).json() == {
        "weight:priority:urgent": 9.0,
        "weight:tenant:bigco": 5.0,
    }
    assert api.delete("/weights/tenant/bigco", headers=AUTH).status_code == 200
    assert api.get("/weights", headers=AUTH).json() == {"weight:priority:urgent": 9.0}


def test_changes_are_audited_with_the_actor(api: TestClient) -> None:
    api.put("/limits/global", json={"limit": "100/s"}, headers={**AUTH, "X-Actor": "alice"})
    api.put("/limits/global", json={"limit": "50/s"}, headers=AUTH)
    entries = api.get("/audit?count=5", headers=AUTH).json()
    token = f"admin[{fingerprint(TOKEN)}]"  # which token acted, never the token itself
    assert [(e["version"], e["field"], e["actor"]) for e in entries] == [
        (2, "global", token),
        (1, "global", f"{token}:alice"),
    ]
    assert TOKEN not in str(entries)
    assert entries[0]["old"].startswith("100.0 ")
    bad = api.put("/limits/global", json={"limit": "1/s"}, headers={**AUTH, "X-Actor": "a b"})
    assert bad.status_code == 400
    assert bad.json()["error"] == "InvalidName"


def test_scope_state_shows_the_live_bucket(api: TestClient, limiter: Limiter) -> None:
    limiter.set_limit("tenant:*", Limit(4, per=HOUR))
    limiter.acquire("acme", cost=3)
    state = api.get("/scopes/tenant:acme", headers=AUTH).json()
    assert state["scope"] == "tenant:acme"
    assert state["limit_scope"] == "tenant:*"
    assert state["tokens"] == pytest.approx(1, abs=0.01)
    assert state["fill"] == pytest.approx(0.25, abs=0.01)
    assert state["wait_ms_for_one"] == 0
    assert state["updated_at_ms"] == pytest.approx(time.time() * 1000, abs=60_000)
    limiter.acquire("acme")
    after = api.get("/scopes/tenant:acme", headers=AUTH).json()
    assert after["tokens"] == pytest.approx(0, abs=0.01)
    assert after["wait_ms_for_one"] == pytest.approx(HOUR / 4 * 1000, rel=0.01)
    fresh = api.get("/scopes/tenant:nobody", headers=AUTH).json()  # no state yet: full
    assert (fresh["tokens"], fresh["updated_at_ms"]) == (4, None)


def test_metrics_and_snapshot(api: TestClient, limiter: Limiter) -> None:
    limiter.set_limit("tenant:*", Limit(1, per=HOUR))
    limiter.acquire("acme", queue="emails")
    limiter.acquire("acme", queue="emails")
    text = api.get("/metrics", headers=AUTH).text
    ns = limiter.namespace
    assert f'queue_ratelimit_decisions_total{{namespace="{ns}",outcome="allowed"}} 1.0' in text
    assert f'queue_ratelimit_decisions_total{{namespace="{ns}",outcome="denied"}} 1.0' in text
    snap = api.get("/snapshot", headers=AUTH).json()
    assert snap["totals"]["allowed"] == 1
    assert snap["allowed_by_queue"] == {"emails": 1}


def test_redis_unreachable_is_a_503(redis_url: str, namespace: str) -> None:
    # No retries: redis-py's default backoff would make each request wait seconds.
    dead = Limiter(redis.Redis(port=free_port(), retry=NO_RETRY), namespace=namespace)
    with TestClient(create_app(dead, token=TOKEN)) as api:
        for path in ("/healthz", "/limits", "/limits/global", "/audit", "/scopes/global"):
            response = api.get(path, headers=AUTH)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["error"] == "BackendUnavailable"


@contextmanager
def served(command: list[str], env: dict[str, str]) -> Iterator[str]:
    """`command` (a `queue-ratelimit ... serve`) running on a free port: its base URL."""
    port = free_port()
    proc = subprocess.Popen([*command, "--port", str(port)], env=env, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, timeout=30, what="the admin API to answer")
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_runs_the_api(redis_url: str, namespace: str, limiter: Limiter) -> None:
    """`queue-ratelimit serve` as a real process: refuses to start without a token, then
    serves with one."""
    # The installed console script, next to this interpreter.
    command = [str(Path(sys.executable).with_name("queue-ratelimit")), "--url", redis_url]
    command += ["--namespace", namespace, "serve"]
    env = {k: v for k, v in os.environ.items() if k != "QUEUE_RATELIMIT_ADMIN_TOKEN"}
    refused = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert refused.returncode == 2
    assert "QUEUE_RATELIMIT_ADMIN_TOKEN" in refused.stderr

    env["QUEUE_RATELIMIT_ADMIN_TOKEN"] = TOKEN
    env["QUEUE_RATELIMIT_READ_TOKEN"] = READ_TOKEN
    with served(command, env) as base:
        reply = httpx.put(f"{base}/limits/global", json={"limit": "7/s"}, headers=AUTH)
        assert reply.json() == {"version": 1}
        assert limiter.get_limit("global").limit == Limit(7)
        assert httpx.get(f"{base}/limits", timeout=5).status_code == 401
        assert httpx.get(f"{base}/metrics", headers=READ, timeout=5).status_code == 200
        forbidden = httpx.put(f"{base}/shadow", json={"enabled": True}, headers=READ, timeout=5)
        assert forbidden.status_code == 403
        # #12: a name with "/" is valid, and was unreachable (404), sent as %2F or as is.
        for scope in ("tenant:a%2Fb", "tenant:a/b"):
            got = httpx.get(f"{base}/limits/{scope}", headers=AUTH, timeout=5)
            assert got.status_code == 404, got.text
            assert got.json()["detail"] == "no limit is set for scope 'tenant:a/b'"
        put = httpx.put(f"{base}/limits/tenant:a%2Fb", json={"limit": "3/s"}, headers=AUTH)
        assert put.status_code == 200, put.text
        assert limiter.get_limit("tenant:a/b").limit == Limit(3)
        assert httpx.get(f"{base}/limits/tenant:a/b", headers=AUTH).json()["limit"] == "3/s"
        assert httpx.get(f"{base}/scopes/tenant:a%2Fb", headers=AUTH).json()["tokens"] == 3
        for path in ("/exemptions/a%2Fb", "/concurrency/tenant:a%2Fb:queue:x%2Fy"):
            body = {"mode": "all"} if "exempt" in path else {"jobs": 2}
            assert httpx.put(f"{base}{path}", json=body, headers=AUTH).status_code == 200, path
            assert httpx.delete(f"{base}{path}", headers=AUTH).status_code == 200, path
            assert httpx.delete(f"{base}{path}", headers=AUTH).status_code == 404, path
        weight = httpx.put(f"{base}/weights/tenant/a%2Fb", json={"weight": 2}, headers=AUTH)
        assert weight.status_code == 200, weight.text
        assert httpx.get(f"{base}/weights", headers=AUTH).json() == {"weight:tenant:a/b": 2.0}
        broken = httpx.put(f"{base}/limits/tenant:a%0Ab", json={"limit": "1/s"}, headers=AUTH)
        assert (broken.status_code, broken.json()["error"]) == (400, "InvalidName")


def test_a_preview_replays_recorded_traffic_and_changes_nothing(
    api: TestClient, limiter: Limiter
) -> None:
    limiter.set_limit("tenant:*", "1000/s")
    body = {"limit": "5/s", "burst": 5}
    refused = api.post("/preview/tenant:*", headers=AUTH, json=body)
    assert refused.status_code == 409  # a sound request the namespace's state refuses
    assert refused.json()["error"] == "Conflict"
    assert "not being recorded" in refused.json()["detail"]

    assert api.put("/recording", headers=AUTH, json={"seconds": 30}).status_code == 400
    assert api.put("/recording", headers=AUTH, json={"seconds": 600}).status_code == 200
    assert api.get("/recording", headers=AUTH).json() == {"seconds": 600.0}
    for _ in range(20):
        assert limiter.acquire("acme").allowed
    version = limiter.config_version()

    response = api.post("/preview/tenant:*?top=5", headers=AUTH, json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["limit"] == "5/s burst 5"
    assert result["current"] == "1000/s burst 1000"
    assert result["work"] == 20
    assert 10 <= result["delayed"] <= 15  # the 20 fell within one or two seconds
    assert [b["scope"] for b in result["buckets"]] == ["tenant:acme"]
    assert limiter.config_version() == version
    assert limiter.get_limit("tenant:*").limit == Limit(1000)

    banked = {"limit": ["5/s", "12/d"], "burst": 5, "credit": 15}
    windows = api.post("/preview/tenant:*", headers=AUTH, json=banked).json()
    assert windows["limit"] == "5/s burst 5 credit 15 + 12/d burst 12"
    assert windows["delayed"] == pytest.approx(8)  # 20 fit the second's bank, 12 the day

    long_window = api.post("/preview/tenant:*", headers=AUTH, json={**body, "window": 601})
    assert long_window.status_code == 409
    assert "recording keeps 600 s" in long_window.json()["detail"]
    assert api.post("/preview/nope", headers=AUTH, json=body).status_code == 400
    assert api.delete("/recording", headers=AUTH).status_code == 200
    assert api.get("/recording", headers=AUTH).json() == {"seconds": None}


@pytest.fixture
def api_with_reader(limiter: Limiter) -> Iterator[TestClient]:
    with TestClient(create_app(limiter, token=TOKEN, read_token=READ_TOKEN)) as client:
        yield client


def test_the_read_only_token_reads_and_changes_nothing(
    api_with_reader: TestClient, limiter: Limiter
) -> None:
    """#11 finding 10: a token for Prometheus and dashboards that cannot change limits."""
    api = api_with_reader
    limiter.set_limit("global", "100/s")
    reads = [
        "/limits",
        "/limits/global",
        "/metrics",
        "/snapshot",
        "/audit",
        "/weights",
        "/exemptions",
        "/concurrency",
        "/recording",
        "/scopes/global",
    ]
    for path in reads:
        assert api.get(path, headers=READ).status_code == 200, path
        assert api.get(path, headers=AUTH).status_code == 200, path
        assert api.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401, path
    writes = [
        ("PUT", "/limits/global", {"limit": "1/s"}),
        ("DELETE", "/limits/global", None),
        ("PUT", "/shadow", {"enabled": True}),
        ("PUT", "/weights/tenant/acme", {"weight": 5}),
        ("DELETE", "/weights/tenant/acme", None),
        ("PUT", "/exemptions/acme", {"mode": "all"}),
        ("PUT", "/concurrency/global", {"jobs": 1}),
        ("PUT", "/recording", {"seconds": 600}),
        ("DELETE", "/recording", None),
    ]
    for method, path, body in writes:
        refused = api.request(method, path, json=body, headers=READ)
        assert refused.status_code == 403, (method, path, refused.text)
        assert refused.json()["error"] == "Forbidden"
    assert limiter.config_version() == 1  # only the set_limit above
    assert api.put("/limits/global", json={"limit": "1/s"}, headers=AUTH).status_code == 200


def test_the_two_tokens_must_differ(limiter: Limiter) -> None:
    with pytest.raises(ValueError, match="must differ"):
        create_app(limiter, token=TOKEN, read_token=TOKEN)


def test_an_open_app_names_itself_in_the_audit_log(limiter: Limiter) -> None:
    with TestClient(create_app(limiter, token=None, allow_anonymous=True)) as api:
        api.put("/limits/global", json={"limit": "1/s"}, headers={"X-Actor": "bob"})
    assert limiter.audit_log()[0].actor == "admin[no-token]:bob"


def test_fingerprints_tell_tokens_apart_and_do_not_show_them() -> None:
    assert fingerprint(TOKEN) == fingerprint(TOKEN)
    assert fingerprint(TOKEN) != fingerprint(READ_TOKEN)
    assert len(fingerprint(TOKEN)) == 8
    assert fingerprint(TOKEN) not in TOKEN


@pytest.mark.parametrize(
    "content",
    [
        b'{"limit": "' + b"1" * (MAX_BODY_BYTES + 1) + b'/s"}',
        b'{"limit": "' + b"1" * 10_000_000 + b'/s"}',  # 10 MB once came back in a 10 MB error
    ],
)
def test_an_oversized_body_is_refused_before_it_is_read(api: TestClient, content: bytes) -> None:
    """#11 finding 6: a 40 KB body held the server for 11.7 s."""
    headers = {**AUTH, "Content-Type": "application/json"}
    response = api.put("/limits/global", content=content, headers=headers)
    assert response.status_code == 413, response.text[:200]
    assert response.json()["error"] == "ContentTooLarge"
    assert len(response.content) < 200
    chunked = api.put(
        "/limits/global", content=iter([content[:1000], content[1000:]]), headers=headers
    )
    assert chunked.status_code == 413, chunked.text[:200]
    assert len(chunked.content) < 200


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        # Under the body cap, and bait for the old pattern's backtracking.
        ({"limit": "1/" + " " * 6000 + "s" * 6000 + " !"}, 400, "InvalidLimit"),
        ({"limit": "1" * 15_000 + "/s"}, 400, "InvalidLimit"),
        # (A list is a scope's windows: each one is parsed, and refused as any limit.)
        ({"limit": ["x" * 15_000]}, 400, "InvalidLimit"),
        ({"limit": ["1/s"] * 50}, 400, "ValidationError"),  # FastAPI echoed the input
        ({"limit": "1/s", "x" * 15_000: 1}, 400, "ValidationError"),
        ({"limit": "1/s", "burst": "x" * 15_000}, 400, "ValidationError"),
    ],
)
def test_errors_quote_hostile_input_cut_short(
    api: TestClient, body: dict[str, object], status: int, error: str
) -> None:
    response = api.put("/limits/global", json=body, headers=AUTH)
    assert response.status_code == status, response.text[:300]
    assert response.json()["error"] == error
    assert len(response.content) < 1000, response.text[:300]
    for path in ("/limits/tenant:" + "a" * 5000, "/limits/" + "x" * 5000):
        long_path = api.put(path, json={"limit": "1/s"}, headers=AUTH)
        assert long_path.status_code == 400
        assert len(long_path.content) < 1000, long_path.text[:300]


def test_a_request_that_is_not_json_gets_a_short_error(api: TestClient) -> None:
    response = api.put(
        "/limits/global",
        content=b"{" + b"x" * 10_000,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"] == "ValidationError"
    assert len(response.content) < 1000


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield method.upper(), path, operation


def test_the_openapi_document_states_every_answer_and_constraint(api: TestClient) -> None:
    """#12: the document named neither the 400/401/404/503 answers nor any pattern or range."""
    schema = api.get("/openapi.json").json()
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
    for method, path, operation in _operations(schema):
        answers = operation["responses"]
        assert "422" not in answers, (method, path)  # bad input is 400, always
        assert {"401", "503"} <= set(answers) or path == "/healthz", (method, path)
        assert "503" in answers
        if method in ("PUT", "DELETE"):
            assert {"400", "403"} <= set(answers), (method, path)
        if method == "PUT":
            assert "413" in answers, (method, path)
        if method == "DELETE" or (method == "GET" and "{" in path):
            assert "404" in answers, (method, path)
        for status, answer in answers.items():
            if status[0] in "45":
                assert answer["content"] == error, (method, path, status)
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path":
                assert parameter["schema"]["pattern"].startswith("^"), (method, path)
    assert "/preview/{scope}" in schema["paths"]
    bodies = schema["components"]["schemas"]
    assert bodies["WeightIn"]["properties"]["weight"]["minimum"] == 0.001
    assert bodies["WeightIn"]["properties"]["weight"]["maximum"] == 1e6
    assert bodies["RecordingIn"]["properties"]["seconds"]["minimum"] == 60
    assert bodies["ConcurrencyIn"]["properties"]["jobs"]["type"] == "integer"
    one, several = bodies["SetLimitIn"]["properties"]["limit"]["anyOf"]
    assert one["pattern"] == several["items"]["pattern"] == LIMIT_PATTERN
    assert several["maxItems"] == MAX_WINDOWS
    assert bodies["SetLimitIn"]["additionalProperties"] is False
    one, several = bodies["PreviewIn"]["properties"]["limit"]["anyOf"]
    assert one["pattern"] == several["items"]["pattern"] == LIMIT_PATTERN
    assert "credit" in bodies["PreviewIn"]["properties"]


@settings(max_examples=300, deadline=None)
@given(st.from_regex(LIMIT_PATTERN, fullmatch=True))
def test_every_limit_the_pattern_admits_is_within_bounds(text: str) -> None:
    """The document's limit pattern promises a valid limit: a client that checks against it
    is never refused."""
    assert Limit.parse(text).rate_per_second > 0


@pytest.mark.parametrize(
    ("pattern", "check"),
    [
        (SCOPE_PATTERN, scope_name),
        (CONCRETE_SCOPE_PATTERN, lambda s: scope_name(s) if "*" not in s else 1 / 0),
        (f"^{NAME_PATTERN}$", lambda s: check_name("tenant", s)),
        (f"^{PRIORITY_PATTERN}$", check_priority),
    ],
)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_the_documented_name_patterns_are_the_checks(
    pattern: str, check: Callable[[str], object], data: st.DataObject
) -> None:
    """What the document's patterns admit is what the library accepts, and no more."""
    drawn = data.draw(st.from_regex(pattern, fullmatch=True) | st.text(max_size=300))
    try:
        check(drawn)
        accepted = True
    except (ConfigError, ZeroDivisionError):
        accepted = False
    assert accepted == (re.fullmatch(pattern, drawn) is not None), drawn


def test_docs_are_served_without_a_cdn(api: TestClient) -> None:
    """#12: /docs loaded Swagger UI from a CDN and was blank offline."""
    for page in ("/docs", "/redoc"):
        html = api.get(page).text
        assets = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert assets, page
        for asset in assets:
            assert asset.startswith("/"), (page, asset)  # this server, no other host
            assert api.get(asset).status_code == 200, asset
        assert "cdn" not in html.lower()


def test_a_method_a_path_does_not_take_gets_405_with_allow(api: TestClient) -> None:
    response = api.request("POST", "/limits/tenant:acme", headers=AUTH, json={})
    assert response.status_code == 405
    assert response.headers["Allow"] == "DELETE, GET, PUT"
    assert response.json()["error"] == "MethodNotAllowed"
    unknown = api.get("/nowhere", headers=AUTH)
    assert (unknown.status_code, unknown.json()["error"]) == (404, "NotFound")


def test_an_empty_actor_is_refused(api: TestClient) -> None:
    response = api.put("/shadow", json={"enabled": True}, headers={**AUTH, "X-Actor": ""})
    assert (response.status_code, response.json()["error"]) == (400, "InvalidName")


def test_bodies_are_not_coerced(api: TestClient) -> None:
    """A value of another JSON type than documented is refused, not converted."""
    for path, body in [
        ("/weights/tenant/a", {"weight": "5"}),
        ("/shadow", {"enabled": "true"}),
        ("/concurrency/global", {"jobs": "4"}),
        ("/limits/global", {"limit": "1/s", "shadow": 1}),
    ]:
        response = api.put(path, json=body, headers=AUTH)
        assert response.status_code == 400, (path, response.text)
    assert api.put("/concurrency/global", json={"jobs": 4.0}, headers=AUTH).status_code == 200


@pytest.mark.slow
def test_schemathesis_finds_nothing(redis_url: str, namespace: str, tmp_path: Path) -> None:
    """#12: schemathesis with every check found 46 failures. Run against a real `serve`,
    with a fixed seed (a failure is reproducible); for a longer hunt, see docs/deploy.md."""
    env = {**os.environ, "QUEUE_RATELIMIT_ADMIN_TOKEN": TOKEN}
    command = [str(Path(sys.executable).with_name("queue-ratelimit")), "--url", redis_url]
    command += ["--namespace", namespace, "serve"]
    with served(command, env) as base:
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "run",
                f"{base}/openapi.json",
                "--checks",
                "all",
                "--header",
                f"Authorization: Bearer {TOKEN}",
                "--max-examples",
                "15",
                "--seed",
                "12",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=280,
            check=False,
            cwd=tmp_path,  # its reports and cache stay out of the repository
        )
        assert run.returncode == 0, run.stdout[-6000:]
        assert "passed" in run.stdout
