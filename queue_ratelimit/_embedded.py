"""The embedded engine: the package's own Lua scripts run in process (fakeredis + lupa)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import redis

from ._errors import ConfigError
from ._limiter import Limiter

#: Environment variables naming a Redis server, most specific first.
URL_ENV_VARS = ("QUEUE_RATELIMIT_URL", "REDIS_URL")
_MISSING = "the embedded engine needs fakeredis and lupa: install queue-ratelimit[embedded]"


def embedded_client() -> redis.Redis:
    """A private in-process Redis that runs Lua scripts, for ``Limiter(client, ...)``.

    Every call returns a client on a new, empty server, so two embedded limiters never share
    state by accident. The server speaks Lua 5.1, like Redis, so ``acquire.lua`` runs unchanged.

    >>> limiter = Limiter(embedded_client(), namespace="demo")
    >>> limiter.set_limit("tenant:*", "10/s")
    1
    >>> limiter.acquire("acme").allowed
    True

    Raises:
        ImportError: the ``embedded`` extra is not installed.
        ConfigError: ``FAKEREDIS_LUA_VERSION`` asks for a Lua other than the 5.1 Redis runs.
    """
    lua = os.environ.get("FAKEREDIS_LUA_VERSION", "5.1")
    if lua != "5.1":
        # Redis embeds Lua 5.1; scripts that pass on 5.4 (no global unpack) could differ.
        raise ConfigError(
            f"FAKEREDIS_LUA_VERSION={lua}: the embedded engine must run Lua 5.1, as Redis does; "
            f"unset that variable"
        )
    try:
        # fakeredis imports without lupa and only fails at the first EVAL, so check both.
        import fakeredis
        import lupa  # noqa: F401
    except ImportError as exc:
        raise ImportError(_MISSING) from exc
    client: redis.Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    return client


def url_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The Redis URL from ``QUEUE_RATELIMIT_URL`` or ``REDIS_URL``; None when neither is set."""
    env = os.environ if environ is None else environ
    return next((env[name] for name in URL_ENV_VARS if env.get(name)), None)


def limiter_from_env(
    namespace: str = "default", *, environ: Mapping[str, str] | None = None, **options: Any
) -> Limiter:
    """A ``Limiter`` on the server named by the environment, else on the embedded engine.

    Args:
        namespace: the limiter's namespace.
        environ: read instead of ``os.environ`` (for tests).
        **options: passed on to ``Limiter`` (``fail_mode``, ``prefix``...).
    """
    url = url_from_env(environ)
    if url is None:
        return Limiter(embedded_client(), namespace=namespace, **options)
    return Limiter.from_url(url, namespace=namespace, **options)


def describe_engine(limiter: Limiter) -> str:
    """A one-line description of where ``limiter`` keeps its buckets (never a password)."""
    pool = getattr(limiter.client, "connection_pool", None)
    kwargs: Mapping[str, Any] = getattr(pool, "connection_kwargs", {})
    if "server" in kwargs:  # only fakeredis connections carry their in-process server
        return "embedded (fakeredis + lupa: the package's Lua scripts, in process, no server)"
    if "path" in kwargs:
        return f"Redis at unix://{kwargs['path']} db {kwargs.get('db', 0)}"
    host, port = kwargs.get("host", "?"), kwargs.get("port", "?")
    return f"Redis at {host}:{port} db {kwargs.get('db', 0)}"
