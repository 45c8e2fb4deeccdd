"""Metrics read from Redis: a JSON-able snapshot, and a Prometheus collector built on it.

Counters live in Redis (the Lua scripts bump them atomically), so every process sees the
same numbers and the figures are right under Celery's prefork pool or many RQ workers:
whichever process is scraped reports the whole namespace.

>>> from prometheus_client import CollectorRegistry
>>> registry = CollectorRegistry()
>>> registry.register(RateLimitCollector(limiter))          # doctest: +SKIP

The families the collector exports are the table ``FAMILIES`` (plus the wait histogram and
the scrape's own two); docs/metrics.md lists them, with the names they replaced.
"""

from __future__ import annotations

import heapq
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, cast

from redis.exceptions import RedisError

from ._client import queue_time
from ._core import ExemptMode, redis_errors
from ._counters import queue_flush_counters
from ._decision import Pause, ScopeLimit, format_limit
from ._errors import InvalidScope, LimitNotFound, RateLimitError
from ._keys import KeySpace
from ._limit import Limit
from ._limiter import Limiter
from ._scopes import Scope

PREFIX = "queue_ratelimit_"
# Per-tenant series: the most throttled tenants, and those with parked work or a
# configuration of their own, up to this many; the rest are summed under OTHER, so a
# million one-off tenants cannot explode cardinality.
MAX_TENANT_SERIES = 200
# Per-queue and per-priority series: the busiest this many, the rest summed under OTHER.
MAX_QUEUE_SERIES = 100
MAX_PRIORITY_SERIES = 20
# Pauses shown one by one (those ending last); the rest are counted in "paused_scopes".
# Tasks pause their own tenant on a 429 (pause_and_retry): as many may run as tenants.
MAX_PAUSE_SERIES = 100
# Names that get an admission counter of their own in Redis (lua/buckets.lua); later ones
# are counted under "~" there, and reported under OTHER.
MAX_QUEUE_COUNTERS = 512
MAX_PRIORITY_COUNTERS = 64
# Tenants whose denials Redis counts one by one (the denials zset, lua/buckets.lua): past
# this many, the least denied half is dropped there (and counted under OTHER here).
MAX_TENANT_COUNTERS = 4096
# What a series cap folds together. No queue, tenant or priority name can start with "~".
OTHER = "~other"
SNAPSHOT_TTL_SECONDS = 300
WAIT_BOUNDS_MS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
OUTCOMES = ("allowed", "denied", "would_deny")
FAIL_MODES = ("open", "closed", "raise")
# A lane's counts hash holds one field per tenant with parked work, plus these.
LANE_COUNT_FIELDS = (":total", ":vt", ":cv", ":ep", ":gv", ":st", ":jb")


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decoded(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in raw.items()}


def _window_state(
    fields: dict[str, str], field: str, limit: Limit, now_us: float
) -> tuple[float, float]:
    """(tokens, credit bank) of one window stored in ``field`` (its clock ``field:u``, its
    bank ``field:c``), refilled to now as lua/buckets.lua does: the bucket first, then the
    bank; a missing bucket is full, bank included."""
    burst, credit = limit.capacity, limit.credit_cap
    tokens, updated = fields.get(field), fields.get(f"{field}:u")
    if tokens is None or updated is None:
        return burst, credit
    elapsed = max(0.0, now_us - float(updated))
    bank = float(fields.get(f"{field}:c", 0)) if credit else 0.0
    total = min(burst + credit, float(tokens) + bank + elapsed * limit.rate_per_second / 1e6)
    bank = min(credit, max(bank, total - burst))
    return total - bank, bank


def scope_buckets(
    scope: str, setting: ScopeLimit, fields: dict[str, str], field: str, now_us: float
) -> dict[str, dict[str, Any]]:
    """The buckets of one concrete scope (``field``: its own, KeySpace.bucket_location), by
    name: the scope for its shortest window, ``"<scope> (<window>)"`` for each other one
    (as in ``Decision.remaining``). Each: tokens, burst, fill, and for a limit with burst
    credits its bank (``credit``) and the most it holds (``credit_cap``)."""
    windows = setting.windows
    periods = [w.per for w in windows]
    names = KeySpace.window_fields(field, periods, setting._places)
    # (Named as in replies: the scope for the first shortest window, wherever it is kept.)
    plain = KeySpace.window_fields(field, periods)
    out: dict[str, dict[str, Any]] = {}
    for window, name, default in zip(windows, names, plain, strict=True):
        tokens, bank = _window_state(fields, name, window, now_us)
        shown = scope if default == field else f"{scope} ({format_limit(window)})"
        entry: dict[str, Any] = {
            "tokens": tokens,
            "burst": window.capacity,
            "fill": tokens / window.capacity,
            "limit": setting.scope,
        }
        if window.credit is not None:
            entry["credit"] = bank
            entry["credit_cap"] = window.credit
        out[shown] = entry
    return out


