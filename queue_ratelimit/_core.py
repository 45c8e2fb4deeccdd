"""The I/O-free half of the limiter, shared by ``Limiter`` and ``AsyncLimiter``.

Each operation is split into *build* (validate input, name keys, make script arguments) and
*interpret* (turn the reply into a result or a typed error), so the sync and async classes
only differ in how they wait for Redis.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._client import read_function_keys_locally
from ._concurrency import CONCURRENCY_PREFIX, check_concurrency
from ._decision import (
    PAUSE_PREFIX,
    Decision,
    Pause,
    ScopeLimit,
    Slot,
    check_window_count,
    check_windows,
    decode_limit,
    encode_limit,
    parse_reply,
)
from ._durability import EvictionMode, check_eviction_mode
from ._errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    CostExceedsBurst,
    InvalidCost,
    InvalidName,
    InvalidScope,
    LimitNotFound,
    TooManyPauses,
)
from ._keys import DEFAULT_NAMESPACE, DEFAULT_PREFIX, KeySpace, check_shards
from ._limit import Limit
from ._scopes import Scope, _shown, check_name, check_priority, scope_name
from ._scripts import Scripts

log = logging.getLogger("queue_ratelimit")
UNREACHABLE = (RedisConnectionError, RedisTimeoutError)

FailMode = Literal["raise", "open", "closed"]
Mode = Literal["acquire", "peek", "refund"]
ExemptMode = Literal["tenant", "all"]
# Costs are checked here and again by the scripts (lua/buckets.lua), before they write
# anything. Below MIN_COST a cost would be lost in the rounding slack the scripts allow
# (1e-9 tokens), so an empty bucket could admit it again and again.
MIN_COST, MAX_COST = 1e-6, 1e12
MEMO_SIZE = 4096
# Kept in lua/acquire.lua too, which applies it when the argument is left out.
DEFAULT_RETENTION_MS = 900_000
# The longest wait a decision reports, about ten years (MAX_WAIT_US in lua/buckets.lua,
# which clamps every wait it computes, so times made from one stay exact integers Redis
# accepts); also the bound of the waits and retention given here.
MAX_WAIT = 3650 * 86400.0
AUDIT_LENGTH = 10_000
# Concurrency caps: config field "conc:<scope>" = n. A slot is held at most this long
# unless renewed (lua/acquire.lua applies DEFAULT_HOLD when the argument is left out;
# lua/buckets.lua expires an idle slot set after MAX_HOLD).
DEFAULT_HOLD = 60.0
MAX_HOLD = 7 * 86400.0
# The longest pause (MAX_PAUSE_MS in lua/config.lua, which checks it again): a downstream's
# Retry-After longer than a month is better handled by an operator than by a timer.
MAX_PAUSE = 30 * 86400.0
# The most pauses that may run at once in a namespace (lua/config.lua applies it, 10,000
# too when the argument is left out): each is a field of the config hash, read whole by
# listings, scrapes, each Celery worker's look for caps and the shard rebalancer.
MAX_PAUSES = 10_000


@dataclass(slots=True)
class ScriptCall:
    keys: Sequence[str | bytes]
    args: Sequence[str | bytes | float | int]
    # The FCALL as sent on the wire, once Scripts.call_packed has packed it.
    packed: list[bytes] | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One configuration change, as kept in the audit stream."""

    id: str
    version: int
    op: str
    field: str
    old: str
    new: str
    actor: str
    at_ms: int


# Replies that mean "not now" rather than "broken": the server is loading its data, busy
# running a long script, a replica that takes no writes, out of memory, not persisting, or
# a cluster without a master for the slot. redis-py raises its own classes for some (and
# strips their code from the text), the others keep the code in front of the text.
_OUTAGE_CLASSES = (
    RedisConnectionError,  # (a loading server too: BusyLoadingError)
    RedisTimeoutError,
    ReadOnlyError,
    RedisClusterException,
    OutOfMemoryError,
    ClusterDownError,  # (MasterDownError too)
    # redis-py's cluster client when no node it knows answers (not one of its RedisErrors).
    RedisClusterException,
    TryAgainError,
)
_OUTAGE_REPLIES = re.compile(
    r"(?:^|caused error: )(?:BUSY|LOADING|READONLY|MASTERDOWN|CLUSTERDOWN|TRYAGAIN|OOM|"
    r"NOREPLICAS|MISCONF)\b"
)


