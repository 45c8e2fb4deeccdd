"""A Redis that stops answering (SIGSTOP: its sockets stay open, nothing replies) makes every
surface give up within its timeout and answer as documented, instead of blocking for as long
as the server stays stopped.

Each test stops a server of its own and calls one surface with a generous deadline; whether
it returned is the assertion, never how fast.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import RedisProcess

from queue_ratelimit import (
    AsyncLimiter,
    BackendUnavailable,
    Decision,
    FairScheduler,
    Limit,
    Limiter,
)
from queue_ratelimit._client import REDIS_TIMEOUT

# Far above the default timeout (and the one retry of a dropped connection), far below
# "as long as the server stays stopped": a surface that has not returned by then hangs.
DEADLINE = 30.0
BIN = Path(sys.executable).parent


def returns_within(call: Callable[[], Any], deadline: float = DEADLINE) -> Any:
    """What ``call`` returns (or raises), run in a thread; fails the test if it is still
    blocked after ``deadline`` seconds (the thread is left to end with the server)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # handed to the test as it was raised
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        pytest.fail(f"still blocked after {deadline}s on a stopped Redis")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class Stopped:
    """A Redis server of the test's own, running until ``stop()`` freezes it (SIGSTOP)."""

    def __init__(self, server: RedisProcess) -> None:
        self.server = server
        self.url = server.url
        self.namespace = f"h{uuid.uuid4().hex[:10]}"

    def stop(self) -> None:
        assert self.server.proc is not None
        os.kill(self.server.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.server.proc is not None and self.server.proc.poll() is None:
            os.kill(self.server.proc.pid, signal.SIGCONT)


@pytest.fixture
def hung(redis_process: Callable[..., RedisProcess]) -> Iterator[Stopped]:
    frozen = Stopped(redis_process())
    try:
        yield frozen
    finally:
        frozen.resume()  # then the factory kills it
        frozen.server.stop()


def ready_limiter(hung: Stopped, **options: Any) -> Limiter:
    """A limiter made the ordinary way, with a live connection from before the stop."""
    limiter = Limiter.from_url(hung.url, namespace=hung.namespace, **options)
    limiter.set_limit("tenant:*", Limit(100, burst=100))
    return limiter


# -- the limiter, every fail mode -------------------------------------------------------------
def test_acquire_raises_backend_unavailable(hung: Stopped) -> None:
    limiter = ready_limiter(hung)
    hung.stop()
    with pytest.raises(BackendUnavailable, match="Redis unreachable"):
        returns_within(lambda: limiter.acquire("acme"))


def test_acquire_fails_open(hung: Stopped) -> None:
    limiter = ready_limiter(hung, fail_mode="open")
    hung.stop()
    assert returns_within(lambda: limiter.acquire("acme")) == Decision(allowed=True, degraded=True)


def test_acquire_fails_closed(hung: Stopped) -> None:
    limiter = ready_limiter(hung, fail_mode="closed", closed_retry_ms=500)
    hung.stop()
    decision = returns_within(lambda: limiter.acquire("acme"))
    assert decision == Decision(allowed=False, wait_ms=500, degraded=True)


def test_a_new_connection_to_a_stopped_server_gives_up_too(hung: Stopped) -> None:
    """The kernel still accepts connections for a stopped server: the reply never comes."""
    hung.stop()
    limiter = Limiter.from_url(hung.url, namespace=hung.namespace, fail_mode="open")
    assert returns_within(lambda: limiter.acquire("acme")).degraded


def test_set_limit_raises_backend_unavailable(hung: Stopped) -> None:
    limiter = ready_limiter(hung)
    hung.stop()
    with pytest.raises(BackendUnavailable):
        returns_within(lambda: limiter.set_limit("tenant:acme", "5/s"))


@pytest.mark.parametrize("fail_mode", ["raise", "open"])
def test_async_limiter(hung: Stopped, fail_mode: str) -> None:
    async def scenario() -> Decision:
        limiter = AsyncLimiter.from_url(
            hung.url,
            namespace=hung.namespace,
            fail_mode=fail_mode,  # type: ignore[arg-type]
        )
        await limiter.set_limit("tenant:*", "100/s")
        hung.stop()
        return await limiter.acquire("acme")

    if fail_mode == "raise":
        with pytest.raises(BackendUnavailable):
            returns_within(lambda: asyncio.run(scenario()))
    else:
        assert returns_within(lambda: asyncio.run(scenario())).degraded


# -- the fair scheduler -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.submit("acme", "j2"), id="submit"),
        pytest.param(lambda s: s.dispatch(["default"]), id="dispatch"),
        pytest.param(lambda s: s.ack("j1"), id="ack"),
        pytest.param(lambda s: s.gate("acme", "j3"), id="gate"),
        pytest.param(lambda s: s.weights(), id="weights"),
    ],
)
def test_scheduler_raises_backend_unavailable(
    hung: Stopped, call: Callable[[FairScheduler], object]
) -> None:
    scheduler = FairScheduler(ready_limiter(hung))
    scheduler.submit("acme", "j1")
    hung.stop()
    with pytest.raises(BackendUnavailable):
        returns_within(lambda: call(scheduler))