def _top(counts: dict[str, int], n: int, folded: int = 0) -> dict[str, int]:
    """The ``n`` largest of ``counts`` (by name), and the rest, with ``folded``, summed
    under ``OTHER``."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = dict(sorted(ranked[:n]))
    rest = folded + sum(count for _, count in ranked[n:])
    if rest:
        kept[OTHER] = rest
    return kept


def _top_lanes(stats: dict[str, dict[str, Any]], n: int) -> dict[str, dict[str, Any]]:
    """The ``n`` lanes with the most parked work (by name), and the rest folded into one
    under ``OTHER``: backlogs and tenants summed, the oldest wait the longest of them."""
    ranked = sorted(stats, key=lambda lane: (-stats[lane]["backlog"], lane))
    kept = {lane: stats[lane] for lane in sorted(ranked[:n])}
    rest = [stats[lane] for lane in ranked[n:]]
    if rest:
        kept[OTHER] = {
            key: max(s[key] for s in rest) if key == "oldest_wait_ms" else sum(s[key] for s in rest)
            for key in rest[0]
        }
    return kept


def effective_limit(
    limits: dict[str, ScopeLimit], scope: Scope, exempt: str | None = None
) -> ScopeLimit | None:
    """The limit a concrete scope's bucket follows: its own, else its default
    (``Scope.limit_source``)."""
    source = scope.limit_source(limits, exempt)
    return None if source is None else limits[source]


def bucket_state(limiter: Limiter, scope: str) -> dict[str, Any]:
    """The live state of one scope's bucket, refilled to now on Redis's clock.

    Raises:
        InvalidScope: a malformed scope, or a default one (``tenant:*``), which has no
            bucket of its own: each tenant has one, asked for as ``tenant:<t>``.
        LimitNotFound: no limit applies to the scope.
    """
    parsed = Scope.parse(scope)
    if parsed.is_default:
        raise InvalidScope(
            f"{scope} is a default: every tenant has a bucket of its own under it; "
            f"ask for a tenant's scope, e.g. {str(parsed).replace('*', 'acme')}"
        )
    location = limiter.keys.bucket_location(parsed)
    assert location is not None  # not a default scope
    key, field = location
    with redis_errors():
        setting = effective_limit(limiter.limits(), parsed)
        if setting is None:
            raise LimitNotFound(str(parsed))
        seconds, micros = limiter.client.time()
        tokens_raw, updated_raw, bank_raw = limiter.client.hmget(
            key, [field, f"{field}:u", f"{field}:c"]
        )
    now_us = seconds * 1e6 + micros
    burst, rate = setting.limit.capacity, setting.limit.rate_per_second
    stored = {field: _text(tokens_raw), f"{field}:u": _text(updated_raw)} if tokens_raw else {}
    if bank_raw is not None:
        stored[f"{field}:c"] = _text(bank_raw)
    # (The first window's bucket; snapshot() shows every window.)
    tokens, bank = _window_state(stored, field, setting.limit, now_us)
    extra = {} if setting.limit.credit is None else {"credit": bank}
    return {
        **extra,
        "scope": str(parsed),
        "limit": setting,
        "tokens": tokens,
        "burst": burst,
        "fill": tokens / burst,
        "wait_ms_for_one": max(0.0, (min(1.0, burst) - tokens) / rate * 1000),
        "updated_at_ms": float(_text(updated_raw)) / 1000 if updated_raw else None,
    }


def _configured_tenant(field: str) -> str | None:
    """The tenant a config field is about (``tenant:<t>...``, ``exempt:<t>``,
    ``weight:tenant:<t>``, ``conc:tenant:<t>...``), or None."""
    parts = field.split(":")
    if parts[0] == "conc":
        parts = parts[1:]
    if parts[0] in ("tenant", "exempt") and len(parts) >= 2:
        return parts[1]
    if parts[:2] == ["weight", "tenant"] and len(parts) == 3:
        return parts[2]
    return None


def _concrete_scopes(tenants: Iterable[str], configured: Iterable[str]) -> list[Scope]:
    """The concrete scopes a configuration may govern: every configured scope that is not a
    default, and each tenant's tenant scope and tenant-queue scopes of the defaults."""
    parsed = [Scope.parse(name) for name in configured]
    scopes = {str(s): s for s in parsed if not s.is_default}
    default_queues = sorted(
        s.queue or "" for s in parsed if s.kind == "tenant_queue" and s.is_default
    )
    for tenant in tenants:
        for scope in (
            Scope("tenant", tenant=tenant),
            *(Scope("tenant_queue", tenant=tenant, queue=q) for q in default_queues),
        ):
            scopes.setdefault(str(scope), scope)
    return [scopes[name] for name in sorted(scopes)]