# Credentials Redis refuses (a wrong password or user: WRONGPASS, NOAUTH, "invalid
# password"; an ACL user not allowed to connect): redis-py raises them as connection errors,
# but they are configuration to fix, not an outage: failing open on them would let every
# job through for as long as nobody fixes the password.
_REFUSED_CREDENTIALS = (AuthenticationError, AuthorizationError)


def is_outage(exc: BaseException) -> bool:
    """Whether a Redis error is an outage (the fail mode applies), not broken data or
    configuration (wrong credentials)."""
    if isinstance(exc, _REFUSED_CREDENTIALS):
        return False
    if isinstance(exc, _OUTAGE_CLASSES):
        return True
    return isinstance(exc, RedisError) and bool(_OUTAGE_REPLIES.search(str(exc)))


def translated(exc: Exception) -> Exception:
    """Redis's error as ours: ``BackendUnavailable`` for an outage, ``BackendError`` for
    any other error Redis answered with (``exc`` itself when it is not Redis's)."""
    if is_outage(exc):
        reason = "unreachable" if isinstance(exc, UNREACHABLE) else "not serving"
        return BackendUnavailable(f"Redis {reason}: {exc}")
    if isinstance(exc, _REFUSED_CREDENTIALS):
        return BackendError(
            f"Redis refused the credentials ({exc}): check the password and user in the "
            "Redis URL; nothing is decided until it accepts them, whatever the fail mode"
        )
    if isinstance(exc, RedisError):
        # The scripts raise "queue-ratelimit: ..." for configuration they cannot read.
        text = str(exc)
        if "queue-ratelimit:" in text:
            return BackendError(text[text.index("queue-ratelimit:") :])
        return BackendError(f"Redis answered with an error: {text}")
    return exc


@contextmanager
def redis_errors() -> Iterator[None]:
    """Redis's errors as ours: one root exception for callers to catch."""
    try:
        yield
    except (RedisError, RedisClusterException) as exc:
        raise translated(exc) from exc


def check_positive(
    what: str,
    value: object,
    maximum: float,
    error: type[ConfigError] = ConfigError,
    minimum: float = 0.0,
) -> float:
    """``value`` as a float if it is a finite number in (0, maximum] (and at least
    ``minimum``), else ``error``."""
    bounds = f"[{minimum:g}, {maximum:g}]" if minimum else f"(0, {maximum:g}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{what} must be a number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise error(f"{what} must be a finite number in {bounds}") from None
    if not math.isfinite(number) or number <= 0 or number < minimum or number > maximum:
        raise error(f"{what} must be a finite number in {bounds}, got {_shown(value)}")
    return number


def check_cost(cost: object) -> float:
    return check_positive("cost", cost, MAX_COST, InvalidCost, MIN_COST)


def check_hold(hold: object) -> int:
    """A slot hold in seconds, as whole milliseconds (at least 1)."""
    return max(1, int(check_positive("hold (seconds)", hold, MAX_HOLD, InvalidCost) * 1000))


def as_slot(held: object) -> Slot | None:
    """The slot of a Decision, a Slot, or its text form; None for a decision holding none."""
    if isinstance(held, Decision):
        return held.slot
    if isinstance(held, Slot):
        return held
    if isinstance(held, (str, bytes)):
        try:
            return Slot.parse(held)
        except ValueError as exc:
            raise InvalidName(str(exc)) from None
    raise InvalidName(f"expected a Decision, a Slot or its text, got {_shown(held)}")


def concurrency_scope(scope: str | Scope) -> str:
    """The name of a scope whose slots can be counted (not a tenant default)."""
    parsed = scope if isinstance(scope, Scope) else Scope.parse(scope)
    if parsed.is_default:
        raise InvalidScope(
            f"{parsed} is a default: each tenant has its own slots (ask about tenant:<t>...)"
        )
    return str(parsed)


def pause_scope(scope: str | Scope) -> str:
    """The name of a scope that can be paused: any concrete scope (not a tenant default)."""
    parsed = scope if isinstance(scope, Scope) else Scope.parse(scope)
    if parsed.is_default:
        raise InvalidScope(
            f"{parsed} is a default: pause one tenant (tenant:<t>, tenant:<t>:queue:<q>), "
            f"a queue, a priority, or global"
        )
    return str(parsed)


