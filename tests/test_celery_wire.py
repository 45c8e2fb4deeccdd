"""The Celery gate's wire: calls written and read by an event loop, never waited for.

Runs kombu's real event loop (``Hub``) against a real Redis server.
"""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from conftest import RedisProcess
from kombu.asynchronous import Hub
from redis.exceptions import RedisError, ResponseError

from queue_ratelimit.celery._wire import WIRE_STALL, NotSent, Wire


class Replies:
    """Collects what each callback is given, in the order the callbacks ran."""

    def __init__(self) -> None:
        self.got: list[tuple[str, Any]] = []

    def to(self, name: str) -> Callable[[Any], None]:
        return lambda result: self.got.append((name, result))


@pytest.fixture
def hub() -> Iterator[Hub]:
    loop = Hub()
    yield loop
    loop.close()


@pytest.fixture
def replies() -> Replies:
    return Replies()


@pytest.fixture
def wire(hub: Hub, redis_client: redis.Redis) -> Iterator[Wire]:
    """A wire to the test server on the event loop, closed after the test."""
    on_loop = Wire(redis_client, hub)
    yield on_loop
    on_loop.close()


def run_until(hub: Hub, condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Turn the event loop until ``condition`` gives something truthy, and return it (fails
    the test after ``timeout``)."""
    deadline = time.monotonic() + timeout
    loop = hub.create_loop()
    while not (result := condition()):
        assert time.monotonic() < deadline, "the event loop did not get there in time"
        next(loop)
    return result


def test_sends_of_one_turn_go_out_in_one_write_and_replies_reach_their_callers(
    hub: Hub, wire: Wire, replies: Replies, redis_client: redis.Redis, namespace: str
) -> None:
    key = f"{namespace}:wire"
    wire.send([("SET", key, "a"), ("GET", key)], replies.to("first"))
    wire.send([("INCR", f"{key}:n")], replies.to("second"))
    wire.send([("HGET", key, "x")], replies.to("wrong type"))  # a string, not a hash
    assert replies.got == []
    assert wire.writes == 0
    run_until(hub, lambda: len(replies.got) == 3)
    assert wire.writes == 1
    assert replies.got[0] == ("first", [b"OK", b"a"])
    assert replies.got[1] == ("second", [1])
    name, (error,) = replies.got[2]
    assert name == "wrong type"
    assert isinstance(error, ResponseError)
    assert "WRONGTYPE" in str(error)
    assert wire.pending == 0


def test_a_write_larger_than_the_socket_takes_goes_out_in_parts(
    hub: Hub, wire: Wire, replies: Replies, redis_client: redis.Redis, namespace: str
) -> None:
    big = os.urandom(8 << 20)  # far more than a loopback socket buffers
    wire.send([("SET", f"{namespace}:big", big), ("STRLEN", f"{namespace}:big")], replies.to("big"))
    wire.send([("PING",)], replies.to("after"))
    run_until(hub, lambda: len(replies.got) == 2, timeout=30)
    assert replies.got == [("big", [b"OK", len(big)]), ("after", [b"PONG"])]
    assert redis_client.get(f"{namespace}:big") == big


def test_a_lost_connection_tells_every_caller_and_the_next_send_reconnects(
    hub: Hub, wire: Wire, replies: Replies, redis_client: redis.Redis, namespace: str
) -> None:
    key = f"{namespace}:blocked"
    # A call that will not answer for a long while, then the server drops the connection.
    wire.send([("CLIENT", "SETNAME", "qrl-wire-test")], replies.to("named"))
    wire.send([("PING",), ("BLPOP", key, 30)], replies.to("lost"))
    wire.send([("PING",)], replies.to("also lost"))
    run_until(hub, lambda: len(replies.got) == 1)
    # Half of a send's replies are read without blocking the loop, and held back.
    assert replies.got == [("named", [b"OK"])]
    blocked = run_until(
        hub,
        lambda: [
            c["id"]
            for c in redis_client.client_list()
            if c.get("name") == "qrl-wire-test" and c.get("cmd") == "blpop"
        ],
    )
    redis_client.client_kill_filter(_id=blocked[0])
    run_until(hub, lambda: len(replies.got) == 3)
    assert [name for name, _ in replies.got] == ["named", "lost", "also lost"]
    assert all(isinstance(result, RedisError) for _, result in replies.got[1:])
    assert not any(isinstance(result, NotSent) for _, result in replies.got[1:])
    assert wire.pending == 0
    wire.send([("PING",)], replies.to("again"))
    run_until(hub, lambda: len(replies.got) == 4)
    assert replies.got[3] == ("again", [b"PONG"])


def test_without_an_event_loop_calls_are_written_at_once_and_read_on_poll_or_drain(
    redis_client: redis.Redis, namespace: str, replies: Replies
) -> None:
    wire = Wire(redis_client)
    key = f"{namespace}:plain"
    wire.send([("SET", key, "1")], replies.to("set"))
    assert wire.writes == 1
    # Written already: another client sees it without the reply having been read.
    assert redis_client.get(key) == b"1"
    wire.send([("INCR", key)], replies.to("incr"))
    wire.drain()
    assert replies.got == [("set", [b"OK"]), ("incr", [2])]
    wire.send([("GET", key)], replies.to("get"))
    deadline = time.monotonic() + 10
    while not replies.got[2:] and time.monotonic() < deadline:
        wire.poll()  # never blocks: returns at once until the reply is there
    assert replies.got[2] == ("get", [b"2"])
    wire.close()


def test_close_reports_calls_not_yet_written_and_a_stalled_server_is_measured(
    hub: Hub, redis_process: Callable[..., RedisProcess], replies: Replies
) -> None:
    server = redis_process()
    client = redis.Redis.from_url(server.url, socket_timeout=5)
    wire = Wire(client, hub)
    wire.send([("PING",)], replies.to("before"))
    run_until(hub, lambda: len(replies.got) == 1)
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        wire.send([("PING",)], replies.to("hung"))
        run_until(hub, lambda: wire.writes == 2)
        wire.send([("PING",)], replies.to("never written"))
        # The loop keeps turning while the server hangs; the gate drops the connection once
        # stalled_for() says the reply is overdue.
        run_until(hub, lambda: wire.stalled_for() > 0.2)
        assert [name for name, _ in replies.got] == ["before"]
        wire.close()
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert [name for name, _ in replies.got] == ["before", "hung", "never written"]
    # Written to a server that never answered: in doubt. Never written: surely not run.
    assert isinstance(replies.got[1][1], RedisError)
    assert not isinstance(replies.got[1][1], NotSent)
    assert isinstance(replies.got[2][1], NotSent)
    client.close()


def test_calls_to_an_unreachable_server_are_reported_as_never_sent(
    hub: Hub, replies: Replies
) -> None:
    from conftest import free_port

    client = redis.Redis(port=free_port(), socket_connect_timeout=1)
    wire = Wire(client, hub)
    wire.send([("PING",)], replies.to("refused"))
    run_until(hub, lambda: replies.got)
    [(name, error)] = replies.got
    assert name == "refused"
    assert isinstance(error, NotSent)


def test_a_refused_connect_is_one_attempt_whatever_the_clients_retry_policy(
    hub: Hub, replies: Replies, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wire connects on the worker's event loop: a client's retry policy would sleep
    through its backoff there (redis-py's default: about 10 s against a server that
    refuses, the loop stopped meanwhile). One attempt; the callers hear NotSent."""
    from conftest import free_port
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry

    attempts: list[int] = []
    connect = redis.connection.Connection._connect

    def counted(self: redis.connection.Connection) -> Any:
        attempts.append(1)
        return connect(self)

    monkeypatch.setattr(redis.connection.Connection, "_connect", counted)
    client = redis.Redis(port=free_port(), retry=Retry(ExponentialBackoff(cap=0.01), 3))
    wire = Wire(client, hub)
    wire.send([("PING",)], replies.to("refused"))
    run_until(hub, lambda: replies.got)
    [(_, error)] = replies.got
    assert isinstance(error, NotSent)
    assert len(attempts) == 1


def test_the_stall_limit_is_ten_seconds_or_the_clients_timeout_if_longer() -> None:
    """A reply the client's other calls would still wait for is never given up on; a
    shorter timeout does not shorten the 10 s (a short stall of the server would leave
    what is on the wire in doubt, to settle again, for nothing: docs/tuning.md)."""
    url = "redis://127.0.0.1:1/0"
    assert Wire(redis.Redis.from_url(url)).stall_limit == WIRE_STALL == 10.0
    assert Wire(redis.Redis.from_url(url, socket_timeout=2)).stall_limit == WIRE_STALL
    assert Wire(redis.Redis.from_url(url, socket_timeout=30)).stall_limit == 30.0
    assert Wire(redis.Redis.from_url(f"{url}?socket_timeout=12")).stall_limit == 12.0


def test_a_send_overdue_past_the_limit_is_dropped_as_in_doubt(
    hub: Hub, redis_process: Callable[..., RedisProcess], replies: Replies
) -> None:
    server = redis_process()
    client = redis.Redis.from_url(server.url)
    wire = Wire(client, hub, min_stall=0.2)
    wire.send([("PING",)], replies.to("before"))
    run_until(hub, lambda: len(replies.got) == 1)
    assert wire.drop_if_hung() == 0.0  # nothing pending: kept
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        wire.send([("PING",)], replies.to("hung"))
        run_until(hub, lambda: wire.stalled_for() > 0.2)
        assert wire.drop_if_hung() > 0.2
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    [(name, error)] = replies.got[1:]
    assert name == "hung"
    assert isinstance(error, RedisError)
    assert not isinstance(error, NotSent)  # written: in doubt
    wire.send([("PING",)], replies.to("after"))  # a new connection
    run_until(hub, lambda: len(replies.got) == 3)
    assert replies.got[2] == ("after", [b"PONG"])
    wire.close()
    client.close()


def test_a_reply_that_came_while_the_loop_was_busy_is_read_not_dropped(
    hub: Hub, redis_process: Callable[..., RedisProcess], replies: Replies
) -> None:
    """A consumer held up longer than the limit (a slow task handler, a loaded machine)
    finds replies waiting in the socket: they are read before the stall is judged."""
    server = redis_process()
    client = redis.Redis.from_url(server.url)
    wire = Wire(client, hub, min_stall=0.05)
    wire.send([("PING",)], replies.to("first"))  # connects
    run_until(hub, lambda: replies.got)
    wire.send([("PING",)], replies.to("late"))
    wire.flush()  # written, and the loop does not turn again until the check
    sock = wire._conn._sock
    deadline = time.monotonic() + 10
    while not select.select([sock], [], [], 0.05)[0] or wire.stalled_for() <= 0.05:
        assert time.monotonic() < deadline, "no reply"
    assert wire.drop_if_hung() == 0.0
    assert replies.got[1] == ("late", [b"PONG"])
    wire.close()
    client.close()
