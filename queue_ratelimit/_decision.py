"""What a decision returns: ``Decision`` (and the concurrency ``Slot`` it may hold), and the
configured limit of a scope."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType

from ._limit import Limit
from ._scopes import _shown


@dataclass(frozen=True, slots=True)
class Slot:
    """Concurrency slots held by one admitted job, one per concurrency cap that applied.

    Give it back with ``Limiter.release`` when the job ends (or let its lease run out);
    ``Limiter.extend_slot`` renews it. ``str(slot)`` is a compact text form (for a message
    header, say) that ``Slot.parse`` reads back.

    Attributes:
        token: the holder's token, unique to this admission.
        scopes: the capped scopes it holds a slot of, narrowest first (a tenant default's
            slot is named after the tenant: ``tenant:acme``).
    """

    token: str
    scopes: tuple[str, ...]

    def __str__(self) -> str:
        return " ".join((self.token, *self.scopes))

    @classmethod
    def parse(cls, text: str | bytes) -> Slot:
        """Read ``str(slot)`` back. Raises ``ValueError`` for text that is not one."""
        parts = (text.decode() if isinstance(text, bytes) else text).split()
        if len(parts) < 2:
            raise ValueError(f"not a concurrency slot: {_shown(text)}")
        return cls(parts[0], tuple(parts[1:]))


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of ``acquire`` / ``peek`` / ``refund``.

    Attributes:
        allowed: True when every enforced bucket admitted the cost.
        wait_ms: 0 when allowed; otherwise how long until *every* applicable bucket holds
            the cost (the longest of their waits), in milliseconds; at most 3,650 days
            (only a huge cost on a very slow bucket waits longer).
        remaining: tokens left per scope after this decision (before it, for ``peek``).
        denied_by: the scope whose wait is longest, or None when allowed.
        would_deny: scopes in shadow (dry-run) mode that would have denied.
        degraded: True when Redis was unreachable and the fail mode decided instead.
        slot: when allowed under one or more concurrency caps, the slots taken (release
            them with ``Limiter.release`` when the job ends); None when no cap applied.
        concurrency: True when ``denied_by`` is a concurrency cap (its slots are all held;
            ``wait_ms`` is then the time until the earliest of their leases runs out, an
            upper bound: a release frees a slot sooner).
        paused: True when ``denied_by`` is a paused scope (``Limiter.pause``); ``wait_ms``
            is then the time left of the pause (``resume`` ends it sooner).
    """

    allowed: bool
    wait_ms: float = 0.0
    remaining: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    denied_by: str | None = None
    would_deny: tuple[str, ...] = ()
    degraded: bool = False
    slot: Slot | None = None
    concurrency: bool = False
    paused: bool = False

    @property
    def retry_after(self) -> float:
        """``wait_ms`` in seconds, handy for ``countdown=`` or ``Retry-After``."""
        return self.wait_ms / 1000.0

    def __bool__(self) -> bool:
        return self.allowed


@dataclass(frozen=True, slots=True)
class ScopeLimit:
    """A limit as configured in Redis for one scope."""

    scope: str
    limit: Limit
    shadow: bool = False


def encode_limit(limit: Limit, shadow: bool) -> str:
    """The config-hash value the Lua scripts parse: ``"<rate> <per> <burst> <flags>"``."""
    return f"{limit.rate!r} {limit.per!r} {limit.capacity!r} {'s' if shadow else '-'}"


def decode_limit(scope: str, value: str) -> ScopeLimit:
    rate, per, burst, flags = value.split(" ")
    return ScopeLimit(scope, Limit(float(rate), float(per), float(burst)), "s" in flags)


# A frozen dataclass sets each field through object.__setattr__ in __init__, which is most
# of the client's cost of a decision beyond the round trip (~2 us of ~3). The slots' own
# descriptors set the same fields directly; this is only used for replies just parsed.
_new = object.__new__
(
    _set_allowed,
    _set_wait,
    _set_remaining,
    _set_denied_by,
    _set_would_deny,
    _set_degraded,
    _set_slot,
    _set_concurrency,
    _set_paused,
) = (
    Decision.__dict__[name].__set__
    for name in (
        "allowed",
        "wait_ms",
        "remaining",
        "denied_by",
        "would_deny",
        "degraded",
        "slot",
        "concurrency",
        "paused",
    )
)


def _decision(
    allowed: bool,
    wait_ms: float,
    remaining: Mapping[str, float],
    denied_by: str | None,
    would_deny: tuple[str, ...],
    slot: Slot | None = None,
    concurrency: bool = False,
    paused: bool = False,
) -> Decision:
    decision: Decision = _new(Decision)
    _set_allowed(decision, allowed)
    _set_wait(decision, wait_ms)
    _set_remaining(decision, remaining)
    _set_denied_by(decision, denied_by)
    _set_would_deny(decision, would_deny)
    _set_degraded(decision, False)
    _set_slot(decision, slot)
    _set_concurrency(decision, concurrency)
    _set_paused(decision, paused)
    return decision