def _as_limit(limit: object) -> Limit:
    parsed = Limit.parse(limit) if isinstance(limit, str) else limit
    if not isinstance(parsed, Limit):
        raise InvalidCost(f"limit must be a Limit or a string like '100/s', got {_shown(limit)}")
    return parsed


#: What ``set_limit`` takes: one limit, or the windows of a scope (every one must admit).
LimitSpec = Limit | str | Sequence[Limit | str]


def limit_windows(scope: str, limit: object) -> tuple[Limit, ...]:
    """A scope's limit as its windows: one ``Limit`` (or its text), or a list of them."""
    if isinstance(limit, (list, tuple)):
        check_window_count(scope, len(limit))
        return check_windows(scope, tuple(_as_limit(item) for item in limit))
    return (_as_limit(limit),)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LimiterCore:
    """Validation, key naming and reply parsing for one namespace."""

    def __init__(
        self,
        *,
        namespace: str,
        prefix: str,
        fail_mode: FailMode,
        closed_retry_ms: float,
        counter_retention: float,
    ) -> None:
        if fail_mode not in ("raise", "open", "closed"):
            raise InvalidName(
                f"fail_mode must be 'raise', 'open' or 'closed', got {_shown(fail_mode)}"
            )
        # Both become waits and expiries: bounded like the waits the scripts compute.
        retry_ms = check_positive("closed_retry_ms", closed_retry_ms, MAX_WAIT * 1000, InvalidCost)
        retention = check_positive(
            "counter_retention (seconds)", counter_retention, MAX_WAIT, InvalidCost
        )
        self.keys = KeySpace(prefix=prefix, namespace=namespace)
        self.fail_mode: FailMode = fail_mode
        self.closed_retry_ms = retry_ms
        self.retention_ms = max(1, int(retention * 1000))
        self.backend_failures = 0
        # Fail-mode decisions not yet added to the namespace's counters (the shared hash's
        # f:<mode>, read by the metrics): Redis was away when they were made, so they are
        # added by the first call after it is back (``fail_mode_counts``).
        self.fail_mode_pending: dict[str, int] = {}
        self._failing_since: float | None = None
        self._credentials_logged = float("-inf")
        self._calls: dict[tuple[object, ...], ScriptCall] = {}

    # -- decisions ---------------------------------------------------------------------
    def decision_call(
        self,
        mode: Mode,
        tenant: str,
        queue: str | None,
        priority: str | None,
        cost: float,
        hold: float | None = None,
    ) -> ScriptCall:
        # Workers decide for the same few (tenant, queue, priority, cost) over and over:
        # validating and naming keys once per combination saves the client a few
        # microseconds per decision. Only exact ints and floats are cached as costs, so
        # True (== 1) or "1" are still refused by check_cost.
        memo_key = (mode, tenant, queue, priority, cost, hold)
        cacheable = (type(cost) is int or type(cost) is float) and (
            hold is None or type(hold) is int or type(hold) is float
        )
        if cacheable:
            try:
                call = self._calls.get(memo_key)
            except Exception:  # an unhashable name (refused below), or one whose hash or
                # == raise (a str subclass: judged by its text below, as everywhere else)
                cacheable = False
            else:
                if call is not None:
                    return call
        check_name("tenant", tenant)
        if queue is not None:
            check_name("queue", queue)
        if priority is not None:
            check_priority(priority)
        amount = check_cost(cost)
        hold_arg = "" if hold is None else str(check_hold(hold))
        k = self.keys
        # lua/acquire.lua: queue, priority, cost, retention, mode, slot hold, trailing
        # defaults left out ("" stands for a default). Each key or argument costs Redis about
        # 1,300 instructions (2-3% of a decision) to parse and hand to Lua, so the usual call
        # sends two keys and no argument, or the queue alone; the tenant and the config hash
        # are read from the keys' names.
        cost_arg = "1" if amount == 1 else repr(amount)
        keep = "" if self.retention_ms == DEFAULT_RETENTION_MS else str(self.retention_ms)
        args = [queue or "", priority or "", cost_arg, keep, mode, hold_arg]
        defaults = ("", "", "1", "", "acquire", "")
        while args and args[-1] == defaults[len(args) - 1]:
            args.pop()
        # Encoded once here: redis-py sends bytes as they are.
        call = ScriptCall(
            [key.encode() for key in (k.tenant(tenant), k.shared)],
            [arg.encode() for arg in args],
        )
        if cacheable:
            if len(self._calls) >= MEMO_SIZE:
                self._calls.clear()
            self._calls[memo_key] = call
        return call

    def decision(self, reply: bytes | str, cost: float) -> Decision:
        text = reply.decode() if isinstance(reply, bytes) else reply
        if text.startswith("-1 "):
            _, burst, scope, _ = text.split(" ", 3)
            raise CostExceedsBurst(scope, float(cost), float(burst))
        if self._failing_since is not None:
            log.warning(
                "queue-ratelimit: Redis reachable again after %.1fs; enforcing limits",
                time.monotonic() - self._failing_since,
            )
            self._failing_since = None
        return parse_reply(text)

    def decision_failed(self, exc: Exception) -> Decision:
        """After a Redis error on a decision: the fail mode's decision when Redis is
        unreachable and the mode allows one, else the error, as ours, raised."""
        error = translated(exc)
        if isinstance(error, BackendUnavailable):
            fallback = self.unavailable(error)
            if fallback is not None:
                return fallback
        elif isinstance(exc, _REFUSED_CREDENTIALS):
            self.credentials_refused(error)
        if error is exc:
            raise exc
        raise error from exc

    def unavailable(self, error: Exception) -> Decision | None:
        """The fail-mode decision when Redis cannot be reached (None means re-raise)."""
        self.backend_failures += 1
        self.count_fail_mode(self.fail_mode)
        if self._failing_since is None:
            self._failing_since = time.monotonic()
            log.error(
                "queue-ratelimit: Redis unreachable (%s); failing %s until it returns",
                error,
                self.fail_mode.upper(),
            )
        if self.fail_mode == "open":
            return Decision(allowed=True, degraded=True)
        if self.fail_mode == "closed":
            return Decision(allowed=False, wait_ms=self.closed_retry_ms, degraded=True)
        return None

    def credentials_refused(self, error: Exception) -> None:
        """Say loudly (once a minute while it lasts) that Redis refuses the credentials:
        every decision raises ``BackendError`` meanwhile, whatever the fail mode."""
        now = time.monotonic()
        if now - self._credentials_logged >= 60.0:
            self._credentials_logged = now
            log.error("queue-ratelimit: %s", error)

    def count_fail_mode(self, mode: str) -> None:
        """One more decision made by the fail mode ``mode`` ("open", "closed" or "raise")
        while Redis was unreachable, to be added to the namespace's counters later."""
        self.fail_mode_pending[mode] = self.fail_mode_pending.get(mode, 0) + 1

    def queue_fail_mode_counts(self, pipe: Any) -> dict[str, int]:
        """Take the pending fail-mode counts and queue their addition to the namespace's
        counters on ``pipe`` (a redis-py pipeline); returns them, for ``fail_mode_unsent``
        should the pipeline fail."""
        pending, self.fail_mode_pending = self.fail_mode_pending, {}
        for mode, n in pending.items():
            pipe.hincrby(self.keys.shared, f"f:{mode}", n)
        return pending

    def fail_mode_unsent(self, counts: dict[str, int]) -> None:
        for mode, n in counts.items():
            self.fail_mode_pending[mode] = self.fail_mode_pending.get(mode, 0) + n

    # -- concurrency slots -------------------------------------------------------------
    def slot_call(self, mode: Literal["release", "extend"], slot: Slot, hold_ms: int) -> ScriptCall:
        k = self.keys
        scopes = [concurrency_scope(scope) for scope in slot.scopes]
        if not slot.token or " " in slot.token:
            raise InvalidName(f"not a slot token: {_shown(slot.token)}")
        p = k.scheduler_prefixes
        return ScriptCall(
            [k.config, k.shared], [slot.token, mode, hold_ms, p.waiters, p.parked, *scopes]
        )

    def set_concurrency_call(self, scope: str | Scope, n: object, actor: str) -> ScriptCall:
        parsed = scope if isinstance(scope, Scope) else Scope.parse(scope)
        if parsed.kind == "priority":
            raise InvalidScope(
                f"{parsed}: concurrency caps apply to tenant, queue and global scopes; "
                f"a priority takes a rate limit (set_limit)"
            )
        field = CONCURRENCY_PREFIX + str(parsed)
        if n is None:
            return self.config_call("del", field, "", actor)
        return self.config_call("set", field, str(check_concurrency(n)), actor)

    @staticmethod
    def concurrency(raw: dict[object, object]) -> dict[str, int]:
        """Concurrency caps by scope, from the config hash."""
        n = len(CONCURRENCY_PREFIX)
        return dict(
            sorted(
                (_text(f)[n:], int(_text(v)))
                for f, v in raw.items()
                if _text(f).startswith(CONCURRENCY_PREFIX)
            )
        )

    # -- configuration -----------------------------------------------------------------
    def config_call(
        self, op: Literal["set", "del"], field: str, value: str, actor: str
    ) -> ScriptCall:
        k = self.keys
        return ScriptCall([k.config, k.audit, k.shared], [op, field, value, actor, AUDIT_LENGTH])

    def set_limit_call(
        self, scope: str | Scope, limit: LimitSpec, shadow: bool, actor: str
    ) -> ScriptCall:
        name = scope_name(scope)
        windows = limit_windows(name, limit)
        return self.config_call("set", name, encode_limit(windows, bool(shadow)), actor)

    def set_exempt_call(self, tenant: str, mode: ExemptMode | None, actor: str) -> ScriptCall:
        field = f"exempt:{check_name('tenant', tenant)}"
        if mode is None:
            return self.config_call("del", field, "", actor)
        if mode not in ("tenant", "all"):
            raise InvalidName(f"exempt mode must be 'tenant', 'all' or None, got {_shown(mode)}")
        return self.config_call("set", field, mode, actor)

    # -- pauses ------------------------------------------------------------------------
    def pause_call(self, scope: str | Scope, seconds: object, actor: str) -> ScriptCall:
        field = PAUSE_PREFIX + pause_scope(scope)
        ms = check_positive("pause (seconds)", seconds, MAX_PAUSE) * 1000
        k = self.keys
        # At least 1 ms (lua/config.lua refuses less); a float's digits as they are.
        return ScriptCall(
            [k.config, k.audit, k.shared, k.pauses],
            ["pause", field, repr(max(1.0, ms)), actor, AUDIT_LENGTH, MAX_PAUSES],
        )

    def resume_call(self, scope: str | Scope, actor: str) -> ScriptCall:
        k = self.keys
        field = PAUSE_PREFIX + pause_scope(scope)
        return ScriptCall(
            [k.config, k.audit, k.shared, k.pauses], ["resume", field, "", actor, AUDIT_LENGTH]
        )

    def pause_result(self, call: ScriptCall, reply: list[object]) -> Pause:
        """The pause a pause call left in place (longer than asked when one was running).

        Raises:
            TooManyPauses: a new pause was refused, as many as the bound run already.
        """
        scope = str(call.args[1])[len(PAUSE_PREFIX) :]
        if int(reply[0]) == -2:  # type: ignore[call-overload]
            raise TooManyPauses(self.keys.namespace, scope, int(reply[2]))  # type: ignore[call-overload]
        until_ms, now_ms = int(reply[2]), int(reply[3])  # type: ignore[call-overload]
        return Pause(scope, until_ms, float(max(0, until_ms - now_ms)))

    @staticmethod
    def pauses(raw: dict[object, object], now_ms: float) -> dict[str, Pause]:
        """Pauses still running at ``now_ms`` (Redis time), by scope, from the config hash."""
        out = {}
        for f, v in raw.items():
            name = _text(f)
            if not name.startswith(PAUSE_PREFIX):
                continue
            try:
                until_ms = int(float(_text(v)))
            except ValueError:
                raise BackendError(f"queue-ratelimit: corrupt {name}: {_shown(v)}") from None
            if until_ms > now_ms:
                scope = name[len(PAUSE_PREFIX) :]
                out[scope] = Pause(scope, until_ms, until_ms - now_ms)
        return dict(sorted(out.items()))

    @staticmethod
    def config_version(reply: list[object], field: str, must_exist: bool) -> int:
        version: int = int(reply[0])  # type: ignore[call-overload]
        if version == -1:
            if must_exist:
                raise LimitNotFound(field)
            return 0
        return version

    @staticmethod
    def limits(raw: dict[object, object]) -> dict[str, ScopeLimit]:
        out = {}
        for field, value in raw.items():
            name = _text(field)
            if name.startswith(
                ("exempt:", "mode:", "weight:", CONCURRENCY_PREFIX, PAUSE_PREFIX, "_")
            ):
                continue
            out[name] = decode_limit(name, _text(value))
        return dict(sorted(out.items()))

    @staticmethod
    def exemptions(raw: dict[object, object]) -> dict[str, ExemptMode]:
        return {
            _text(f)[len("exempt:") :]: _text(v)  # type: ignore[misc]
            for f, v in sorted(raw.items(), key=lambda kv: _text(kv[0]))
            if _text(f).startswith("exempt:")
        }

    @staticmethod
    def audit_entries(raw: list[tuple[object, dict[object, object]]]) -> list[AuditEntry]:
        entries = []
        for entry_id, fields in raw:
            f = {_text(k): _text(v) for k, v in fields.items()}
            entries.append(
                AuditEntry(
                    id=_text(entry_id),
                    version=int(f["version"]),
                    op=f["op"],
                    field=f["field"],
                    old=f["old"],
                    new=f["new"],
                    actor=f["actor"],
                    at_ms=int(float(f["at_ms"])),
                )
            )
        return entries


