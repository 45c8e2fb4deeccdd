"""The package's Lua on one Redis client: a Redis Functions library where the server has
them (``FCALL``), else scripts (``EVALSHA``).

Both forms run the same code. As a Functions library, ``buckets.lua`` is compiled and set up
once per server (its helpers and caches persist between calls) and each script's body is a
registered function; as scripts, the library is prepended to every script that uses it and
rebuilt on each call. ``FCALL`` is measurably cheaper per decision (docs/benchmarks.md), so
it is used whenever the server accepts it; Redis < 7, a server that refuses ``FUNCTION LOAD``
(an ACL, say) or a Redis-like server without Functions gets ``EVALSHA``.

Either form survives a server that lost them (a restart without persistence, ``SCRIPT
FLUSH``, ``FUNCTION FLUSH``): the call loads them again and is retried once.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import redis
import redis.asyncio
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

# The scripts, each a function of the Functions library. Every one of them now uses the
# shared library (buckets.lua: the bucket arithmetic, the counts kept in memory), so the
# EVALSHA form prefixes it to each.
_LIBRARY = "buckets.lua"
SCRIPTS = (
    "acquire.lua",
    "config.lua",
    "counters.lua",
    "gate.lua",
    "hint.lua",
    "lean.lua",
    "scheduler.lua",
    "slots.lua",
    "shards.lua",
)
_USES_LIBRARY = frozenset(SCRIPTS)
# Run once when the Functions library loads, after buckets.lua: the library keeps the
# counts of decisions in memory between calls (buckets.lua, "Counters kept in memory");
# the EVALSHA form, which has no memory between calls, never runs this.
_LIBRARY_ONLY = "in_library = true"

Transport = Literal["fcall", "evalsha"]

# Redis < 5 needs this before a script may write after reading TIME; later versions always
# replicate effects (and Functions have no such call), so it is only in the EVALSHA form.
_EVAL_PROLOGUE = "pcall(redis.replicate_commands)\n"


def _read(name: str) -> str:
    packaged = resources.files("queue_ratelimit").joinpath("lua", name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # An editable install (or a plain checkout on sys.path) has the scripts at the top level
    # of the repository, where they are kept; wheels carry them inside the package.
    return (Path(__file__).resolve().parent.parent / "lua" / name).read_text(encoding="utf-8")


@functools.cache
def script_source(name: str) -> str:
    """The full source of a script for EVALSHA, with the shared library prepended where used."""
    body = _read(name)
    if name in _USES_LIBRARY:
        # The body runs as a function of its own, as in the Functions library: Lua allows a
        # function 200 locals, and the library's and a script's together pass that.
        return f"{_EVAL_PROLOGUE}{_read(_LIBRARY)}\nreturn (function()\n{body}\nend)()\n"
    return body


class PackableCall(Protocol):
    """A call made again and again with the same keys and arguments (one decision's), which
    keeps its command as packed for the wire."""

    keys: Sequence[str | bytes]
    args: Sequence[Any]
    packed: list[bytes] | None


class Library(NamedTuple):
    source: str
    name: str
    functions: dict[str, str]  # script file -> function name


@functools.cache
def library() -> Library:
    """The Functions library: its source, its name and the function name of each script.

    Names carry a digest of the source, so processes running different versions of the
    package share one server without replacing each other's code.
    """
    bodies = {name: _read(name) for name in SCRIPTS}
    digest = hashlib.sha1(
        "\0".join([_read(_LIBRARY), _LIBRARY_ONLY, *bodies.values()]).encode(),
        usedforsecurity=False,
    ).hexdigest()[:12]
    lib = f"qrl_{digest}"
    names = {name: f"{lib}_{name.removesuffix('.lua')}" for name in SCRIPTS}
    parts = [f"#!lua name={lib}", _read(_LIBRARY), _LIBRARY_ONLY]
    for name, body in bodies.items():
        # The body runs as is: KEYS and ARGV become the function's parameters.
        parts.append(f"redis.register_function('{names[name]}', function(KEYS, ARGV)\n{body}\nend)")
    return Library("\n".join(parts), lib, names)


def _retried(conn: Any, exc: Exception) -> bool:
    """Whether the retry policy of ``conn`` (its client's) retries ``exc``."""
    retry = getattr(conn, "retry", None)
    retried = getattr(retry, "_supported_errors", ())
    return retry is not None and retry.get_retries() > 0 and isinstance(exc, retried)


def _missing_function(exc: ResponseError) -> bool:
    return "function not found" in str(exc).lower()


def _no_functions(exc: ResponseError) -> bool:
    """The server has no Functions, or will not let us load them: use EVALSHA."""
    text = str(exc).lower()
    return "unknown command" in text or "noperm" in text or "no permissions" in text


class Scripts:
    """Calls the package's scripts on ``client`` (a redis-py ``Redis``, ``RedisCluster`` or
    ``redis.asyncio.Redis``): ``call`` for sync clients, ``acall`` for asyncio ones.

    ``transport`` is ``"fcall"`` or ``"evalsha"`` to force one (tests, benchmarks), or
    None to use Functions when the server allows them.
    """

    def __init__(self, client: Any, transport: Transport | None = None) -> None:
        self.client = client
        self.transport: Transport | None = transport
        self.library, self.library_name, self.functions = library()
        self._scripts = {name: client.register_script(script_source(name)) for name in SCRIPTS}
        # call_packed may send on a pooled connection itself: plain clients only, sync or
        # asyncio (not a cluster client, nor one pinned to one connection, whose lock it
        # would bypass, nor one with client-side caching, whose connections track the
        # commands they send).
        self._direct = (
            isinstance(client, redis.Redis | redis.asyncio.Redis)
            and client.connection is None
            and getattr(client.connection_pool, "cache", None) is None
        )

        # Checks of the server to run once, before the first script call (the eviction
        # policy, work left by an older key layout): before_first_call.
        self._pending: list[Callable[[], Any]] = []

    def before_first_call(self, check: Callable[[], Any]) -> None:
        """Run ``check`` (a function, or a coroutine function for asyncio clients) before
        the next script call. A check that raises stays pending: the next call runs it
        again (an ``eviction="refuse"`` limiter keeps refusing). A check already pending is
        not added twice."""
        if check not in self._pending:
            self._pending.append(check)

    def run_checks(self) -> None:
        """Run the pending checks now (a worker's start), not at the first script call."""
        for check in list(self._pending):
            check()
            with contextlib.suppress(ValueError):  # (another thread ran it too)
                self._pending.remove(check)

    async def _achecks(self) -> None:
        for check in list(self._pending):
            result = check()
            if inspect.isawaitable(result):
                await result
            with contextlib.suppress(ValueError):
                self._pending.remove(check)

    def sha(self, name: str) -> str:
        """The EVALSHA digest of a script."""
        sha: str = self._scripts[name].sha
        return sha

    # -- sync --------------------------------------------------------------------------
    def call(self, name: str, keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        """Run script ``name`` (e.g. ``"acquire.lua"``) and return its reply."""
        if self._pending:
            self.run_checks()
        for attempt in (1, 2):
            if self.transport == "evalsha":
                break
            try:
                reply = self.client.execute_command(
                    "FCALL", self.functions[name], len(keys), *keys, *args
                )
            except ResponseError as exc:
                if attempt == 2 or not self._retry_after(exc):
                    raise
                continue
            self.transport = "fcall"
            return reply
        return self._scripts[name](keys=keys, args=args)

    def call_packed(self, name: str, call: PackableCall) -> Any:
        """``call`` for the decisions a process makes over and over: the ``FCALL`` is packed
        once per ``call`` and sent on a connection from the client's pool.

        That skips redis-py's per-command work (packing, the retry wrapper, its command
        hooks), about a tenth of a decision's client time (docs/benchmarks.md). Anything
        but a plain success goes the ordinary way: a dropped connection is retried through
        ``call`` (the client's own retry policy, as redis-py would), a missing library is
        loaded and the call retried, EVALSHA servers and other clients never come here.
        A timeout goes the ordinary way only if the client's policy retries timeouts;
        otherwise it is raised at once (the clients of ``queue_ratelimit._client`` do not
        retry them: the server is not answering, and a retry would wait as long again).
        """
        if self._pending:
            self.run_checks()
        if self._direct and self.transport == "fcall":
            pool = self.client.connection_pool
            conn = pool.get_connection()
            try:
                conn.send_packed_command(self._packed(name, call, conn))
                return conn.read_response()
            except RedisTimeoutError as exc:
                if not _retried(conn, exc):
                    raise
            except RedisConnectionError:
                pass  # (redis-py disconnected it; call() connects again)
            except ResponseError as exc:
                if not self._retry_after(exc):
                    raise
            finally:
                pool.release(conn)
        return self.call(name, call.keys, call.args)

    def _packed(self, name: str, call: PackableCall, conn: Any) -> list[bytes]:
        packed = call.packed
        if packed is None:
            packed = call.packed = conn.pack_command(
                "FCALL", self.functions[name], len(call.keys), *call.keys, *call.args
            )
        return packed

    def load(self) -> None:
        """Load the Functions library, or settle on EVALSHA when the server has no
        Functions or refuses them.

        Never with REPLACE: a library of that name is this code (the name carries its
        digest), and replacing it would drop what it keeps in memory between calls (the
        plans it cached, and the counts not yet written: lua/buckets.lua), every time a
        process starts. "Already exists" means loaded."""
        try:
            self.client.function_load(self.library)
        except ResponseError as exc:
            self._loaded(exc)
        else:
            self._loaded(None)

    def _loaded(self, error: ResponseError | None) -> None:
        if error is None or "already exists" in str(error).lower():
            self.transport = "fcall"
        elif _no_functions(error):
            self.transport = "evalsha"
        else:
            raise error

    def _after_fcall_error(self, exc: ResponseError) -> Literal["retry", "load", "raise"]:
        """What an FCALL error calls for: a retry (EVALSHA chosen now), loading the library
        first, or raising it (the error is the function's own)."""
        if _no_functions(exc):
            self.transport = "evalsha"
            return "retry"
        return "load" if _missing_function(exc) else "raise"

    def _retry_after(self, exc: ResponseError) -> bool:
        """After an FCALL error: True when a retry may succeed (the library is loaded now,
        or EVALSHA chosen); False when the error is the function's own."""
        step = self._after_fcall_error(exc)
        if step == "load":
            self.load()
        return step != "raise"

    def queue(self, pipe: Any, name: str, keys: Sequence[str | bytes], args: Sequence[Any]) -> None:
        """Queue a call on a pipeline that the caller runs itself and may run again: a
        server that lost the code fails it with ``ResponseError``, and ``recover`` says
        whether a second run may succeed."""
        if self._pending:
            self.run_checks()
        if self.transport is None:
            self.load()
        if self.transport == "fcall":
            pipe.fcall(self.functions[name], len(keys), *keys, *args)
        else:
            pipe.evalsha(self.sha(name), len(keys), *keys, *args)

    def recover(self, exc: Exception) -> bool:
        """After a pipeline from ``queue`` failed: True when running it again may help (the
        missing code is loaded again here)."""
        if isinstance(exc, NoScriptError):
            for script in self._scripts.values():
                self.client.script_load(script.script)
            return True
        if isinstance(exc, ResponseError) and self.transport == "fcall":
            return self._retry_after(exc)
        return False

    def queue_on_callers_pipeline(
        self, pipe: Any, name: str, keys: Sequence[str | bytes], args: Sequence[Any]
    ) -> None:
        """Queue a call on someone else's pipeline, which nobody here will run again: as a
        script, which redis-py makes sure is loaded (SCRIPT EXISTS) before the pipeline
        runs, so a server that lost the code since does not fail it."""
        if self._pending:
            self.run_checks()
        self._scripts[name](keys=keys, args=args, client=pipe)

    # -- asyncio -----------------------------------------------------------------------
    async def acall(self, name: str, keys: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        if self._pending:
            await self._achecks()
        for attempt in (1, 2):
            if self.transport == "evalsha":
                break
            try:
                reply = await self.client.execute_command(
                    "FCALL", self.functions[name], len(keys), *keys, *args
                )
            except ResponseError as exc:
                if attempt == 2 or not await self._aretry_after(exc):
                    raise
                continue
            self.transport = "fcall"
            return reply
        return await self._scripts[name](keys=keys, args=args)

    async def acall_packed(self, name: str, call: PackableCall) -> Any:
        """``call_packed`` for asyncio clients. A cancelled call leaves nothing behind:
        redis-py closes a connection whose reply was not read."""
        if self._pending:
            await self._achecks()
        if self._direct and self.transport == "fcall":
            pool = self.client.connection_pool
            conn = await pool.get_connection()
            try:
                await conn.send_packed_command(self._packed(name, call, conn))
                return await conn.read_response()
            except RedisTimeoutError as exc:
                if not _retried(conn, exc):
                    raise
            except RedisConnectionError:
                pass  # (redis-py disconnected it; acall() connects again)
            except ResponseError as exc:
                if not await self._aretry_after(exc):
                    raise
            finally:
                await pool.release(conn)
        return await self.acall(name, call.keys, call.args)

    async def _aretry_after(self, exc: ResponseError) -> bool:
        step = self._after_fcall_error(exc)
        if step == "load":
            try:
                await self.client.function_load(self.library)  # (as load())
            except ResponseError as load_exc:
                self._loaded(load_exc)
            else:
                self._loaded(None)
        return step != "raise"
