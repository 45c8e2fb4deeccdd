"""Metrics read from Redis: a JSON-able snapshot, and a Prometheus collector built on it.

Counters live in Redis (the Lua scripts bump them atomically), so every process sees the
same numbers and the figures are right under Celery's prefork pool or many RQ workers:
whichever process is scraped reports the whole namespace.

>>> from prometheus_client import CollectorRegistry
>>> registry = CollectorRegistry()
>>> registry.register(RateLimitCollector(limiter))          # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

from ._core import redis_errors
from ._decision import ScopeLimit
from ._errors import InvalidScope, LimitNotFound
from ._limiter import Limiter
from ._scopes import Scope

# Per-tenant series are kept for tenants with their own configuration and for those with
# waiting work, up to this many, so a million one-off tenants cannot explode cardinality.
MAX_TENANT_SERIES = 200
# Per-queue and per-priority series: the busiest this many, the rest summed under OTHER.
MAX_QUEUE_SERIES = 100
MAX_PRIORITY_SERIES = 20
# Names that get an admission counter of their own in Redis (lua/buckets.lua); later ones
# are counted under "~" there, and reported under OTHER.
MAX_QUEUE_COUNTERS = 512
MAX_PRIORITY_COUNTERS = 64
# What a series cap folds together. No queue, tenant or priority name can start with "~".
OTHER = "~other"
SNAPSHOT_TTL_SECONDS = 300
WAIT_BOUNDS_MS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bucket_fill(
    fields: dict[str, str], field: str, burst: float, rate_per_s: float, now_us: float
) -> float:
    """Tokens in a stored bucket (``field`` and its clock ``field:u``, see lua/buckets.lua),
    refilled to now; a missing bucket is full."""
    tokens, updated = fields.get(field), fields.get(f"{field}:u")
    if tokens is None or updated is None:
        return burst
    elapsed = max(0.0, now_us - float(updated))
    return min(burst, float(tokens) + elapsed * rate_per_s / 1e6)


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


def effective_limit(limits: dict[str, ScopeLimit], scope: Scope) -> ScopeLimit | None:
    """The limit a concrete scope's bucket follows: its own, else its default."""
    name = str(scope)
    if scope.kind == "tenant":
        return limits.get(name) or limits.get("tenant:*")
    if scope.kind == "tenant_queue":
        return limits.get(name) or limits.get(f"tenant:*:queue:{scope.queue}")
    return limits.get(name)


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
        tokens_raw, updated_raw = limiter.client.hmget(key, [field, f"{field}:u"])
    now_us = seconds * 1e6 + micros
    burst, rate = setting.limit.capacity, setting.limit.rate_per_second
    stored = {field: _text(tokens_raw), f"{field}:u": _text(updated_raw)} if tokens_raw else {}
    tokens = _bucket_fill(stored, field, burst, rate, now_us)
    return {
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


def _concurrency(
    limiter: Limiter, config: dict[str, str], tenants: list[str], now_us: float
) -> dict[str, dict[str, int]]:
    """Each concurrency cap that applies to a concrete scope (tenant defaults expanded for
    ``tenants``), with the jobs holding a slot of it now."""
    caps = limiter._core.concurrency(dict(config))  # type: ignore[arg-type]
    if not caps:
        return {}
    concrete = {scope: n for scope, n in caps.items() if "*" not in scope}
    for scope, n in caps.items():
        if "*" in scope:
            for tenant in tenants:
                concrete.setdefault(scope.replace("*", tenant, 1), n)
    names = sorted(concrete)
    pipe = limiter.client.pipeline(transaction=False)
    for scope in names:
        pipe.zcount(limiter.keys.slots(scope), f"({int(now_us)}", "+inf")
    running = pipe.execute()
    return {
        scope: {"cap": concrete[scope], "running": int(n)}
        for scope, n in zip(names, running, strict=True)
    }


def snapshot(
    limiter: Limiter,
    *,
    max_tenants: int = MAX_TENANT_SERIES,
    max_queues: int = MAX_QUEUE_SERIES,
    max_priorities: int = MAX_PRIORITY_SERIES,
) -> dict[str, Any]:
    """Everything the dashboards show, read from Redis in a few round trips.

    Args:
        max_tenants: tenants shown (those configured or with parked work).
        max_queues / max_priorities: queues (admissions; lanes by parked work) and
            priorities shown by name, the busiest first; the rest are summed under
            ``"~other"``, so one-off names cannot grow the output without bound.
    """
    client = limiter.client
    keys = limiter.keys
    seconds, micros = client.time()
    now_us = seconds * 1e6 + micros
    config = {_text(k): _text(v) for k, v in client.hgetall(keys.config).items()}
    shared = {_text(k): _text(v) for k, v in client.hgetall(keys.shared).items()}
    limits = limiter._core.limits(dict(config))  # type: ignore[arg-type]
    lanes = sorted(_text(x) for x in client.smembers(keys.lanes))

    pipe = client.pipeline(transaction=False)
    for lane in lanes:
        pipe.hlen(keys.counts(lane))
        pipe.hget(keys.counts(lane), ":total")
        pipe.zcard(keys.active(lane))
        pipe.zcard(keys.parked(lane))
        pipe.zrange(keys.age(lane), 0, 0, withscores=True)
    pipe.zcard(keys.inflight)
    lane_replies = pipe.execute()
    lane_stats: dict[str, dict[str, Any]] = {}
    backlogged: dict[str, int] = {}
    for i, lane in enumerate(lanes):
        hlen, total, active, parked, oldest = lane_replies[5 * i : 5 * i + 5]
        lane_stats[lane] = {
            "backlog": int(total or 0),
            "active_tenants": int(active),
            "parked_tenants": int(parked),
            "oldest_wait_ms": max(0.0, now_us / 1000 - oldest[0][1]) if oldest else 0.0,
        }
        if hlen - 2 <= max_tenants:  # the hash also holds ':total' and ':vt'
            for tenant, count in client.hgetall(keys.counts(lane)).items():
                name = _text(tenant)
                if not name.startswith(":"):
                    backlogged[name] = backlogged.get(name, 0) + int(count)

    configured = {t for t in map(_configured_tenant, config) if t is not None and t != "*"}
    tenants = sorted(configured | set(backlogged))[:max_tenants]
    pipe = client.pipeline(transaction=False)
    for tenant in tenants:
        pipe.hgetall(keys.tenant(tenant))
    tenant_hashes = pipe.execute()

    concurrency = _concurrency(limiter, config, tenants, now_us)

    buckets: dict[str, dict[str, float]] = {}
    for scope, setting in limits.items():
        if "*" in scope or scope.startswith("tenant:"):
            continue
        field = "b:global" if scope == "global" else f"b:{scope}"
        burst, rate = setting.limit.capacity, setting.limit.rate_per_second
        tokens = _bucket_fill(shared, field, burst, rate, now_us)
        buckets[scope] = {"tokens": tokens, "burst": burst, "fill": tokens / burst}

    tenant_stats: dict[str, dict[str, Any]] = {}
    for tenant, raw in zip(tenants, tenant_hashes, strict=True):
        fields = {_text(k): _text(v) for k, v in raw.items()}
        entry: dict[str, Any] = {
            "allowed": int(float(fields.get("n:a", 0))),
            # Every denial of the tenant counts under the scope that denied it.
            "denied": sum(int(float(v)) for k, v in fields.items() if k.startswith("d:")),
            "would_deny": int(float(fields.get("n:w", 0))),
            "backlog": backlogged.get(tenant, 0),
            "exempt": config.get(f"exempt:{tenant}"),
        }
        tenant_limit = effective_limit(limits, Scope("tenant", tenant=tenant))
        if tenant_limit is not None:
            burst, rate = tenant_limit.limit.capacity, tenant_limit.limit.rate_per_second
            tokens = _bucket_fill(fields, "b", burst, rate, now_us)
            buckets[f"tenant:{tenant}"] = {"tokens": tokens, "burst": burst, "fill": tokens / burst}
        tenant_stats[tenant] = entry

    def counters(prefix: str) -> dict[str, int]:
        return {
            k[len(prefix) :]: int(float(v))
            for k, v in sorted(shared.items())
            if k.startswith(prefix)
        }

    histogram = [int(shared.get(f"h:{b}", 0)) for b in WAIT_BOUNDS_MS] + [
        int(shared.get("h:inf", 0))
    ]
    # Totals are sums of the finer counters (one counter less per decision, lua/buckets.lua):
    # every admission counts under its queue ("-" for none), every denial in the histogram.
    by_queue = counters("a:q:")
    allowed = sum(by_queue.values())
    by_queue.pop("-", None)
    by_priority = counters("a:p:")
    return {
        "at_ms": now_us / 1000,
        "namespace": limiter.namespace,
        # The server's maxmemory-policy: {"policy", "maxmemory", "evicting"} (design.md).
        "eviction": limiter.eviction_status().as_dict(),
        "config_version": int(config.get("_version", 0)),
        "shadow": config.get("mode:shadow") == "1",
        # Seconds of traffic kept for previews, None when recording is off.
        "recording_s": float(config["mode:record"]) if "mode:record" in config else None,
        "limits": {
            scope: {
                "rate_per_s": s.limit.rate_per_second,
                "burst": s.limit.capacity,
                "shadow": s.shadow,
            }
            for scope, s in limits.items()
        },
        "totals": {
            "allowed": allowed,
            "allowed_tokens": allowed + float(shared.get("n:ax", 0)),
            "denied": sum(histogram),
            "would_deny": int(float(shared.get("n:w", 0))),
            "reaped": int(float(shared.get("n:reaped", 0))),
            # Parked items dropped because Redis evicted their data (FairScheduler.lost).
            "lost": int(float(shared.get("n:lost", 0))),
            "in_flight": int(lane_replies[-1]),
        },
        "denied_by": counters("d:"),
        "would_deny_by": counters("w:"),
        "allowed_by_queue": _top(by_queue, max_queues, by_queue.pop("~", 0)),
        "allowed_by_priority": _top(by_priority, max_priorities, by_priority.pop("~", 0)),
        "wait_ms_histogram": {
            "bounds": list(WAIT_BOUNDS_MS),
            "counts": histogram,
            "sum": float(shared.get("h:us", 0)) / 1000,
        },
        "buckets": buckets,
        # Concurrency caps by concrete scope: {"cap": n, "running": jobs holding a slot}
        # (a tenant default appears under each tenant shown, as tenant:<t>).
        "concurrency": concurrency,
        "lanes": _top_lanes(lane_stats, max_queues),
        "tenants": tenant_stats,
    }


def publish_snapshot(limiter: Limiter) -> dict[str, Any]:
    """Store a snapshot in Redis (``<base>:snapshot``) for dashboards; returns it."""
    snap = snapshot(limiter)
    limiter.client.set(limiter.keys.snapshot, json.dumps(snap), ex=SNAPSHOT_TTL_SECONDS)
    return snap


def read_snapshot(limiter: Limiter) -> dict[str, Any] | None:
    """The latest published snapshot, or None."""
    raw = limiter.client.get(limiter.keys.snapshot)
    return json.loads(raw) if raw else None


class RateLimitCollector:
    """A Prometheus collector that reads the namespace's state from Redis when scraped.

    Register it on a registry you own (``registry.register(RateLimitCollector(limiter))``);
    any process may serve it, since the state it reports is the whole namespace's. Series
    per tenant, queue and priority are capped as in ``snapshot`` (queues and priorities
    past the cap are summed under ``queue="~other"`` / ``priority="~other"``).
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
        snap = snapshot(
            self.limiter,
            max_tenants=self.max_tenants,
            max_queues=self.max_queues,
            max_priorities=self.max_priorities,
        )
        ns = snap["namespace"]
        decisions = CounterMetricFamily(
            "queue_ratelimit_decisions",
            "Rate limit decisions in the namespace, by outcome",
            labels=["namespace", "outcome"],
        )
        totals = snap["totals"]
        for outcome, key in (
            ("allowed", "allowed"),
            ("denied", "denied"),
            ("would_deny", "would_deny"),
        ):
            decisions.add_metric([ns, outcome], totals[key])
        yield decisions

        by_scope = CounterMetricFamily(
            "queue_ratelimit_scope_decisions",
            "Denials and shadow-mode would-denials, by the scope that decided",
            labels=["namespace", "scope", "outcome"],
        )
        for scope, n in snap["denied_by"].items():
            by_scope.add_metric([ns, scope, "denied"], n)
        for scope, n in snap["would_deny_by"].items():
            by_scope.add_metric([ns, scope, "would_deny"], n)
        yield by_scope

        allowed_q = CounterMetricFamily(
            "queue_ratelimit_allowed_by_queue", "Admissions by queue", labels=["namespace", "queue"]
        )
        for queue, n in snap["allowed_by_queue"].items():
            allowed_q.add_metric([ns, queue], n)
        yield allowed_q

        allowed_p = CounterMetricFamily(
            "queue_ratelimit_allowed_by_priority",
            "Admissions by priority",
            labels=["namespace", "priority"],
        )
        for priority, n in snap["allowed_by_priority"].items():
            allowed_p.add_metric([ns, priority], n)
        yield allowed_p

        hist = snap["wait_ms_histogram"]
        cumulative, buckets = 0, []
        for bound, count in zip([*hist["bounds"], "+Inf"], hist["counts"], strict=True):
            cumulative += count
            buckets.append((str(bound), cumulative))
        wait = HistogramMetricFamily(
            "queue_ratelimit_denied_wait_ms",
            "Wait (ms) reported to denied decisions",
            labels=["namespace"],
        )
        wait.add_metric([ns], buckets, sum_value=hist["sum"])
        yield wait

        fill = GaugeMetricFamily(
            "queue_ratelimit_bucket_fill_ratio",
            "Tokens in a bucket over its burst (1 = full, idle)",
            labels=["namespace", "scope"],
        )
        tokens = GaugeMetricFamily(
            "queue_ratelimit_bucket_tokens", "Tokens in a bucket", labels=["namespace", "scope"]
        )
        for scope, b in snap["buckets"].items():
            fill.add_metric([ns, scope], b["fill"])
            tokens.add_metric([ns, scope], b["tokens"])
        yield fill
        yield tokens

        running = GaugeMetricFamily(
            "queue_ratelimit_concurrency_running",
            "Jobs holding a concurrency slot of a capped scope",
            labels=["namespace", "scope"],
        )
        cap = GaugeMetricFamily(
            "queue_ratelimit_concurrency_cap",
            "Jobs of a scope allowed to run at once",
            labels=["namespace", "scope"],
        )
        for scope, c in snap["concurrency"].items():
            running.add_metric([ns, scope], c["running"])
            cap.add_metric([ns, scope], c["cap"])
        yield running
        yield cap

        tenant_decisions = CounterMetricFamily(
            "queue_ratelimit_tenant_decisions",
            "Decisions per tenant (configured or backlogged tenants only)",
            labels=["namespace", "tenant", "outcome"],
        )
        parked = GaugeMetricFamily(
            "queue_ratelimit_parked_jobs",
            "Jobs waiting in the fair backlog, per tenant",
            labels=["namespace", "tenant"],
        )
        for tenant, t in snap["tenants"].items():
            for outcome in ("allowed", "denied", "would_deny"):
                tenant_decisions.add_metric([ns, tenant, outcome], t[outcome])
            parked.add_metric([ns, tenant], t["backlog"])
        yield tenant_decisions
        yield parked

        lane_backlog = GaugeMetricFamily(
            "queue_ratelimit_queue_backlog", "Jobs parked per queue", labels=["namespace", "queue"]
        )
        oldest = GaugeMetricFamily(
            "queue_ratelimit_oldest_parked_ms",
            "Age of the oldest parked job per queue",
            labels=["namespace", "queue"],
        )
        for lane, stats in snap["lanes"].items():
            lane_backlog.add_metric([ns, lane], stats["backlog"])
            oldest.add_metric([ns, lane], stats["oldest_wait_ms"])
        yield lane_backlog
        yield oldest

        # One value each for the whole namespace.
        single = [
            (GaugeMetricFamily, "in_flight", "Jobs re-admitted and not yet acknowledged",
             totals["in_flight"]),
            (CounterMetricFamily, "lost", "Parked jobs dropped because Redis evicted their "
             "data (an evicting maxmemory-policy)", totals["lost"]),
            (GaugeMetricFamily, "redis_evicting", "1 when the limiter's Redis may evict "
             "keys (an evicting maxmemory-policy under a memory limit)",
             int(snap["eviction"]["evicting"])),
            (GaugeMetricFamily, "scrape_seconds", "Time to read the state from Redis",
             time.perf_counter() - started),
        ]  # fmt: skip
        for family, name, doc, value in single:
            metric = family(f"queue_ratelimit_{name}", doc, labels=["namespace"])
            metric.add_metric([ns], value)
            yield metric