class LimiterBase:
    """What ``Limiter`` and ``AsyncLimiter`` share: the rules, the client, the scripts."""

    shards: int = 1

    @classmethod
    def _sharded(cls) -> type[Any] | None:
        """The class ``cls(..., shards=N)`` makes for N > 1 (None: ``cls`` takes no shards)."""
        return None

    def __new__(cls, client: Any = None, *args: Any, shards: int = 1, **options: Any) -> Any:
        # (Only the plain classes choose: a subclass, sharded or not, is made as it is.)
        sharded = cls._sharded() if shards != 1 and "_sharded" in cls.__dict__ else None
        if sharded is not None:
            check_shards(shards)
            return super().__new__(sharded)
        return super().__new__(cls)

    def __init__(
        self,
        client: Any,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        prefix: str = DEFAULT_PREFIX,
        fail_mode: FailMode = "raise",
        closed_retry_ms: float = 1000.0,
        counter_retention: float = DEFAULT_RETENTION_MS / 1000,
        eviction: EvictionMode = "warn",
        shards: int = 1,
        rebalance_interval: float | None = None,
    ) -> None:
        # (The sharded classes, which cls(shards=N) makes, pass no shards here.)
        if check_shards(shards) != 1:
            plain = next(c for c in type(self).__mro__ if "_sharded" in vars(c))
            raise ConfigError(f"shards > 1: make the limiter with {plain.__name__}(...) itself")
        self._core = LimiterCore(
            namespace=namespace,
            prefix=prefix,
            fail_mode=fail_mode,
            closed_retry_ms=closed_retry_ms,
            counter_retention=counter_retention,
        )
        self.client = client
        # A cluster client made elsewhere reads its script calls' keys as ours do (_client).
        read_function_keys_locally(client)
        self._scripts = Scripts(client)
        self.eviction = check_eviction_mode(eviction)
        if self.eviction != "ignore":
            # One look at the server's maxmemory-policy, before the first script call.
            self._scripts.before_first_call(self._eviction_check)
        # The shard count the namespace is used with, recorded or compared (_shard_count):
        # one round trip before the first script call (self.shards is read then, once a
        # sharded class has set it).
        self._scripts.before_first_call(self._shard_check)

    def _eviction_check(self) -> Any:
        """Warn about (or refuse) a server that evicts keys: ``Limiter``/``AsyncLimiter``."""
        raise NotImplementedError

    def _shard_check(self) -> Any:
        """Record this limiter's shard count at the namespace's home, or raise
        ``ShardCountMismatch`` when another is recorded: ``Limiter``/``AsyncLimiter``."""
        raise NotImplementedError

    def recheck_shards(self) -> None:
        """Check the namespace's recorded shard count again before the next script call
        (a sharded limiter's rebalance tick saw it change)."""
        self._scripts.before_first_call(self._shard_check)

    def _queue_record_reads(self, pipe: Any, keys: Sequence[str]) -> None:
        """``preview``'s reads of the recorded minutes ``keys`` (a sharded limiter reads
        every shard's)."""
        for key in keys:
            pipe.hgetall(key)

    def _recorded(self, replies: Sequence[Any]) -> list[Any]:
        """The recorded minutes from the replies to ``_queue_record_reads``."""
        return list(replies)

    @property
    def namespace(self) -> str:
        return self._core.keys.namespace

    @property
    def keys(self) -> KeySpace:
        """The key layout of this limiter's namespace."""
        return self._core.keys

    @property
    def backend_failures(self) -> int:
        """Decisions made by the fail mode because Redis was unreachable."""
        return self._core.backend_failures