_PERIODS = {1.0: "s", 60.0: "m", 3600.0: "h", 86400.0: "d"}
# Pauses are config fields "pause:<scope>" = Redis time (ms) their pause ends (lua/config.lua).
PAUSE_PREFIX = "pause:"


@dataclass(frozen=True, slots=True)
class Pause:
    """A paused scope: nothing of it is admitted until ``until_ms``.

    Attributes:
        scope: the paused scope.
        until_ms: when the pause ends, in milliseconds since the epoch on Redis's clock.
        remaining_ms: how long it still had to run when it was read (or set).
    """

    scope: str
    until_ms: int
    remaining_ms: float

    @property
    def remaining(self) -> float:
        """``remaining_ms`` in seconds."""
        return self.remaining_ms / 1000.0


def pause_fields(pause: Pause) -> dict[str, str | float | int]:
    """A pause as plain fields (the CLI's JSON, the admin API)."""
    return {
        "scope": pause.scope,
        "until_ms": pause.until_ms,
        "remaining_s": round(pause.remaining, 3),
    }


def pause_text(value: str) -> str:
    """A stored pause end as people read it: ``until 2024-05-01T12:00:30.000Z``."""
    try:
        until_ms = int(float(value))
    except ValueError:
        return value
    at = datetime.fromtimestamp(until_ms / 1000, UTC)
    return f"until {at.strftime('%Y-%m-%dT%H:%M:%S')}.{until_ms % 1000:03d}Z"


def format_limit(limit: Limit) -> str:
    """A limit as text that ``Limit.parse`` reads back: ``"100/s"``, ``"6000/m"``, ``"5/2s"``."""
    unit = _PERIODS.get(limit.per)
    if unit is not None:
        return f"{limit.rate:.15g}/{unit}"
    return f"{limit.rate:.15g}/{limit.per:.15g}s"


def limit_fields(item: ScopeLimit) -> dict[str, str | float | bool]:
    """A configured limit as plain fields (the CLI's JSON, the admin API)."""
    lim = item.limit
    return {
        "limit": format_limit(lim),
        "rate": lim.rate,
        "per": lim.per,
        "burst": lim.capacity,
        "shadow": item.shadow,
    }


def readable_config_value(field: str, value: str) -> str:
    """A config value as people write it (audit logs, dashboards): limits as
    ``100/s burst 100``, absence as ``-``, anything else as stored."""
    if not value:
        return "-"
    if field.startswith(PAUSE_PREFIX):
        return pause_text(value)
    if field.startswith(("exempt:", "mode:", "weight:", "conc:")):
        return value
    try:
        item = decode_limit(field, value)
    except ValueError:  # not a limit we can read (Limit refuses it with a ValueError too)
        return value
    shadow = " shadow" if item.shadow else ""
    return f"{format_limit(item.limit)} burst {item.limit.capacity:.15g}{shadow}"


def parse_reply(reply: bytes | str) -> Decision:
    """Turn the acquire script's flat reply into a ``Decision``:
    ``"<status> <wait_ms> <denied_by|-> <scope> <remaining> ... | <would-deny> ..."``,
    status 2 followed by ``" # <slot token> <cap scope> ..."``, a concurrency cap's denial
    as ``"!<scope>"``, a pause's as ``"~<scope>"`` (status -1 is handled by callers)."""
    parts = (reply.decode() if isinstance(reply, bytes) else reply).split(" ")
    bar = parts.index("|")
    if bar == 5:  # one bucket, the common case
        remaining = {parts[3]: float(parts[4])}
    else:
        remaining = {parts[i]: float(parts[i + 1]) for i in range(3, bar, 2)}
    denied_by = parts[2]
    status = parts[0]
    if status == "1" or (status == "0" and denied_by[0] not in "!~"):
        return _decision(
            status == "1",
            float(parts[1]),
            MappingProxyType(remaining),
            None if denied_by == "-" else denied_by,
            tuple(parts[bar + 1 :]),
        )
    if status == "0":  # denied by a concurrency cap ("!") or a pause ("~")
        return _decision(
            False,
            float(parts[1]),
            MappingProxyType(remaining),
            denied_by[1:],
            tuple(parts[bar + 1 :]),
            concurrency=denied_by[0] == "!",
            paused=denied_by[0] == "~",
        )
    hash_at = parts.index("#")
    return _decision(
        True,
        0.0,
        MappingProxyType(remaining),
        None,
        tuple(parts[bar + 1 : hash_at]),
        Slot(parts[hash_at + 1], tuple(parts[hash_at + 2 :])),
    )