# -- Celery's runtime (the gate's client) --------------------------------------------------
def test_the_celery_gate_client_gives_up(hung: Stopped) -> None:
    pytest.importorskip("celery")
    from celery import Celery

    from queue_ratelimit.celery import install

    app = Celery("hung", broker="memory://", set_as_current=False)
    runtime = install(app, redis_url=hung.url, namespace=hung.namespace)
    try:
        runtime.scheduler.gate("acme", "warm")  # a live connection from before the stop
        hung.stop()
        with pytest.raises(BackendUnavailable):
            returns_within(lambda: runtime.scheduler.gate("acme", "j1"))
    finally:
        from celery.signals import before_task_publish

        before_task_publish.disconnect(dispatch_uid=f"queue_ratelimit:{id(app)}")
        app.close()


# -- the CLI and the admin API ------------------------------------------------------------
def test_cli_limits_list_exits_with_a_message(hung: Stopped) -> None:
    hung.stop()
    done = subprocess.run(
        [str(BIN / "queue-ratelimit"), "--url", hung.url, "limits", "list"],
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )
    assert done.returncode != 0
    assert "cannot reach Redis" in done.stderr
    assert "Traceback" not in done.stderr


def test_admin_healthz_answers_503(hung: Stopped) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from queue_ratelimit.admin import create_app

    api = TestClient(create_app(ready_limiter(hung), token="t"))
    assert api.get("/healthz").status_code == 200
    hung.stop()
    response = returns_within(lambda: api.get("/healthz"))
    assert response.status_code == 503
    assert response.json()["error"] == "BackendUnavailable"


# -- TLS against a plain port -------------------------------------------------------------
def test_rediss_pointed_at_a_plain_port_gives_up(hung: Stopped) -> None:
    """The TLS handshake waits for a server hello that a plain Redis never sends."""
    limiter = Limiter.from_url(hung.url.replace("redis://", "rediss://"), fail_mode="open")
    assert returns_within(lambda: limiter.acquire("acme")).degraded
    strict = Limiter.from_url(hung.url.replace("redis://", "rediss://"))
    with pytest.raises(BackendUnavailable):
        returns_within(strict.limits)


# -- the timeout: one default, configurable, never imposed on a caller's client --------------
def timeouts(client: redis.Redis) -> tuple[object, object]:
    kwargs = client.connection_pool.connection_kwargs
    return kwargs.get("socket_timeout"), kwargs.get("socket_connect_timeout")


def test_the_default_timeout_and_how_to_change_it() -> None:
    url = "redis://127.0.0.1:1/0"
    assert timeouts(Limiter.from_url(url).client) == (REDIS_TIMEOUT, REDIS_TIMEOUT)
    assert timeouts(Limiter.from_url(url, timeout=7).client) == (7, 7)
    assert timeouts(Limiter.from_url(url, timeout=None).client) == (None, None)
    # Timeouts in the URL win over the argument.
    in_url = Limiter.from_url(f"{url}?socket_timeout=9&socket_connect_timeout=1", timeout=7)
    assert timeouts(in_url.client) == (9, 1)
    # A client passed in is used as it is.
    own = redis.Redis.from_url(url)
    assert timeouts(Limiter(own).client) == (None, None)
    async_client = AsyncLimiter.from_url(url).client
    kwargs = async_client.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (REDIS_TIMEOUT,) * 2
