"""Fixtures shared by the suite: a real Redis server, a clean namespace per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from queue_ratelimit import Limiter


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = os.environ.get("REDIS_URL")
    if not url:
        pytest.exit("REDIS_URL is not set: run the suite with `make test`", returncode=2)
    return url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def namespace() -> str:
    """A namespace of its own for each test, so tests never see each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def limiter(redis_client: redis.Redis, namespace: str) -> Iterator[Limiter]:
    lim = Limiter(redis_client, namespace=namespace)
    yield lim
    keys = list(redis_client.scan_iter(match=f"qrl:{{{namespace}}}:*", count=1000))
    if keys:
        redis_client.delete(*keys)
