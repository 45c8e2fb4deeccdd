"""The README's Python example runs, unchanged but for the server URL and namespace."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest
import redis

from queue_ratelimit import Decision, Limit, Limiter, ScopeLimit

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    """The first ```python block of the README that uses ``Limiter``."""
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)
    for block in blocks:
        if "Limiter" in block:
            return str(block)
    pytest.fail("README.md has no ```python block using Limiter")


def test_readme_example_runs(redis_client: redis.Redis, redis_url: str) -> None:
    code = readme_example()
    namespace = f"readme-{uuid.uuid4().hex[:8]}"
    url = re.search(r'Limiter\.from_url\("([^"]+)"', code)
    assert url is not None, "the example connects with Limiter.from_url(<url>, ...)"
    code = code.replace(url.group(1), redis_url)
    assert 'namespace="readme"' in code
    code = code.replace('namespace="readme"', f'namespace="{namespace}"')
    scope: dict[str, object] = {"__name__": "readme_example"}
    try:
        exec(compile(code, str(README), "exec"), scope)
        limiter = scope["limiter"]
        decision = scope["decision"]
        assert isinstance(limiter, Limiter)
        assert isinstance(decision, Decision)
        assert limiter.namespace == namespace
        # What the example promises: an admitted job under four limits, one of them shadow.
        assert decision.allowed
        assert set(decision.remaining) == {"tenant:acme:queue:emails", "tenant:acme", "global"}
        assert limiter.limits() == {
            "global": ScopeLimit("global", Limit(1000)),
            "tenant:*": ScopeLimit("tenant:*", Limit(50, burst=100)),
            "tenant:acme": ScopeLimit("tenant:acme", Limit(6000, per=60)),
            "tenant:acme:queue:emails": ScopeLimit(
                "tenant:acme:queue:emails", Limit(5), shadow=True
            ),
        }
        # The refund at the end gave the token back.
        assert limiter.peek("acme", queue="emails").remaining["tenant:acme"] == pytest.approx(
            6000, abs=1
        )
    finally:
        limiter = scope.get("limiter")
        if isinstance(limiter, Limiter):
            limiter.close()
        keys = list(redis_client.scan_iter(match=f"qrl:{{{namespace}}}:*"))
        if keys:
            redis_client.delete(*keys)