@dataclass
class _Read:
    """What a snapshot read from Redis, before it is shaped."""

    now_us: float
    config: dict[str, str]
    shared: dict[str, str]
    in_flight: int
    tenant_denials: list[tuple[str, float]]
    lanes: list[str]


def _read_base(limiter: Limiter, max_tenants: int) -> _Read:
    """One round trip: the clock, the config and shared hashes, the lanes, the most
    denied tenants and the in-flight count."""
    keys = limiter.keys
    pipe = limiter.client.pipeline(transaction=False)
    # Counts the server keeps in memory for a moment are written first (_counters.py).
    flushed = queue_flush_counters(limiter, pipe)
    queue_time(pipe, keys.config)
    pipe.hgetall(keys.config)
    pipe.hgetall(keys.shared)
    pipe.smembers(keys.lanes)
    pipe.zcard(keys.inflight)
    pipe.zrange(keys.tenant_denials, 0, max(0, max_tenants - 1), desc=True, withscores=True)
    replies = pipe.execute(raise_on_error=False)[1 if flushed else 0 :]
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    (seconds, micros), config, shared, lanes, in_flight, denials = replies
    return _Read(
        now_us=seconds * 1e6 + micros,
        config=_decoded(config),
        shared=_decoded(shared),
        in_flight=int(in_flight),
        tenant_denials=[(_text(t), n) for t, n in denials] if max_tenants > 0 else [],
        lanes=sorted(_text(x) for x in lanes),
    )


def _read_lanes(
    limiter: Limiter, lanes: list[str], now_ms: float, max_tenants: int
) -> tuple[dict[str, dict[str, Any]], dict[str, int], list[str]]:
    """Two round trips whatever the number of lanes: each lane's totals, then the
    per-tenant counts of the lanes small enough to read whole (at most ``max_tenants``
    tenants each). Returns the stats by lane, the parked jobs by tenant found in those,
    and the lanes too large to read whole."""
    keys = limiter.keys
    pipe = limiter.client.pipeline(transaction=False)
    for lane in lanes:
        pipe.hlen(keys.counts(lane))
        pipe.hget(keys.counts(lane), ":total")
        pipe.zcard(keys.active(lane))
        pipe.zcard(keys.parked(lane))
        pipe.zrange(keys.age(lane), 0, 0, withscores=True)
    replies = pipe.execute()
    stats: dict[str, dict[str, Any]] = {}
    small: list[str] = []
    large: list[str] = []
    for i, lane in enumerate(lanes):
        fields, total, active, parked, oldest = replies[5 * i : 5 * i + 5]
        stats[lane] = {
            "backlog": int(total or 0),
            "active_tenants": int(active),
            "parked_tenants": int(parked),
            "oldest_wait_ms": max(0.0, now_ms - oldest[0][1]) if oldest else 0.0,
        }
        if stats[lane]["backlog"]:
            (small if fields - len(LANE_COUNT_FIELDS) <= max_tenants else large).append(lane)
    pipe = limiter.client.pipeline(transaction=False)
    for lane in small:
        pipe.hgetall(keys.counts(lane))
    backlogged: dict[str, int] = {}
    for counts in pipe.execute() if small else []:
        for tenant, count in counts.items():
            name = _text(tenant)
            if not name.startswith(":") and int(count) > 0:
                backlogged[name] = backlogged.get(name, 0) + int(count)
    return stats, backlogged, large


def _chosen_tenants(
    read: _Read, backlogged: dict[str, int], max_tenants: int
) -> tuple[list[str], set[str]]:
    """The tenants shown one by one: the most denied first, then those with parked work,
    then those with a configuration of their own; at most ``max_tenants``. Also returns
    the configured ones."""
    configured = {t for t in map(_configured_tenant, read.config) if t is not None and t != "*"}
    denied = dict(read.tenant_denials)
    candidates = set(denied) | set(backlogged) | configured
    # (nsmallest: a scrape may see tens of thousands of candidates and keep 200.)
    ranked = heapq.nsmallest(
        max_tenants,
        candidates,
        key=lambda t: (-denied.get(t, 0), -backlogged.get(t, 0), t not in configured, t),
    )
    return sorted(ranked), configured


def _tenant_entry(
    fields: dict[str, str], backlog: int, exempt: str | None, denials: float
) -> dict[str, Any]:
    denied_by = {k[2:]: int(float(v)) for k, v in sorted(fields.items()) if k.startswith("d:")}
    return {
        "allowed": int(float(fields.get("n:a", 0))),
        # Every denial of the tenant counts under the scope that denied it.
        "denied": sum(denied_by.values()),
        "denied_by": denied_by,
        "would_deny": int(float(fields.get("n:w", 0))),
        # Denials counted since the tenant entered the denials zset (they outlive the
        # tenant's hash, which expires when the tenant is idle).
        "denials": int(denials),
        "backlog": backlog,
        "exempt": exempt,
    }


