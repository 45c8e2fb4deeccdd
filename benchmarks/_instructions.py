"""Instructions Redis executes per ``acquire``, counted with callgrind: a tool for working on
the Lua, whose figures machine noise cannot move.

    python -m benchmarks._instructions [--calls N] [--denied] [--record] [--caps] [--ops]
                                       [--drained] [--no-peers]
                                       [--kinds]

Not part of ``python -m benchmarks`` (its name starts with ``_``). Needs ``valgrind`` and
``redis-server`` on PATH. It starts its own ``redis-server`` under ``valgrind
--tool=callgrind`` on a free loopback port, sets up the 1-bucket and 3-bucket decisions of
``benchmarks/decisions.py``, and for each one zeroes the counters, runs N ``FCALL``s in one
pipeline and dumps the counters: instructions per call, the same for the same code on any
run. ``--record`` counts them with traffic recording on. ``--caps`` also counts the 1-bucket
decision under a concurrency cap (``tenant:*``, high enough never to deny: the slot is taken)
and the release of the slot (``slots.lua``). ``--drained`` also counts the allowed decisions
on buckets that never fill, whose tokens are fractions printed on every decision.
``--ops`` also prices single Lua operations (a ``tonumber``, a table, a ``redis.call`` ...),
each in a loop of 1,000 inside one ``EVAL``, net of an empty loop. Prints JSON on stdout;
the server's dumps are left in a temporary folder, named on stderr, for
``callgrind_annotate``.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import redis

from queue_ratelimit import Limit, Limiter, Slot

from .decisions import HIGH, PRIORITY_AND_PAUSE_KINDS, QUEUE, TENANT, TIGHT, set_up_kind

CLOCK = ("999999", "1764355012345678")  # a token count and a clock in microseconds
# --drained: buckets that never fill (a burst of 1e9), so that their tokens are fractions,
# printed by every decision (in millionths at that size: tokens_text in lua/buckets.lua);
# HIGH's stay full, and are not printed again.
DRAINED = Limit(1000.5, per=1.0, burst=1e9)
# Lua operations priced by --ops: (name, loop body, ARGV).
OPS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("tonumber of 16 digits", "x = tonumber(ARGV[1])", ("1764355012345678",)),
    ("tonumber of 6 digits", "x = tonumber(ARGV[1])", ("999999",)),
    ("16 digits + 0 (coercion)", "x = ARGV[1] + 0", ("1764355012345678",)),
    ("concatenation of two strings", "x = ARGV[1] .. ARGV[2]", ("1764355012", "345678")),
    ("string.format('%d')", "x = string.format('%d', 999999 - i)", ()),
    ("string.format('%.17g')", "x = string.format('%.17g', 999999.5 - i)", ()),
    ("empty table", "x = {}", ()),
    ("table of 9 named fields", "x = {a=1, b=2, c=3, d=4, e=5, f=6, g=7, h=8, i=9}", ()),
    ("Lua function call", "x = f(i)", ()),
    ("HGET", "x = redis.call('HGET', 'qrl-ops', 'f')", ()),
    ("HMGET of 3 fields", "x = redis.call('HMGET', 'qrl-ops', 'f', 'g', 'x')", ()),
    ("TIME", "x = redis.call('TIME')", ()),
    ("HINCRBY", "x = redis.call('HINCRBY', 'qrl-ops', 'n', '1')", ()),
    ("HSET of 2 fields", "x = redis.call('HSET', 'qrl-ops', 'f', ARGV[1], 'g', ARGV[2])", CLOCK),
)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_up(
    client: redis.Redis, process: subprocess.Popen[bytes], seconds: float, what: str
) -> None:
    """Until ``client`` gets an answer from the server ``process`` started (or it exits, or
    ``seconds`` pass: a RuntimeError naming ``what``)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.05)


