"""What a proposed limit would have done to recent traffic: a *preview* of a change.

With recording on (``Limiter.set_recording``), every decision also counts, per second, the
cost admitted and the denials of each (tenant, queue) in a hash per minute
(``<base>:rec:<minute>``, see ``lua/buckets.lua``). A preview replays the work that ran in the
window through a token bucket with the proposed limit, one bucket per tenant for the
``tenant:*`` defaults, and reports how much of it would have had to wait, and for how long.

The replay is a fluid model at the recording's resolution: work recorded in a second
arrives at that second's start, each bucket starts the window full, waiting work is served
first in, first out, at the bucket's rate. It answers "what would this throttle?" for a
lowered or new limit. For a raised one, the work that ran cannot show what was turned
away; ``denied`` (the denials recorded for the same traffic) is that side of the answer.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ._core import LimiterCore, ScriptCall, _as_limit, _text, check_positive
from ._decision import decode_limit, format_limit
from ._errors import ConfigError
from ._keys import KeySpace
from ._limit import Limit
from ._scopes import ANY_TENANT, Scope, _shown

MIN_RECORDING = 60.0
MAX_RECORDING = 86_400.0
RECORD_FIELD = "mode:record"
EPSILON = 1e-9  # as the Lua's tolerance when comparing tokens with a cost


def recording_value(seconds: object) -> str:
    """The config value of ``mode:record`` for ``seconds`` of recording, checked."""
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not MIN_RECORDING <= seconds <= MAX_RECORDING
    ):
        raise ConfigError(
            f"recording keeps {MIN_RECORDING:.0f} to {MAX_RECORDING:.0f} seconds of traffic, "
            f"got {_shown(seconds)}"
        )
    return str(math.ceil(seconds))


@dataclass(frozen=True, slots=True)
class BucketPreview:
    """One bucket's replay: ``scope`` is the bucket (``tenant:acme`` for a ``tenant:*``
    default), ``work`` the cost that ran in the window, ``delayed`` the part of it that would
    have waited, ``max_delay_s`` the longest wait and ``backlog_at_end`` the cost still
    waiting when the window closed."""

    scope: str
    work: float
    delayed: float
    max_delay_s: float
    backlog_at_end: float

    @property
    def delayed_fraction(self) -> float:
        return self.delayed / self.work if self.work else 0.0


@dataclass(frozen=True, slots=True)
class Preview:
    """What ``limit`` on ``scope`` would have done to the last ``window_s`` seconds of traffic.

    ``buckets`` lists every bucket the limit would have governed, most delayed first;
    ``current`` is the limit that governs that traffic now (``current_delayed``: the same
    replay under it, a check of the model, near 0 when the recorded work ran unhindered);
    ``denied`` counts the denials recorded for the same traffic.
    """

    scope: str
    limit: Limit
    window_s: float
    work: float
    delayed: float
    max_delay_s: float
    backlog_at_end: float
    denied: int
    buckets: tuple[BucketPreview, ...]
    current: Limit | None
    current_delayed: float | None

    @property
    def delayed_fraction(self) -> float:
        return self.delayed / self.work if self.work else 0.0


def replay(
    arrivals: Iterable[tuple[float, float]], limit: Limit, end: float
) -> tuple[float, float, float]:
    """Work arriving as (time in seconds, cost), in time order, through a bucket of
    ``limit`` that starts full: (cost delayed, longest wait in seconds, cost still waiting
    at ``end``). Waiting work is served in arrival order at the bucket's rate."""
    rate = limit.rate_per_second
    burst = limit.capacity
    tokens, at = burst, -math.inf  # tokens held at time `at` (no work waiting since)
    busy_until = -math.inf  # when the work waiting now will all have started
    delayed = longest = 0.0
    for when, cost in arrivals:
        if when >= busy_until:
            since = max(at, busy_until)
            available = burst if since == -math.inf else min(burst, tokens + rate * (when - since))
            if cost <= available + EPSILON:  # (0.7 - 0.4 s refills 0.29999999999999993)
                tokens, at = max(0.0, available - cost), when
                continue
            late = cost - available
            tokens, at = 0.0, when
            busy_until = when + late / rate
        else:
            late = cost
            busy_until += cost / rate
        delayed += late
        longest = max(longest, busy_until - when)
    backlog = max(0.0, (busy_until - end) * rate)
    return delayed, longest, backlog


