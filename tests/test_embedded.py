"""The embedded engine: its own properties. (It decides as a real server does: the decision
table of test_decisions.py runs on both.)"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator

import pytest
import redis

from queue_ratelimit import ConfigError, Limiter
from queue_ratelimit._embedded import (
    describe_engine,
    embedded_client,
    limiter_from_env,
    url_from_env,
)


@pytest.fixture
def embedded(namespace: str) -> Iterator[Limiter]:
    with Limiter(embedded_client(), namespace=namespace) as lim:
        yield lim


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
    assert embedded.acquire("acme").remaining == {"tenant:acme": pytest.approx(0, abs=0.02)}


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
