"""What a decision returns: ``Decision`` (and the concurrency ``Slot`` it may hold), and the
configured limit of a scope."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from ._errors import InvalidLimit
from ._limit import MAX_WINDOWS, Limit
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
        remaining: tokens left per scope after this decision (before it, for ``peek``); a
            limit with credit counts its bank in too, and a scope with several windows has
            its shortest window under its own name and each longer one under
            ``"<scope> (<window>)"``, e.g. ``"tenant:acme (10000/d)"``.
        denied_by: the scope whose wait is longest, or None when allowed.
        would_deny: scopes in shadow (dry-run) mode that would have denied.
        degraded: True when Redis was unreachable and the fail mode decided instead.
        slot: when allowed under one or more concurrency caps, the slots taken (release
            them with ``Limiter.release`` when the job ends); None when no cap applied.
        concurrency: True when ``denied_by`` is a concurrency cap (its slots are all held;
            ``wait_ms`` is then the time until the earliest of their leases runs out, an
            upper bound: a release frees a slot sooner).
        credit: the credit bank of each scope whose limit has burst credits (part of its
            ``remaining``), after this decision.
        window: when ``denied_by`` has several windows, the one that bound (``"10000/d"``);
            None otherwise (``denied_by`` itself is the scope's name either way).
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
    credit: Mapping[str, float] = field(default_factory=lambda: _NO_CREDIT)
    window: str | None = None
    paused: bool = False

    @property
    def retry_after(self) -> float:
        """``wait_ms`` in seconds, handy for ``countdown=`` or ``Retry-After``."""
        return self.wait_ms / 1000.0

    def __bool__(self) -> bool:
        return self.allowed


_NO_CREDIT: Mapping[str, float] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ScopeLimit:
    """A limit as configured in Redis for one scope.

    ``windows``: every window of the scope, as set (``limit`` is the first); one for a
    scope with a single limit.
    """

    scope: str
    limit: Limit
    shadow: bool = False
    windows: tuple[Limit, ...] = ()
    # Where each window's state is kept when not where it would be by default (a field
    # suffix, "" for the scope's own field; lua/config.lua marks it when windows change):
    # storage, not configuration, so it takes no part in comparisons.
    _places: tuple[str | None, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.windows:
            object.__setattr__(self, "windows", (self.limit,))


def check_window_count(scope: str, count: int) -> None:
    """``InvalidLimit`` unless a scope's limit of ``count`` windows may be: 1 to MAX_WINDOWS.
    Checked before the windows are parsed: a list of 250,000 (a megabyte of text) took a
    second to parse, only to be refused for its length."""
    if not count:
        raise InvalidLimit(f"the limit of {scope} needs at least one window, got none")
    if count > MAX_WINDOWS:
        raise InvalidLimit(
            f"the limit of {scope} has {count} windows; at most {MAX_WINDOWS} are allowed"
        )


def check_windows(scope: str, windows: tuple[Limit, ...]) -> tuple[Limit, ...]:
    """``windows`` if they can be a scope's limit: 1 to MAX_WINDOWS, no window twice (the
    same rate over the same period), else ``InvalidLimit``."""
    check_window_count(scope, len(windows))
    seen = set()
    for w in windows:
        if (w.rate, w.per) in seen:
            raise InvalidLimit(
                f"the limit of {scope} gives the window {format_limit(w)} twice: give each once"
            )
        seen.add((w.rate, w.per))
    return windows


def _flags(limit: Limit, shadow: bool) -> str:
    # "s" shadow, "c<credit>" burst credits (an older version ignores the latter: it
    # enforces the limit without credit, never more than the limit with it).
    flags = "s" if shadow else "-"
    return flags if limit.credit is None else f"{flags}c{limit.credit!r}"


def encode_limit(limit: Limit | tuple[Limit, ...], shadow: bool) -> str:
    """The config-hash value the Lua scripts parse: ``"<rate> <per> <burst> <flags>"``,
    one per window, separated by ``;``."""
    windows = (limit,) if isinstance(limit, Limit) else limit
    return ";".join(f"{w.rate!r} {w.per!r} {w.capacity!r} {_flags(w, shadow)}" for w in windows)


def _decode_window(text: str) -> tuple[Limit, bool, str | None]:
    rate, per, burst, flags = text.split(" ")
    # (flags: "s" or "-", a place "@<suffix>" marked by lua/config.lua, "c<credit>".)
    shadow, _, credit = flags.partition("c")
    shadow, at, place = shadow.partition("@")
    limit = Limit(float(rate), float(per), float(burst), float(credit) if credit else None)
    return limit, "s" in shadow, place if at else None


def decode_limit(scope: str, value: str) -> ScopeLimit:
    windows = [_decode_window(text) for text in value.split(";")]
    places = tuple(place for _, _, place in windows)
    if all(place is None for place in places):
        places = ()
    first, shadow, _ = windows[0]
    if len(windows) == 1:
        return ScopeLimit(scope, first, shadow, _places=places)
    return ScopeLimit(scope, first, shadow, tuple(w for w, _, _ in windows), _places=places)


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
    _set_credit,
    _set_window,
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
        "credit",
        "window",
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
    credit: Mapping[str, float] = _NO_CREDIT,
    window: str | None = None,
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
    _set_credit(decision, credit)
    _set_window(decision, window)
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


def limit_fields(item: ScopeLimit) -> dict[str, Any]:
    """A configured limit as plain fields (the CLI's JSON, the admin API): its first window
    as before (``credit`` added when set), and ``windows`` when it has several."""
    lim = item.limit
    fields: dict[str, Any] = {
        "limit": format_limit(lim),
        "rate": lim.rate,
        "per": lim.per,
        "burst": lim.capacity,
        "shadow": item.shadow,
    }
    if lim.credit is not None:
        fields["credit"] = lim.credit
    if len(item.windows) > 1:
        fields["windows"] = [_window_fields(w) for w in item.windows]
    return fields


def _window_fields(lim: Limit) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "limit": format_limit(lim),
        "rate": lim.rate,
        "per": lim.per,
        "burst": lim.capacity,
    }
    if lim.credit is not None:
        fields["credit"] = lim.credit
    return fields


def describe_window(limit: Limit) -> str:
    """``100/s burst 100`` (and ``credit 50`` when set)."""
    credit = "" if limit.credit is None else f" credit {limit.credit:.15g}"
    return f"{format_limit(limit)} burst {limit.capacity:.15g}{credit}"


def readable_config_value(field: str, value: str) -> str:
    """A config value as people write it (audit logs, dashboards): limits as
    ``100/s burst 100`` (windows joined by ``+``), absence as ``-``, anything else as stored."""
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
    return " + ".join(describe_window(w) for w in item.windows) + shadow


def _extended(parts: list[str], bar: int) -> tuple[dict[str, float], dict[str, float], str]:
    """Remaining tokens, credit banks and denied_by of a reply with credit (``<tokens>:<bank>``)
    or windows (``<scope>(<window>)``), as ``Decision`` shows them."""
    remaining: dict[str, float] = {}
    credit: dict[str, float] = {}
    for i in range(3, bar, 2):
        name, tokens = parts[i], parts[i + 1]
        if name[-1] == ")":
            name = name.replace("(", " (", 1)
        left, colon, bank = tokens.partition(":")
        remaining[name] = float(left)
        if colon:
            credit[name] = float(bank)
    return remaining, credit, parts[2]


def parse_reply(reply: bytes | str) -> Decision:
    """Turn the acquire script's flat reply into a ``Decision``:
    ``"<status> <wait_ms> <denied_by|-> <scope> <remaining> ... | <would-deny> ..."``,
    status 2 followed by ``" # <slot token> <cap scope> ..."``, a concurrency cap's denial
    as ``"!<scope>"``, a pause's as ``"~<scope>"``, a window's as ``"<scope>(<window>)"``, a
    credit bucket's remaining as ``"<tokens>:<bank>"`` (status -1 is handled by callers)."""
    text = reply.decode() if isinstance(reply, bytes) else reply
    parts = text.split(" ")
    bar = parts.index("|")
    credit: Mapping[str, float] = _NO_CREDIT
    window = None
    try:
        if bar == 5:  # one bucket, the common case
            remaining = {parts[3]: float(parts[4])}
        else:
            remaining = {parts[i]: float(parts[i + 1]) for i in range(3, bar, 2)}
        plain = bar == 5 or ")" not in text
    except ValueError:  # a credit bucket's "<tokens>:<bank>"
        plain = False
    denied_by = parts[2]
    if not plain:
        remaining, banks, denied_by = _extended(parts, bar)
        credit = MappingProxyType(banks) if banks else _NO_CREDIT
        if denied_by[-1] == ")":
            denied_by, _, window = denied_by[:-1].partition("(")
    status = parts[0]
    if status == "1" or (status == "0" and denied_by[0] not in "!~"):
        return _decision(
            status == "1",
            float(parts[1]),
            MappingProxyType(remaining),
            None if denied_by == "-" else denied_by,
            tuple(parts[bar + 1 :]),
            None,
            False,
            credit,
            window,
        )
    if status == "0":  # denied by a concurrency cap ("!") or a pause ("~")
        return _decision(
            False,
            float(parts[1]),
            MappingProxyType(remaining),
            denied_by[1:],
            tuple(parts[bar + 1 :]),
            concurrency=denied_by[0] == "!",
            credit=credit,
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
        credit=credit,
    )
