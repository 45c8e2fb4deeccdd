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
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from ._core import LimiterCore, LimitSpec, ScriptCall, _text, check_positive, limit_windows
from ._decision import decode_limit, describe_window, format_limit
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
    ``denied`` counts the denials recorded for the same traffic. For a scope with several
    windows, ``limit`` and ``current`` are the first and ``windows`` and ``current_windows``
    all of them (every one is replayed: work waits until each admits it).
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
    windows: tuple[Limit, ...] = ()
    current_windows: tuple[Limit, ...] = ()

    @property
    def delayed_fraction(self) -> float:
        return self.delayed / self.work if self.work else 0.0


def bucket_shapes(limit: Limit | Sequence[Limit]) -> tuple[tuple[float, float], ...]:
    """(tokens per second, capacity) of each bucket a limit makes, as lua/buckets.lua judges
    them: one per window (every one must admit), and a window with burst credits judged as
    one bucket of ``burst + credit`` (``with_credit``: bucket and bank fill together at the
    window's rate and are spent as one; the split between them changes no decision)."""
    windows = (limit,) if isinstance(limit, Limit) else tuple(limit)
    return tuple((w.rate_per_second, w.capacity + w.credit_cap) for w in windows)


def replay(
    arrivals: Iterable[tuple[float, float]], limit: Limit | Sequence[Limit], end: float
) -> tuple[float, float, float]:
    """Work arriving as (time in seconds, cost), in time order, through the buckets of
    ``limit`` (one ``Limit`` or a scope's windows, ``bucket_shapes``), which start full
    (a tenant new to the limiter, bank included): (cost delayed, longest wait in seconds,
    cost still waiting at ``end``).

    Waiting work is served in arrival order, as fast as every bucket allows at once: at the
    rate of the slowest empty bucket, each bucket losing what is served and refilling at its
    own rate, never above its capacity (so a per-second window that binds lets a daily one
    drain until the daily one binds instead)."""
    shapes = bucket_shapes(limit)
    rates = [rate for rate, _ in shapes]
    caps = [cap for _, cap in shapes]
    near_empty = [EPSILON * max(1.0, cap) for cap in caps]
    tokens = list(caps)
    at = -math.inf  # the time `tokens` and the queue are as of (full until the first arrival)
    queue: deque[list[float]] = deque()  # [arrival time, cost still waiting], oldest first
    waiting = delayed = longest = 0.0

    def elapse(until: float) -> None:
        """Let time pass to ``until``: refill, and serve what waits."""
        nonlocal at, waiting, longest
        if at == -math.inf:
            at = until
            return
        while at < until:
            if waiting <= 0:
                for i, cap in enumerate(caps):
                    tokens[i] = min(cap, tokens[i] + rates[i] * (until - at))
                at = until
                return
            # Something waits, so some bucket is empty: serve at the slowest empty one's
            # rate until the queue is served, another bucket runs dry, or `until`.
            empty = [i for i, t in enumerate(tokens) if t <= near_empty[i]]
            speed = min(rates[i] for i in empty)
            step, dry = min(until - at, waiting / speed), -1
            for i, t in enumerate(tokens):
                if i not in empty and rates[i] < speed and t / (speed - rates[i]) < step:
                    step, dry = t / (speed - rates[i]), i
            for i, cap in enumerate(caps):
                tokens[i] = min(cap, max(0.0, tokens[i] + (rates[i] - speed) * step))
            if dry >= 0:
                tokens[dry] = 0.0
            served, done = speed * step, 0.0
            while queue and queue[0][1] <= served - done + EPSILON:
                first = queue.popleft()
                done += first[1]
                longest = max(longest, at + done / speed - first[0])
            if queue:
                queue[0][1] -= served - done
            waiting = max(0.0, waiting - served) if queue else 0.0
            at += step

    for when, cost in arrivals:
        elapse(when)
        late = cost
        if waiting <= 0:
            available = min(tokens)
            if cost <= available + EPSILON:  # (0.7 - 0.4 s refills 0.29999999999999993)
                tokens[:] = [max(0.0, t - cost) for t in tokens]
                continue
            late = cost - available
            tokens[:] = [0.0 if t == available else max(0.0, t - available) for t in tokens]
        queue.append([when, late])
        waiting += late
        delayed += late
    elapse(max(end, at))
    backlog = waiting
    elapse(math.inf)  # (the longest wait may end after `end`)
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
    limit: Limit | tuple[Limit, ...],
    current: Limit | tuple[Limit, ...] | None,
    traffic: Mapping[str, _Traffic],
    window_s: float,
    end: float,
) -> Preview:
    """Replay ``traffic`` (from ``group_traffic``) under ``limit`` (one limit or a scope's
    windows), and under ``current``."""
    windows = (limit,) if isinstance(limit, Limit) else limit
    now_windows = () if current is None else (current,) if isinstance(current, Limit) else current
    results = []
    current_delayed = 0.0 if current is not None else None
    denied = 0
    for name, recorded in traffic.items():
        arrivals = sorted(recorded.work.items())
        delayed, longest, backlog = replay(arrivals, windows, end)
        work = sum(cost for _, cost in arrivals)
        results.append(BucketPreview(name, work, delayed, longest, backlog))
        denied += recorded.denied
        if current is not None and current_delayed is not None:
            current_delayed += replay(arrivals, now_windows, end)[0]
    results.sort(key=lambda b: (-b.delayed_fraction, -b.delayed, b.scope))
    return Preview(
        scope=str(scope),
        limit=windows[0],
        window_s=window_s,
        work=sum(b.work for b in results),
        delayed=sum(b.delayed for b in results),
        max_delay_s=max((b.max_delay_s for b in results), default=0.0),
        backlog_at_end=sum(b.backlog_at_end for b in results),
        denied=denied,
        buckets=tuple(results),
        current=now_windows[0] if now_windows else None,
        current_delayed=current_delayed,
        windows=windows,
        current_windows=now_windows,
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
    limit: tuple[Limit, ...],
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
        None if source is None else decode_limit(source, config[source]).windows,
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
    limit: LimitSpec,
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
    windows = limit_windows(str(parsed), limit)
    return build_preview(config, read, parsed, windows, since, window_s, now)


def preview_fields(result: Preview, top: int = 20) -> dict[str, object]:
    """A preview as plain fields (the CLI's JSON, the admin API): the ``top`` most delayed
    buckets only, the totals over all of them."""

    def limit_text(windows: tuple[Limit, ...]) -> str | None:
        if not windows:
            return None
        if len(windows) == 1 and windows[0].credit is None:  # (as it always read)
            return f"{format_limit(windows[0])} burst {windows[0].capacity:g}"
        return " + ".join(describe_window(w) for w in windows)

    return {
        "scope": result.scope,
        "limit": limit_text(result.windows or (result.limit,)),
        "window_s": result.window_s,
        "work": result.work,
        "delayed": result.delayed,
        "delayed_fraction": round(result.delayed_fraction, 6),
        "max_delay_s": round(result.max_delay_s, 3),
        "backlog_at_end": round(result.backlog_at_end, 3),
        "denied": result.denied,
        "current": limit_text(
            result.current_windows or (() if result.current is None else (result.current,))
        ),
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