def _counters(shared: dict[str, str], prefix: str) -> dict[str, int]:
    return {
        k[len(prefix) :]: int(float(v)) for k, v in sorted(shared.items()) if k.startswith(prefix)
    }


@dataclass
class _Settings:
    """The configuration a snapshot reports, as it stood at the snapshot's time."""

    limits: dict[str, ScopeLimit]
    caps: dict[str, int]
    exemptions: dict[str, ExemptMode]
    pauses: dict[str, Pause]

    @classmethod
    def of(cls, limiter: Limiter, read: _Read) -> _Settings:
        core = limiter._core
        # (The core's parsers take the config hash as Redis returns it: any keys.)
        config = cast("dict[object, object]", read.config)
        return cls(
            limits=core.limits(config),
            caps=core.concurrency(config),
            exemptions=core.exemptions(config),
            pauses=core.pauses(config, read.now_us / 1000),
        )

    def source(self, table: dict[str, Any], scope: Scope) -> str | None:
        """The configured scope of ``table`` (limits or caps) that ``scope`` follows, the
        scope's tenant's exemption applied."""
        return scope.limit_source(table, self.exemptions.get(scope.tenant or ""))


@dataclass
class _Shown:
    """What the last round trip read about the tenants shown one by one."""

    hashes: dict[str, dict[str, str]]  # each tenant's own hash, by tenant
    backlog: dict[str, int]  # their parked jobs in the lanes too large to read whole
    running: list[int]  # the jobs holding each capped scope's slots (as _capped_scopes)


def _capped_scopes(tenants: list[str], settings: _Settings) -> list[tuple[Scope, str]]:
    """Each concrete scope under a concurrency cap, with the cap's configured scope."""
    return [
        (scope, source)
        for scope in _concrete_scopes(tenants, settings.caps)
        if (source := settings.source(settings.caps, scope)) is not None
    ]


def _read_shown(
    limiter: Limiter,
    now_us: float,
    tenants: list[str],
    large_lanes: list[str],
    capped: list[tuple[Scope, str]],
) -> _Shown:
    """The last round trip: the shown tenants' hashes, their parked jobs in the lanes too
    large to read whole, and the jobs holding each concurrency cap's slots."""
    keys = limiter.keys
    large_lanes = large_lanes if tenants else []
    pipe = limiter.client.pipeline(transaction=False)
    for tenant in tenants:
        pipe.hgetall(keys.tenant(tenant))
    for lane in large_lanes:
        pipe.hmget(keys.counts(lane), tenants)
    for scope, _ in capped:
        pipe.zcount(keys.slots(str(scope)), f"({int(now_us)}", "+inf")
    replies = pipe.execute() if len(pipe) else []
    hashes = replies[: len(tenants)]
    lane_counts = replies[len(tenants) : len(tenants) + len(large_lanes)]
    backlog: dict[str, int] = {}
    for counts in lane_counts:
        for tenant, count in zip(tenants, counts, strict=True):
            if count is not None and int(count) > 0:
                backlog[tenant] = backlog.get(tenant, 0) + int(count)
    return _Shown(
        hashes={t: _decoded(raw) for t, raw in zip(tenants, hashes, strict=True)},
        backlog=backlog,
        running=[int(n) for n in replies[len(tenants) + len(large_lanes) :]],
    )