@dataclass
class _Traffic:
    """Recorded traffic of one bucket: cost by second, denials."""

    work: dict[int, float]
    denied: int = 0


def _parse_field(field: str) -> tuple[str, str, int, bool] | None:
    parts = field.split(" ")
    if len(parts) not in (3, 4) or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2]), len(parts) == 4


def group_traffic(
    minutes: Mapping[int, Mapping[str, str]],
    scope: Scope,
    since: int,
    exempt: Mapping[str, str],
    own_limits: frozenset[str],
) -> dict[str, _Traffic]:
    """The recorded traffic the limit of ``scope`` governs, by bucket name, from the minute
    hashes (minute -> field -> value) and seconds ``since`` on.

    ``exempt`` maps exempt tenants to their mode; ``own_limits`` names the scopes that have a
    limit of their own, which a ``tenant:*`` default does not govern.
    """
    buckets: dict[str, _Traffic] = defaultdict(lambda: _Traffic({}))
    for minute, fields in minutes.items():
        for field, value in fields.items():
            parsed = _parse_field(field)
            if parsed is None:
                continue
            tenant, queue, second, is_denial = parsed
            at = minute * 60 + second
            if at < since:
                continue
            name = _bucket_of(scope, tenant, queue, exempt.get(tenant), own_limits)
            if name is None:
                continue
            traffic = buckets[name]
            if is_denial:
                traffic.denied += int(float(value))
            else:
                traffic.work[at] = traffic.work.get(at, 0.0) + float(value)
    return dict(buckets)


def _bucket_of(
    scope: Scope, tenant: str, queue: str, exempt: str | None, own_limits: frozenset[str]
) -> str | None:
    """The bucket of ``scope`` a decision of (tenant, queue) went through, or None: the
    concrete scope of its kind for that decision, if ``scope``'s limit is the one it follows
    (``Scope.limit_source``, with ``scope`` taken as configured)."""
    concrete: Scope | None
    if scope.kind == "global":
        concrete = scope
    elif scope.kind == "queue":
        concrete = scope if queue == scope.queue else None
    elif scope.tenant not in (ANY_TENANT, tenant):
        concrete = None
    elif scope.kind == "tenant":
        concrete = Scope("tenant", tenant=tenant)
    elif queue == scope.queue:
        concrete = Scope("tenant_queue", tenant=tenant, queue=queue)
    else:
        concrete = None
    if concrete is None:
        return None
    source = concrete.limit_source(own_limits | {str(scope)}, exempt)
    return str(concrete) if source == str(scope) else None


def preview(
    scope: Scope,
    limit: Limit,
    current: Limit | None,
    traffic: Mapping[str, _Traffic],
    window_s: float,
    end: float,
) -> Preview:
    """Replay ``traffic`` (from ``group_traffic``) under ``limit``, and under ``current``."""
    results = []
    current_delayed = 0.0 if current is not None else None
    denied = 0
    for name, recorded in traffic.items():
        arrivals = sorted(recorded.work.items())
        delayed, longest, backlog = replay(arrivals, limit, end)
        work = sum(cost for _, cost in arrivals)
        results.append(BucketPreview(name, work, delayed, longest, backlog))
        denied += recorded.denied
        if current is not None and current_delayed is not None:
            current_delayed += replay(arrivals, current, end)[0]
    results.sort(key=lambda b: (-b.delayed_fraction, -b.delayed, b.scope))
    return Preview(
        scope=str(scope),
        limit=limit,
        window_s=window_s,
        work=sum(b.work for b in results),
        delayed=sum(b.delayed for b in results),
        max_delay_s=max((b.max_delay_s for b in results), default=0.0),
        backlog_at_end=sum(b.backlog_at_end for b in results),
        denied=denied,
        buckets=tuple(results),
        current=current,
        current_delayed=current_delayed,
    )


def recording_kept(config: Mapping[str, str]) -> float:
    """Seconds of traffic recording keeps, from the config hash.

    Raises:
        ConfigError: recording is off.
    """
    kept = config.get(RECORD_FIELD)
    if not kept:
        raise ConfigError(
            "traffic is not being recorded, so there is nothing to preview a change on: turn "
            "recording on (Limiter.set_recording, `queue-ratelimit limits record 900`) and "
            "preview once it has seen the traffic"
        )
    return float(kept)


