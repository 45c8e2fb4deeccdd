"""How long idle tenants' counters are kept, as the Celery and RQ integrations configure it
(``Limiter``'s ``counter_retention``): the soak (benchmarks/soak.py) shortens it to watch
memory come back within a run."""

from __future__ import annotations

import uuid

import pytest
import redis
from celery import Celery

from queue_ratelimit import ConfigError, Limit
from queue_ratelimit.celery._runtime import Runtime
from queue_ratelimit.celery._settings import CelerySettings
from queue_ratelimit.rq._options import ENV_RETENTION, scheduler_for


def tenant_ttl(client: redis.Redis, limiter_keys: object, tenant: str) -> int:
    return int(client.pttl(limiter_keys.tenant(tenant)))  # type: ignore[attr-defined]


def test_the_celery_setting_sets_the_retention_of_the_gate(redis_url: str) -> None:
    namespace = f"ret{uuid.uuid4().hex[:10]}"
    settings = CelerySettings(redis_url=redis_url, namespace=namespace, counter_retention=5)
    runtime = Runtime(Celery("retention"), settings)
    limiter = runtime.limiter
    try:
        limiter.set_limit("tenant:*", Limit(1000))
        verdict = runtime.scheduler.gate("t", "item-1", queue="q")
        assert verdict.action == "run"
        # Refilled within ms, then kept 5 s (the default would keep it 15 minutes).
        assert 4_000 < tenant_ttl(limiter.client, limiter.keys, "t") <= 5_100
    finally:
        keys = list(limiter.client.scan_iter(match=f"{limiter.keys.base}:*"))
        limiter.client.delete(*keys)
        limiter.client.close()


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf"), 1e300, "15"])
def test_a_bad_celery_retention_is_a_config_error(value: object) -> None:
    with pytest.raises(ConfigError, match="counter_retention"):
        CelerySettings(redis_url="redis://127.0.0.1:1/0", counter_retention=value)  # type: ignore[arg-type]


def test_the_rq_retention_comes_from_the_environment(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    connection = redis.Redis.from_url(redis_url)
    try:
        monkeypatch.delenv(ENV_RETENTION, raising=False)
        assert scheduler_for(connection, "ret-default").limiter._core.retention_ms == 900_000
        monkeypatch.setenv(ENV_RETENTION, "2.5")
        assert scheduler_for(connection, "ret-short").limiter._core.retention_ms == 2_500
        monkeypatch.setenv(ENV_RETENTION, "soon")
        with pytest.raises(ConfigError, match=ENV_RETENTION):
            scheduler_for(connection, "ret-bad")
    finally:
        connection.close()
