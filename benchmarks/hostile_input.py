"""The hostile-input reproductions of issue #11 (findings 6, 7 and 12), measured.

``python -m benchmarks hostile_input`` (or ``make bench``) runs each against this tree and
reports what it cost: the time ``Limit.parse`` takes on backtracking bait, what the admin
API answers to a 40 KB and a 10 MB body (status, time, reply size), what a denormal weight
does to a lane, and how many shared-hash fields and ``/metrics`` series 1,000 one-off queue
and priority names leave. docs/reliability.md holds the figures before and after the fixes.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis

from queue_ratelimit import ConfigError, FairScheduler, Limit, Limiter

from ._common import log


def _parse_seconds(size: int) -> tuple[float, int]:
    """Seconds to refuse the bait of ``size`` spaces and letters, and its error's length."""
    text = "1/" + " " * size + "s" * size + " !"
    started = time.perf_counter()
    try:
        Limit.parse(text)
    except ConfigError as exc:
        return time.perf_counter() - started, len(str(exc))
    raise AssertionError("the bait parsed")


def _admin(limiter: Limiter) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from queue_ratelimit.admin import create_app

    headers = {"Authorization": "Bearer bench"}
    result: dict[str, Any] = {}
    with TestClient(create_app(limiter, token="bench")) as api:
        for name, body in (
            ("body_40kb", {"limit": "1/" + " " * 20_000 + "s" * 20_000 + " !"}),
            ("body_10mb", {"limit": ["x" * 10_000_000]}),
        ):
            started = time.perf_counter()
            reply = api.put("/limits/global", json=body, headers=headers)
            result[name] = {
                "status": reply.status_code,
                "seconds": round(time.perf_counter() - started, 4),
                "reply_bytes": len(reply.content),
            }
    return result


def _weight(limiter: Limiter) -> dict[str, Any]:
    scheduler = FairScheduler(limiter)
    try:
        scheduler.set_tenant_weight("tiny", 5e-324)
        refused = ""
    except ConfigError as exc:
        refused = type(exc).__name__
        # As if stored before weights were checked: the lane must still work.
        limiter.client.hset(limiter.keys.config, "weight:tenant:tiny", "5e-324")
    for i in range(3):
        scheduler.submit("tiny", f"t{i}")
    scheduler.dispatch(["default"])
    scheduler.dispatch(["default"])
    try:
        scheduler.submit("other", "o1")
        submit_after = "ok"
    except (ConfigError, redis.RedisError) as exc:
        submit_after = f"{type(exc).__name__}: {exc}"
    left = scheduler.dispatch(["default"], max_items=10).items
    return {
        "set_weight_5e-324": refused or "accepted",
        "submit_after_two_dispatches": submit_after,
        "dispatched_after": len(left),
        "backlog_after": scheduler.backlog("default"),
    }


def _one_off_names(limiter: Limiter, names: int) -> dict[str, int]:
    from prometheus_client import CollectorRegistry, generate_latest

    from queue_ratelimit.metrics import RateLimitCollector

    before = limiter.client.hlen(limiter.keys.shared)
    for i in range(names):
        limiter.acquire(f"t{i}", queue=f"q{i}", priority=f"p{i}")
    registry = CollectorRegistry()
    registry.register(RateLimitCollector(limiter))
    text = generate_latest(registry).decode()
    series = [line for line in text.splitlines() if line and not line.startswith("#")]
    return {
        "names": names,
        "shared_hash_fields_added": limiter.client.hlen(limiter.keys.shared) - before,
        "metrics_series": len(series),
    }


def run(redis_url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    namespaces = [f"hostile-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    try:
        log("hostile_input: Limit.parse on backtracking bait")
        seconds, message = _parse_seconds(50_000)
        log("hostile_input: admin API bodies, a denormal weight, 1,000 one-off names")
        return {
            "limit_parse_bait_50000": {"seconds": round(seconds, 6), "error_chars": message},
            "admin": _admin(Limiter(client, namespace=namespaces[0])),
            "denormal_weight": _weight(Limiter(client, namespace=namespaces[1])),
            "one_off_names": _one_off_names(Limiter(client, namespace=namespaces[2]), 1000),
        }
    finally:
        for namespace in namespaces:
            keys = list(client.scan_iter(match=f"qrl:{{{namespace}}}:*", count=1000))
            if keys:
                client.delete(*keys)
