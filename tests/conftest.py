"""Fixtures shared by the suite: a real Redis server, a clean namespace per test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from queue_ratelimit import Limiter
from queue_ratelimit._shards import ShardedLimiter

if TYPE_CHECKING:
    from queue_ratelimit._shard_layout import ShardLayout

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
# redis-py retries a refused connection with backoff by default; probes should not wait.
NO_RETRY = Retry(NoBackoff(), 0)


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


@pytest.fixture(scope="module")
def client(redis_url: str) -> Iterator[redis.Redis]:
    """One client for a whole module: for hypothesis tests, whose examples all run within
    one call of the test (a function-scoped fixture would not be fresh for each)."""
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def namespace() -> str:
    """A namespace of its own for each test, so tests never see each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}"


def drop_namespace(client: redis.Redis, namespace: str) -> None:
    """Delete every key of ``namespace`` (a real server outlives the test)."""
    keys = list(client.scan_iter(match=f"qrl:{{{namespace}}}:*", count=1000))
    if keys:
        client.delete(*keys)


@contextmanager
def scratch_limiter(client: redis.Redis) -> Iterator[Limiter]:
    """A limiter in a namespace of its own, dropped afterwards: for each example of a
    hypothesis test (its fixtures are made once for all of them)."""
    lim = Limiter(client, namespace=f"p{uuid.uuid4().hex[:12]}")
    try:
        yield lim
    finally:
        drop_namespace(client, lim.namespace)


@pytest.fixture
def limiter(redis_client: redis.Redis, namespace: str) -> Iterator[Limiter]:
    lim = Limiter(redis_client, namespace=namespace)
    yield lim
    drop_namespace(redis_client, namespace)


def free_port(*, also_free: int | None = None) -> int:
    """A loopback TCP port nobody listens on (and, with ``also_free``, port + that offset).

    Args:
        also_free: an offset whose port must be free too (Redis Cluster's bus is port + 10000).

    Returns:
        The port number.
    """
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if also_free is None:
            return port
        if port + also_free > 65535:
            continue
        with socket.socket() as other:
            try:
                other.bind(("127.0.0.1", port + also_free))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port found")