def _added(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Counts by name, of both."""
    return {name: a.get(name, 0) + b.get(name, 0) for name in {**a, **b}}


def _concurrency(
    capped: list[tuple[Scope, str]], caps: dict[str, int], running: list[int]
) -> dict[str, dict[str, Any]]:
    """Each capped concrete scope: its cap, the jobs holding its slots, the cap's scope."""
    return {
        str(scope): {"cap": caps[source], "running": n, "limit": source}
        for (scope, source), n in zip(capped, running, strict=True)
    }


def _buckets(
    keys: KeySpace,
    settings: _Settings,
    read: _Read,
    tenant_hashes: dict[str, dict[str, str]],
) -> dict[str, dict[str, Any]]:
    """Every bucket a limit governs: shared ones (global, queues), and each shown tenant's
    (its own limits, and the defaults it has a bucket under)."""
    limits = settings.limits
    buckets: dict[str, dict[str, Any]] = {}
    for scope in _concrete_scopes(tenant_hashes, limits):
        source = settings.source(limits, scope)
        location = keys.bucket_location(scope)
        if source is None or location is None:
            continue
        if scope.tenant is not None and scope.tenant not in tenant_hashes:
            continue  # a configured tenant past the cap
        field = location[1]
        fields = tenant_hashes[scope.tenant] if scope.tenant is not None else read.shared
        if scope.kind == "tenant_queue" and source != str(scope) and field not in fields:
            continue  # a default tenant-queue bucket this tenant never used
        buckets.update(scope_buckets(str(scope), limits[source], fields, field, read.now_us))
    return buckets


def _tenant_stats(
    tenant_hashes: dict[str, dict[str, str]],
    backlogged: dict[str, int],
    exemptions: dict[str, ExemptMode],
    tenant_denials: list[tuple[str, float]],
) -> dict[str, dict[str, Any]]:
    denials = dict(tenant_denials)
    return {
        tenant: _tenant_entry(
            fields, backlogged.get(tenant, 0), exemptions.get(tenant), denials.get(tenant, 0)
        )
        for tenant, fields in tenant_hashes.items()
    }


def _configuration(limiter: Limiter, read: _Read, settings: _Settings) -> dict[str, Any]:
    """The snapshot's head: when, which namespace on what server, and what is configured."""
    config = read.config
    return {
        "at_ms": read.now_us / 1000,
        "namespace": limiter.namespace,
        # The server's maxmemory-policy: {"policy", "maxmemory", "evicting"} (design.md).
        "eviction": limiter.eviction_status().as_dict(),
        "config_version": int(config.get("_version", 0)),
        "shadow": config.get("mode:shadow") == "1",
        # Seconds of traffic kept for previews, None when recording is off.
        "recording_s": float(config["mode:record"]) if "mode:record" in config else None,
        "limits": {scope: _limit_summary(s) for scope, s in settings.limits.items()},
        "caps": settings.caps,
        "exemptions": settings.exemptions,
        **pauses_shown(settings.pauses),
    }


def pauses_shown(pauses: dict[str, Pause]) -> dict[str, Any]:
    """The snapshot's pauses: ``paused_scopes``, how many run at the snapshot's time
    (Limiter.pause), and ``pauses``, the MAX_PAUSE_SERIES of them that end last, by scope
    (100,000 one-off pauses were as many series on /metrics: 10.6 MB a scrape)."""
    last = sorted(pauses.values(), key=lambda p: (-p.until_ms, p.scope))[:MAX_PAUSE_SERIES]
    return {
        "paused_scopes": len(pauses),
        "pauses": {
            p.scope: {"until_ms": p.until_ms, "remaining_s": p.remaining}
            for p in sorted(last, key=lambda p: p.scope)
        },
    }


def _wait_histogram(shared: dict[str, str]) -> dict[str, Any]:
    """The waits told to denied decisions: one count per bound of WAIT_BOUNDS_MS and one
    past the last (every denial counts in one), and their sum in ms."""
    counts = [int(shared.get(f"h:{b}", 0)) for b in WAIT_BOUNDS_MS]
    return {
        "bounds": list(WAIT_BOUNDS_MS),
        "counts": [*counts, int(shared.get("h:inf", 0))],
        "sum": float(shared.get("h:us", 0)) / 1000,
    }


def _admissions(
    shared: dict[str, str], max_queues: int, max_priorities: int
) -> tuple[int, dict[str, int], dict[str, int]]:
    """All admissions, and their series by queue and by priority: the busiest names, the
    rest under OTHER (with the names Redis counts together, past MAX_QUEUE_COUNTERS or
    MAX_PRIORITY_COUNTERS, under "~")."""
    by_queue = _counters(shared, "a:q:")
    by_priority = _counters(shared, "a:p:")
    # (Every admission counts under its queue, "-" for none: the total is their sum.)
    allowed = sum(by_queue.values())
    by_queue.pop("-", None)
    return (
        allowed,
        _top(by_queue, max_queues, by_queue.pop("~", 0)),
        _top(by_priority, max_priorities, by_priority.pop("~", 0)),
    )


def _totals(
    shared: dict[str, str], allowed: int, denied: int, in_flight: int, parked: int
) -> dict[str, Any]:
    return {
        "allowed": allowed,
        "allowed_tokens": allowed + float(shared.get("n:ax", 0)),
        "denied": denied,
        "would_deny": int(float(shared.get("n:w", 0))),
        "reaped": int(float(shared.get("n:reaped", 0))),
        # Parked items dropped because Redis evicted their data (FairScheduler.lost).
        "lost": int(float(shared.get("n:lost", 0))),
        "in_flight": in_flight,
        "parked": parked,
    }


def _top_within(counts: dict[str, int], n: int, total: int) -> dict[str, int]:
    """``_top`` of ``counts``, a part of ``total``: the rest of the total is under OTHER."""
    return _top(counts, n, total - sum(counts.values()))


def snapshot(
    limiter: Limiter,
    *,
    max_tenants: int = MAX_TENANT_SERIES,
    max_queues: int = MAX_QUEUE_SERIES,
    max_priorities: int = MAX_PRIORITY_SERIES,
) -> dict[str, Any]:
    """Everything the dashboards show, read from Redis in four round trips whatever the
    number of queues and tenants.

    Args:
        max_tenants: tenants shown one by one: the most denied, then those with parked
            work or a configuration of their own; the rest are summed under ``"~other"``
            (``tenant_denials``, ``tenant_backlog``).
        max_queues / max_priorities: queues (admissions; lanes by parked work) and
            priorities shown by name, the busiest first; the rest are summed under
            ``"~other"``, so one-off names cannot grow the output without bound.
    """
    if getattr(limiter, "shards", 1) != 1:
        # One snapshot per shard, added up (docs/design.md, "Shards").
        from ._sharded_metrics import sharded_snapshot  # (here: it imports metrics)

        return sharded_snapshot(
            limiter,  # type: ignore[arg-type]
            snapshot,
            max_tenants=max_tenants,
            max_queues=max_queues,
            max_priorities=max_priorities,
        )
    read = _read_base(limiter, max_tenants)
    settings = _Settings.of(limiter, read)
    lanes, backlogged, large_lanes = _read_lanes(
        limiter, read.lanes, read.now_us / 1000, max_tenants
    )
    tenants, _ = _chosen_tenants(read, backlogged, max_tenants)
    capped = _capped_scopes(tenants, settings)
    shown = _read_shown(limiter, read.now_us, tenants, large_lanes, capped)
    backlogged = _added(backlogged, shown.backlog)

    shared = read.shared
    histogram = _wait_histogram(shared)
    # Totals are sums of the finer counters (one counter less per decision, lua/buckets.lua):
    # every denial counts in the histogram, every admission under its queue (_admissions).
    denied = sum(histogram["counts"])
    parked = sum(s["backlog"] for s in lanes.values())
    allowed, by_queue, by_priority = _admissions(shared, max_queues, max_priorities)
    return {
        **_configuration(limiter, read, settings),
        "totals": _totals(shared, allowed, denied, read.in_flight, parked),
        # Decisions the fail mode made while Redis was unreachable, added by each process
        # once it is back (Limiter.report_fail_mode).
        "fail_mode": {mode: int(float(shared.get(f"f:{mode}", 0))) for mode in FAIL_MODES},
        # Denials and would-denials by the limit or cap that decided, as configured:
        # tenant:* counts every tenant under the default (lua/buckets.lua).
        "denied_by": _counters(shared, "d:"),
        "would_deny_by": _counters(shared, "w:"),
        # The most denied tenants, the rest of the denials under "~other".
        "tenant_denials": _top_within(
            {t: int(n) for t, n in read.tenant_denials}, max_tenants, denied
        ),
        # Parked jobs of the shown tenants, the rest under "~other".
        "tenant_backlog": _top_within(
            {t: backlogged[t] for t in tenants if backlogged.get(t)}, max_tenants, parked
        ),
        "allowed_by_queue": by_queue,
        "allowed_by_priority": by_priority,
        "wait_ms_histogram": histogram,
        # By concrete scope: tokens, burst, fill and the configured scope it follows.
        "buckets": _buckets(limiter.keys, settings, read, shown.hashes),
        # Concurrency caps by concrete scope: {"cap": n, "running": jobs holding a slot,
        # "limit": the configured scope} (a tenant default appears under each tenant shown).
        "concurrency": _concurrency(capped, settings.caps, shown.running),
        "lanes": _top_lanes(lanes, max_queues),
        "tenants": _tenant_stats(
            shown.hashes, backlogged, settings.exemptions, read.tenant_denials
        ),
    }


def _limit_summary(setting: ScopeLimit) -> dict[str, Any]:
    """A configured limit in the snapshot: its (first) window's rate and burst as always,
    its credit when set, and every window (as written) when it has several."""
    lim = setting.limit
    out: dict[str, Any] = {
        "rate_per_s": lim.rate_per_second,
        "burst": lim.capacity,
        "shadow": setting.shadow,
    }
    if lim.credit is not None:
        out["credit"] = lim.credit
    if len(setting.windows) > 1:
        out["windows"] = [format_limit(w) for w in setting.windows]
    return out


def publish_snapshot(limiter: Limiter) -> dict[str, Any]:
    """Store a snapshot in Redis (``<base>:snapshot``) for dashboards; returns it."""
    snap = snapshot(limiter)
    limiter.client.set(limiter.keys.snapshot, json.dumps(snap), ex=SNAPSHOT_TTL_SECONDS)
    return snap


def read_snapshot(limiter: Limiter) -> dict[str, Any] | None:
    """The latest published snapshot, or None."""
    raw = limiter.client.get(limiter.keys.snapshot)
    return json.loads(raw) if raw else None


Samples = Iterable[tuple[tuple[str, ...], float]]


@dataclass(frozen=True)
class Family:
    """One metric family of the collector: its samples are ``samples(snapshot)``, each
    (label values after ``namespace``, value)."""

    kind: Literal["counter", "gauge"]
    name: str  # after PREFIX; a counter's is exported with "_total"
    help: str
    labels: tuple[str, ...]
    samples: Callable[[dict[str, Any]], Samples]

    @property
    def exported(self) -> str:
        """The name of its samples on /metrics."""
        return f"{PREFIX}{self.name}" + ("_total" if self.kind == "counter" else "")


def _each(key: str, field: str | None = None) -> Callable[[dict[str, Any]], Samples]:
    """Samples from a dict of the snapshot: one per key, its value (or its ``field``)."""

    def samples(snap: dict[str, Any]) -> Samples:
        for name, value in snap[key].items():
            yield (name,), value if field is None else value[field]

    return samples


def _outcomes(snap: dict[str, Any]) -> Samples:
    for outcome in OUTCOMES:
        yield (outcome,), snap["totals"][outcome]


def _scope_outcomes(snap: dict[str, Any]) -> Samples:
    for outcome, key in (("denied", "denied_by"), ("would_deny", "would_deny_by")):
        for scope, n in snap[key].items():
            yield (scope, outcome), n


def _tenant_outcomes(snap: dict[str, Any]) -> Samples:
    for tenant, stats in snap["tenants"].items():
        for outcome in OUTCOMES:
            yield (tenant, outcome), stats[outcome]


def _lane_tenants(snap: dict[str, Any]) -> Samples:
    for lane, stats in snap["lanes"].items():
        yield (lane, "waiting"), stats["active_tenants"]
        yield (lane, "held"), stats["parked_tenants"]


def _total(key: str) -> Callable[[dict[str, Any]], Samples]:
    return lambda snap: [((), snap["totals"][key])]


FAMILIES: tuple[Family, ...] = (
    Family(
        "counter",
        "decisions",
        "Rate-limit decisions, by outcome: allowed, denied, would_deny (admitted, but a "
        "shadow scope would have denied it)",
        ("outcome",),
        _outcomes,
    ),
    Family(
        "counter",
        "scope_decisions",
        "Denials and shadow would-denials by the limit or concurrency cap that decided, as "
        'configured: scope="tenant:*" counts every tenant under the default',
        ("scope", "outcome"),
        _scope_outcomes,
    ),
    Family(
        "counter",
        "tenant_denials",
        "Denials by tenant, whatever the scope that denied: the most denied tenants, the "
        'rest under tenant="~other"',
        ("tenant",),
        _each("tenant_denials"),
    ),
    Family(
        "counter",
        "tenant_decisions",
        "Decisions of each tenant shown, by outcome, from its own counters (they restart "
        "when an idle tenant's counters expire)",
        ("tenant", "outcome"),
        _tenant_outcomes,
    ),
    Family(
        "counter",
        "queue_admissions",
        'Jobs admitted, by queue: the busiest queues, the rest under queue="~other"',
        ("queue",),
        _each("allowed_by_queue"),
    ),
    Family(
        "counter",
        "priority_admissions",
        'Jobs admitted, by priority: the busiest, the rest under priority="~other"',
        ("priority",),
        _each("allowed_by_priority"),
    ),
    Family(
        "counter",
        "fail_mode_events",
        "Decisions made by the fail mode while Redis was unreachable (open: allowed, "
        "closed: held back, raise: errors raised), added by each process once Redis is back",
        ("mode",),
        lambda snap: (((mode,), n) for mode, n in snap["fail_mode"].items()),
    ),
    Family(
        "counter",
        "reaped",
        "Re-admitted jobs whose lease ran out before they were acknowledged (handed back "
        "to their backlog)",
        (),
        _total("reaped"),
    ),
    Family(
        "gauge",
        "bucket_fill_ratio",
        "Tokens in a bucket over its burst: 1 is full (idle), 0 is empty (throttling)",
        ("scope",),
        _each("buckets", "fill"),
    ),
    Family(
        "gauge",
        "bucket_tokens",
        "Tokens left in a bucket, refilled to the time of the scrape",
        ("scope",),
        _each("buckets", "tokens"),
    ),
    Family(
        "gauge",
        "bucket_credit_tokens",
        "Burst credits banked for a bucket (limits with credit only): refill that flowed on "
        "while the bucket was full, spent once it is empty",
        ("scope",),
        lambda snap: (((s,), b["credit"]) for s, b in snap["buckets"].items() if "credit" in b),
    ),
    Family(
        "gauge",
        "concurrency_running",
        "Jobs holding a slot of a concurrency-capped scope now",
        ("scope",),
        _each("concurrency", "running"),
    ),
    Family(
        "gauge",
        "concurrency_cap",
        "Jobs of a capped scope allowed to run at once",
        ("scope",),
        _each("concurrency", "cap"),
    ),
    Family(
        "gauge",
        "pause_remaining_seconds",
        "Seconds left of a scope's pause (Limiter.pause): nothing of it is admitted meanwhile; "
        f"the {MAX_PAUSE_SERIES} pauses ending last",
        ("scope",),
        _each("pauses", "remaining_s"),
    ),
    Family(
        "gauge",
        "paused_scopes",
        "Scopes paused now (Limiter.pause), shown or not in pause_remaining_seconds",
        (),
        lambda snap: [((), snap["paused_scopes"])],
    ),
    Family(
        "gauge",
        "queue_parked_jobs",
        'Jobs waiting in the fair backlog, by queue: the fullest, the rest under queue="~other"',
        ("queue",),
        _each("lanes", "backlog"),
    ),
    Family(
        "gauge",
        "tenant_parked_jobs",
        'Jobs waiting in the fair backlog, by tenant: those shown, the rest under tenant="~other"',
        ("tenant",),
        _each("tenant_backlog"),
    ),
    Family(
        "gauge",
        "queue_tenants",
        "Tenants with parked work in a queue: waiting their turn, or held back by their own "
        "limits until they refill",
        ("queue", "state"),
        _lane_tenants,
    ),
    Family(
        "gauge",
        "oldest_parked_age_seconds",
        "How long the oldest job parked in a queue has waited",
        ("queue",),
        lambda snap: (((q,), s["oldest_wait_ms"] / 1000) for q, s in snap["lanes"].items()),
    ),
    Family(
        "gauge",
        "in_flight_jobs",
        "Jobs re-admitted from the fair backlog and not yet acknowledged",
        (),
        _total("in_flight"),
    ),
    Family(
        "counter",
        "lost",
        "Parked jobs dropped because Redis evicted their data (an evicting maxmemory-policy)",
        (),
        _total("lost"),
    ),
    Family(
        "gauge",
        "redis_evicting",
        "1 when the limiter's Redis may evict keys (an evicting maxmemory-policy under a "
        "memory limit)",
        (),
        lambda snap: [((), int(snap["eviction"]["evicting"]))],
    ),
)

WAIT_HISTOGRAM = "denied_wait_seconds"
WAIT_HELP = "Waits (seconds) the limiter reported to denied decisions"


class RateLimitCollector:
    """A Prometheus collector that reads the namespace's state from Redis when scraped.

    Register it on a registry you own (``registry.register(RateLimitCollector(limiter))``);
    any process may serve it, since the state it reports is the whole namespace's. Series
    per tenant, queue and priority are capped as in ``snapshot`` (past the cap, summed
    under ``tenant="~other"``, ``queue="~other"``, ``priority="~other"``). When Redis cannot
    be read, only ``queue_ratelimit_up`` (0) and the scrape's duration are reported.
    """

    def __init__(
        self,
        limiter: Limiter,
        *,
        max_tenants: int = MAX_TENANT_SERIES,
        max_queues: int = MAX_QUEUE_SERIES,
        max_priorities: int = MAX_PRIORITY_SERIES,
    ) -> None:
        self.limiter = limiter
        self.max_tenants = max_tenants
        self.max_queues = max_queues
        self.max_priorities = max_priorities

    def describe(self) -> list[Any]:
        # Describing nothing keeps registration from scraping Redis.
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        started = time.perf_counter()
        ns = self.limiter.namespace
        try:
            snap: dict[str, Any] | None = snapshot(
                self.limiter,
                max_tenants=self.max_tenants,
                max_queues=self.max_queues,
                max_priorities=self.max_priorities,
            )
        except (RedisError, RateLimitError, OSError):
            snap = None
        if snap is not None:
            for family in FAMILIES:
                kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
                metric = kind(
                    PREFIX + family.name, family.help, labels=["namespace", *family.labels]
                )
                for labels, value in family.samples(snap):
                    metric.add_metric([ns, *labels], value)
                yield metric
            hist = snap["wait_ms_histogram"]
            cumulative, buckets = 0, []
            for bound, count in zip([*hist["bounds"], "+Inf"], hist["counts"], strict=True):
                cumulative += count
                buckets.append((str(bound if bound == "+Inf" else bound / 1000), cumulative))
            wait = HistogramMetricFamily(PREFIX + WAIT_HISTOGRAM, WAIT_HELP, labels=["namespace"])
            wait.add_metric([ns], buckets, sum_value=hist["sum"] / 1000)
            yield wait
        up = GaugeMetricFamily(
            PREFIX + "up",
            "1 when this scrape read the namespace from Redis, else 0",
            labels=["namespace"],
        )
        up.add_metric([ns], 1 if snap is not None else 0)
        yield up
        scrape = GaugeMetricFamily(
            PREFIX + "scrape_duration_seconds",
            "Time this scrape took to read the namespace from Redis",
            labels=["namespace"],
        )
        scrape.add_metric([ns], time.perf_counter() - started)
        yield scrape