class Server(Protocol):
    """A private redis-server and a measure of what it does while a run runs (Callgrind's
    instructions; _server_time.py's microseconds)."""

    client: redis.Redis
    port: int

    def count(self, run: Callable[[], object]) -> float: ...


class Callgrind:
    """A redis-server under callgrind, and its counters."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.process = subprocess.Popen(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={folder}/callgrind.out.%p",
                "redis-server",
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = redis.Redis(port=self.port)
        self.dumps = 0
        wait_until_up(self.client, self.process, 120, "redis-server under valgrind")

    def _control(self, *args: str) -> None:
        # Valgrind reads the request when the server next runs: keep it busy until done.
        for _ in range(20):
            control = subprocess.Popen(
                ["callgrind_control", *args, str(self.process.pid)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            while control.poll() is None:
                self.client.ping()
                time.sleep(0.05)
            assert control.stdout is not None
            output = control.stdout.read()
            if "OK" in output:
                return
            time.sleep(0.5)
        raise RuntimeError(f"callgrind_control {' '.join(args)}: {output}")

    def count(self, run: Callable[[], object]) -> int:
        """Instructions the server executed while ``run`` ran."""
        self._control("-z")
        run()
        self._control("-d")
        self.dumps += 1
        dump = self.folder / f"callgrind.out.{self.process.pid}.{self.dumps}"
        deadline = time.monotonic() + 30
        while not dump.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no dump {dump}")
            time.sleep(0.1)
        found = re.search(r"^summary: (\d+)", dump.read_text(), re.M)
        assert found, dump
        return int(found.group(1))

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait()


@contextmanager
def callgrind() -> Iterator[Callgrind]:
    folder = Path(tempfile.mkdtemp(prefix="qrl-callgrind-"))
    print(f"callgrind dumps in {folder}", file=sys.stderr)
    server = Callgrind(folder)
    try:
        yield server
    finally:
        server.close()


def _decision(
    server: Server, buckets: int, denied: bool, calls: int, record: bool, drained: bool = False
) -> float:
    limiter, queue = _decision_limiter(server.client, buckets, denied, record, drained)
    return _fcalls(server, limiter, queue, None, calls)


def _decision_limiter(
    client: redis.Redis, buckets: int, denied: bool, record: bool, drained: bool
) -> tuple[Limiter, str | None]:
    """A limiter set up for one of the benchmark's decisions, and the queue it is made on."""
    name = f"qrl-instructions-{buckets}{'d' * denied}{'r' * drained}"
    limiter = Limiter(client, namespace=name)
    limiter.set_recording(900 if record else None)
    queue = None
    high = DRAINED if drained else HIGH
    if buckets == 1:
        limiter.set_limit("tenant:*", TIGHT if denied else high)
    else:
        limiter.set_limit("global", high)
        limiter.set_limit("tenant:*", high)
        limiter.set_limit(f"tenant:*:queue:{QUEUE}", TIGHT if denied else high)
        queue = QUEUE
    return limiter, queue


def _fcalls(
    server: Server, limiter: Limiter, queue: str | None, priority: str | None, calls: int
) -> float:
    """Instructions per ``acquire`` FCALL of ``TENANT`` (in a pipeline of ``calls``)."""
    command = warm_fcall(limiter, queue, priority)
    pipe = server.client.pipeline(transaction=False)
    for _ in range(calls):
        pipe.execute_command(*command)
    return server.count(pipe.execute) / calls


def warm_fcall(limiter: Limiter, queue: str | None, priority: str | None) -> tuple[Any, ...]:
    """The ``FCALL`` of an ``acquire`` of ``TENANT``, after 50 real ones (the library
    loaded, its plan cached, a denied bucket emptied)."""
    for _ in range(50):
        limiter.acquire(TENANT, queue, priority)
    call = limiter._core.decision_call("acquire", TENANT, queue, priority, 1)
    function = limiter._scripts.functions["acquire.lua"]
    return ("FCALL", function, len(call.keys), *call.keys, *call.args)