def recorded_minutes(keys: KeySpace, window_s: float, now: float) -> tuple[list[str], int]:
    """The minute hashes to read for a preview of the last ``window_s`` seconds, and the
    first second to replay."""
    since = math.floor(now - window_s)
    return [keys.record(m) for m in range(since // 60, math.floor(now) // 60 + 1)], since


def _minute_of(key: str) -> int:
    return int(key.rsplit(":", 1)[1])


def build_preview(
    config: Mapping[str, str],
    minutes: Mapping[str, Mapping[str, str]],
    scope: Scope,
    limit: Limit,
    since: int,
    window_s: float,
    now: float,
) -> Preview:
    """The preview from what was read: the config hash and the minute hashes (by key), all
    decoded to text."""
    exempt = {f[len("exempt:") :]: v for f, v in config.items() if f.startswith("exempt:")}
    own_limits = frozenset(
        f for f in config if not f.startswith(("exempt:", "mode:", "weight:", "conc:", "_"))
    )
    traffic = group_traffic(
        {_minute_of(key): fields for key, fields in minutes.items()},
        scope,
        since,
        exempt,
        own_limits,
    )
    source = scope.limit_source(config)
    return preview(
        scope,
        limit,
        None if source is None else decode_limit(source, config[source]).limit,
        traffic,
        window_s,
        now,
    )


def recording_call(core: LimiterCore, seconds: float | None, actor: str) -> ScriptCall:
    """The config write that keeps ``seconds`` of traffic for previews (None: stop)."""
    if seconds is None:
        return core.config_call("del", RECORD_FIELD, "", actor)
    return core.config_call("set", RECORD_FIELD, recording_value(seconds), actor)


def preview_reads(
    core: LimiterCore, config: Mapping[object, object], window: float | None, now: tuple[int, int]
) -> tuple[dict[str, str], list[str], int, float, float]:
    """For a preview: the config as text, the minute hashes to read, the first second to
    replay, the window and now (Redis ``TIME``) in seconds."""
    text = {_text(k): _text(v) for k, v in config.items()}
    kept = recording_kept(text)
    window_s = kept if window is None else check_positive("window", window, kept)
    at = now[0] + now[1] / 1e6
    keys, since = recorded_minutes(core.keys, window_s, at)
    return text, keys, since, window_s, at


def preview_read(
    scope: str | Scope,
    limit: Limit | str,
    config: dict[str, str],
    keys: list[str],
    minutes: list[dict[object, object]],
    since: int,
    window_s: float,
    now: float,
) -> Preview:
    """The preview from the replies to what ``preview_reads`` asked for."""
    parsed = scope if isinstance(scope, Scope) else Scope.parse(scope)
    if parsed.kind == "priority":
        raise ConfigError(
            f"{parsed}: recorded traffic is counted by tenant and queue, not by priority, "
            f"so a priority scope has no preview"
        )
    read = {
        key: {_text(f): _text(v) for f, v in fields.items()}
        for key, fields in zip(keys, minutes, strict=True)
    }
    return build_preview(config, read, parsed, _as_limit(limit), since, window_s, now)


def preview_fields(result: Preview, top: int = 20) -> dict[str, object]:
    """A preview as plain fields (the CLI's JSON, the admin API): the ``top`` most delayed
    buckets only, the totals over all of them."""

    def limit_text(limit: Limit | None) -> str | None:
        return None if limit is None else f"{format_limit(limit)} burst {limit.capacity:g}"

    return {
        "scope": result.scope,
        "limit": limit_text(result.limit),
        "window_s": result.window_s,
        "work": result.work,
        "delayed": result.delayed,
        "delayed_fraction": round(result.delayed_fraction, 6),
        "max_delay_s": round(result.max_delay_s, 3),
        "backlog_at_end": round(result.backlog_at_end, 3),
        "denied": result.denied,
        "current": limit_text(result.current),
        "current_delayed": result.current_delayed,
        "bucket_count": len(result.buckets),
        "buckets": [
            {
                "scope": b.scope,
                "work": b.work,
                "delayed": b.delayed,
                "delayed_fraction": round(b.delayed_fraction, 6),
                "max_delay_s": round(b.max_delay_s, 3),
                "backlog_at_end": round(b.backlog_at_end, 3),
            }
            for b in result.buckets[:top]
        ],
    }