def wait_until(condition: Callable[[], object], *, timeout: float, what: str) -> object:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` s.

    Args:
        condition: called repeatedly; exceptions count as "not yet".
        timeout: seconds before the test fails.
        what: says what was awaited, for the failure message.

    Returns:
        The first truthy value ``condition`` returned.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = condition()
        except Exception as exc:  # the condition may fail while things come up
            result, last = None, exc
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")
        time.sleep(0.02)


class RedisProcess:
    """A ``redis-server`` of a test's own, on a loopback port, that the test may kill.

    Args:
        workdir: the server's working directory (its logs and cluster files go there).
        port: the port to listen on; a free one when None.
        extra: further ``redis-server`` arguments (``["--cluster-enabled", "yes"]``).
    """

    def __init__(self, workdir: Path, port: int | None = None, extra: list[str] | None = None):
        self.workdir = workdir
        self.port = port if port is not None else free_port()
        self.extra = list(extra or [])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        """Start the server and wait until it answers PING."""
        assert REDIS_SERVER is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        args += ["--logfile", str(self.workdir / "redis.log"), *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = redis.Redis(
            port=self.port, socket_connect_timeout=0.2, socket_timeout=0.5, retry=NO_RETRY
        )
        try:
            wait_until(probe.ping, timeout=10, what=f"redis-server on port {self.port}")
        finally:
            probe.close()
        return self

    def stop(self) -> None:
        """Kill the server (SIGKILL, by pid) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """A factory of private ``redis-server`` processes, all killed when the test ends."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    started: list[RedisProcess] = []

    def start(port: int | None = None, extra: list[str] | None = None) -> RedisProcess:
        server = RedisProcess(tmp_path / f"redis-{len(started)}", port=port, extra=extra)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def sharded(redis_client: redis.Redis, namespace: str) -> Iterator[ShardedLimiter]:
    """A namespace over 3 shards, rebalanced only when a test asks (tests/test_shards.py)."""
    lim = Limiter(redis_client, namespace=namespace, shards=3, rebalance_interval=3600)
    assert isinstance(lim, ShardedLimiter)
    yield lim
    keys = list(redis_client.scan_iter(match=f"qrl:{{{namespace}*", count=1000))
    if keys:
        redis_client.delete(*keys)


def tenants_on(lim: ShardLayout, shard: int, count: int = 1) -> list[str]:
    """The first ``count`` tenant names (tenant0, tenant1...) that live on ``shard``."""
    found = [t for t in (f"tenant{i}" for i in range(10_000)) if lim.shard_of(t) == shard]
    return found[:count]


# -- a Redis Cluster of the tests' own (tests/test_cluster.py, tests/test_celery_cluster.py) ---
def cluster_ok(port: int) -> bool:
    probe = redis.Redis(port=port, socket_timeout=1, retry=NO_RETRY)
    try:
        return probe.execute_command("CLUSTER INFO").get("cluster_state") == "ok"
    finally:
        probe.close()


def start_cluster(base: Path, nodes: list[RedisProcess], extra: Sequence[str] = ()) -> None:
    """Start three primaries (no replicas) on free loopback ports under ``base``, appended
    to ``nodes`` as they start (the caller stops them, by pid), and join them as a cluster."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server and redis-cli are needed for a cluster")
    for i in range(3):
        # A cluster node also listens on port + 10000 (the cluster bus).
        node = RedisProcess(
            Path(base, f"node{i}"),
            port=free_port(also_free=10000),
            extra=["--cluster-enabled", "yes", "--cluster-node-timeout", "3000", *extra],
        )
        nodes.append(node.start())
    create = [REDIS_CLI, "--cluster", "create"]
    create += [f"127.0.0.1:{n.port}" for n in nodes]
    create += ["--cluster-replicas", "0", "--cluster-yes"]
    result = subprocess.run(create, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    for node in nodes:
        wait_until(lambda n=node: cluster_ok(n.port), timeout=30, what="cluster_state:ok")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisProcess]]:
    """Three masters on free loopback ports, no replicas; killed by pid afterwards."""
    nodes: list[RedisProcess] = []
    try:
        start_cluster(tmp_path_factory.mktemp("cluster"), nodes)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def partial_cluster(tmp_path: Path) -> Iterator[list[RedisProcess]]:
    """A cluster of the test's own that keeps serving the slots it has when a primary is
    gone (``cluster-require-full-coverage no``); killed by pid afterwards."""
    nodes: list[RedisProcess] = []
    try:
        start_cluster(tmp_path, nodes, ["--cluster-require-full-coverage", "no"])
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@pytest.fixture
def cluster_client(cluster: list[RedisProcess]) -> Iterator[RedisCluster]:
    client = RedisCluster(host="127.0.0.1", port=cluster[0].port, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def cluster_url(cluster: list[RedisProcess]) -> str:
    """The cluster's URL as the package reads it (any node names the whole cluster)."""
    return f"redis+cluster://127.0.0.1:{cluster[0].port}/0"


def cleanup_sharded(client: RedisCluster, namespace: str) -> None:
    for node in client.get_primaries():
        direct = redis.Redis(port=int(node.port), retry=NO_RETRY)
        try:
            keys = list(direct.scan_iter(match=f"qrl:{{{namespace}*", count=1000))
            for key in keys:
                direct.delete(key)
        finally:
            direct.close()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``faults`` the variants a test module lists in ``FAULTS_ON_ONE_BROKER``: (test
    name, broker) pairs that ``make test`` leaves to ``make faults``, to stay within CI's 15
    minutes (each scenario still runs in ``make test`` on the other broker)."""
    for item in items:
        moved = getattr(getattr(item, "module", None), "FAULTS_ON_ONE_BROKER", ())
        callspec = getattr(item, "callspec", None)
        if moved and callspec is not None:
            pair = (getattr(item, "originalname", item.name), callspec.params.get("broker"))
            if pair in moved:
                item.add_marker(pytest.mark.faults)