def _kind(server: Server, kind: str, calls: int) -> float:
    """A priority scope or a pause (issue #13), set up as benchmarks/decisions.py does."""
    limiter = Limiter(server.client, namespace=f"qrl-instructions-{kind}")
    return _fcalls(server, limiter, None, set_up_kind(limiter, kind), calls)


def _capped(server: Callgrind, calls: int) -> tuple[float, float]:
    """Instructions of a 1-bucket acquire that also takes a concurrency slot, and of the
    release of that slot: ``calls`` (acquire, release) pairs in one pipeline, so the slot set
    stays as small as a cap keeps it, then the releases alone (of acquires made before)."""
    limiter = Limiter(server.client, namespace="qrl-instructions-cap")
    limiter.set_limit("tenant:*", HIGH)
    limiter.set_concurrency("tenant:*", 1_000_000)
    for _ in range(50):
        limiter.release(limiter.acquire(TENANT))
    call = limiter._core.decision_call("acquire", TENANT, None, None, 1)
    acquire_fn = limiter._scripts.functions["acquire.lua"]
    release_fn = limiter._scripts.functions["slots.lua"]
    scopes = (f"tenant:{TENANT}",)

    def next_token() -> int:
        return int(server.client.hget(limiter.keys.shared, "n:lease") or 0) + 1

    def pipeline(acquire: bool, release: bool, first: int) -> Any:
        # Slot tokens are the shared counter's next values (from `first`): the releases
        # can be sent in the same pipeline as the acquires that take them.
        pipe = server.client.pipeline(transaction=False)
        for i in range(calls):
            if acquire:
                pipe.execute_command("FCALL", acquire_fn, len(call.keys), *call.keys, *call.args)
            if release:
                r = limiter._core.slot_call("release", Slot(str(first + i), scopes), 0)
                pipe.execute_command("FCALL", release_fn, len(r.keys), *r.keys, *r.args)
        return pipe

    both = server.count(pipeline(True, True, next_token()).execute) / calls
    first = next_token()
    pipeline(True, False, first).execute()  # slots to release, uncounted
    replies: list[Any] = []
    released = server.count(lambda: replies.extend(pipeline(False, True, first).execute()))
    assert replies == [1] * calls, "every slot released once"
    assert not server.client.exists(limiter.keys.slots(scopes[0]))
    return both - released / calls, released / calls


def _peer_sliding_window(server: Server, calls: int) -> float:
    """Instructions of ``limits``' ``SlidingWindowCounterRateLimiter.hit`` (the cheapest
    other library in ``benchmarks/decisions.py``): its script call, captured from one real
    ``hit`` with the benchmark's limit and tenant, sent ``calls`` times in one pipeline."""
    return _evalsha_count(server, *peer_evalsha(server.port), calls)


def peer_evalsha(port: int) -> tuple[str, Any, Any]:
    """The script, keys and arguments of one real ``hit`` of the peer (after 50)."""
    from limits import RateLimitItemPerSecond
    from limits.storage import RedisStorage
    from limits.strategies import SlidingWindowCounterRateLimiter

    storage = RedisStorage(f"redis://127.0.0.1:{port}", key_prefix="qrl-peer")
    script = storage.lua_acquire_sliding_window
    captured: list[tuple[Any, Any]] = []

    def capture(keys: Any = None, args: Any = None, client: Any = None) -> Any:
        captured.append((keys, args))
        return script(keys=keys, args=args, client=client)

    storage.lua_acquire_sliding_window = capture  # type: ignore[assignment]
    limiter = SlidingWindowCounterRateLimiter(storage)
    item = RateLimitItemPerSecond(HIGH.rate)
    for _ in range(50):
        assert limiter.hit(item, TENANT)
    keys, args = captured[-1]
    return script.sha, keys, args


def _evalsha_count(server: Server, sha: str, keys: Any, args: Any, calls: int) -> float:
    pipe = server.client.pipeline(transaction=False)
    for _ in range(calls):
        pipe.evalsha(sha, len(keys), *keys, *args)
    replies: list[Any] = []
    count = server.count(lambda: replies.extend(pipe.execute()))
    assert all(replies), "every call allowed"
    return count / calls


def _floor(server: Server, calls: int) -> float:
    sha = server.client.script_load("return 1")
    return _evalsha_count(server, sha, (), (), calls)


def _ops(server: Callgrind) -> dict[str, float]:
    server.client.hset("qrl-ops", mapping={"f": "999999", "g": "1764355012345678", "x": "1"})

    def loop(body: str, args: tuple[str, ...]) -> int:
        script = f"local function f(a) return a end local x for i = 1, 1000 do {body} end return 1"
        server.client.eval(script, 0, *args)  # compiled and cached before counting
        return server.count(lambda: server.client.eval(script, 0, *args))

    empty = loop("x = i", ())
    return {name: round((loop(body, args) - empty) / 1000) for name, body, args in OPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000, help="FCALLs per count (2000)")
    parser.add_argument("--denied", action="store_true", help="the denied paths too")
    parser.add_argument("--record", action="store_true", help="with traffic recording on")
    parser.add_argument("--caps", action="store_true", help="under a concurrency cap too")
    parser.add_argument(
        "--drained", action="store_true", help="on buckets that never fill (fractional tokens)"
    )
    parser.add_argument("--ops", action="store_true", help="price single Lua operations too")
    parser.add_argument(
        "--no-peers", action="store_true", help="skip limits' sliding window counter and the floor"
    )
    parser.add_argument(
        "--kinds", action="store_true", help="a priority scope and pauses too (1 bucket)"
    )
    options = parser.parse_args()
    result: dict[str, Any] = {}
    with callgrind() as server:
        paths = [("1bucket", 1, False), ("3bucket", 3, False)]
        if options.denied:
            paths += [("1bucket_denied", 1, True), ("3bucket_denied", 3, True)]
        drained = [("1bucket_drained", 1, False), ("3bucket_drained", 3, False)]
        for name, buckets, denied in paths + drained * options.drained:
            count = _decision(
                server, buckets, denied, options.calls, options.record, name.endswith("drained")
            )
            result[name] = round(count)
            print(f"{name:16s} {result[name]:>9,} instructions per decision", file=sys.stderr)
        if options.kinds:
            for kind in PRIORITY_AND_PAUSE_KINDS:
                result[kind] = round(_kind(server, kind, options.calls))
                print(f"{kind:16s} {result[kind]:>9,} instructions per decision", file=sys.stderr)
        if options.caps:
            acquired, released = _capped(server, options.calls)
            result["1bucket_cap"], result["release"] = round(acquired), round(released)
            for name in ("1bucket_cap", "release"):
                print(f"{name:16s} {result[name]:>9,} instructions per call", file=sys.stderr)
        if not options.no_peers:
            result["limits_sliding_window_counter"] = round(
                _peer_sliding_window(server, options.calls)
            )
            result["floor"] = round(_floor(server, options.calls))
            peer = result["limits_sliding_window_counter"]
            for name in ("limits_sliding_window_counter", "floor"):
                print(f"{name:16s} {result[name]:>9,} instructions per call", file=sys.stderr)
            # The targets (issue #14): 1 bucket <= 1.0 x the peer, 3 buckets <= 1.5 x.
            named = paths + drained * options.drained
            for name in [n for n, _, _ in named] + ["1bucket_cap"] * options.caps:
                result[f"{name}_vs_peer"] = round(result[name] / peer, 3)
                print(f"{name + ' / peer':24s} {result[name] / peer:.3f}", file=sys.stderr)
        if options.ops:
            result["ops"] = _ops(server)
            for op, cost in result["ops"].items():
                print(f"  {op:32s} {cost:>7,}", file=sys.stderr)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
