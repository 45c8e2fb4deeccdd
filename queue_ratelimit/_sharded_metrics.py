"""The metrics snapshot of a sharded namespace: one snapshot per shard, merged.

Each shard is read as ``metrics.snapshot`` reads an unsharded namespace (its counters, its
tenants, its lanes, its buckets), then the parts are added up: counters and totals are
sums, tenants and their buckets come from their one shard, a shared scope's bucket is the
sum of the shards' slices (against the whole burst), and the limits, caps, exemptions and
modes are the home slot's, as set (docs/design.md, "Shards").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._core import redis_errors
from ._leases import shared_scope
from ._sharded_scheduler import shard_view

if TYPE_CHECKING:
    from ._shards import ShardedLimiter

Snapshot = dict[str, Any]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _summed(dicts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _ranked(
    parts: Iterable[dict[str, int]], n: int, top: Callable[..., dict[str, int]], other: str
) -> dict[str, int]:
    merged = _summed(parts)
    folded = merged.pop(other, 0)
    return top(merged, n, folded)


def sharded_snapshot(
    limiter: ShardedLimiter,
    snapshot: Callable[..., Snapshot],
    *,
    max_tenants: int,
    max_queues: int,
    max_priorities: int,
) -> Snapshot:
    """``metrics.snapshot`` of a sharded namespace (``snapshot`` is that function, called
    for each shard)."""
    from . import metrics  # (here: metrics imports this module)

    options = {
        "max_tenants": max_tenants,
        "max_queues": max_queues,
        "max_priorities": max_priorities,
    }
    parts = [snapshot(shard_view(limiter, i), **options) for i in range(limiter.shards)]
    with redis_errors():
        config = {
            _text(k): _text(v) for k, v in limiter.client.hgetall(limiter.keys.config).items()
        }
        home_shared = {
            _text(k): _text(v) for k, v in limiter.client.hgetall(limiter.keys.shared).items()
        }
    core = limiter._core
    limits = core.limits(dict(config))  # type: ignore[arg-type]
    caps = core.concurrency(dict(config))  # type: ignore[arg-type]
    other = metrics.OTHER

    buckets: dict[str, dict[str, Any]] = {}
    concurrency: dict[str, dict[str, Any]] = {}
    for part in parts:
        for scope, b in part["buckets"].items():
            if shared_scope(scope) is None:
                buckets[scope] = b
            elif scope in limits:
                burst = limits[scope].limit.capacity
                tokens = buckets.get(scope, {}).get("tokens", 0.0) + b["tokens"]
                buckets[scope] = {
                    "tokens": tokens,
                    "burst": burst,
                    "fill": tokens / burst,
                    "limit": scope,
                }
        for scope, c in part["concurrency"].items():
            if shared_scope(scope) is None:
                concurrency[scope] = c
            elif scope in caps:
                running = concurrency.get(scope, {}).get("running", 0) + c["running"]
                concurrency[scope] = {"cap": caps[scope], "running": running, "limit": scope}

    lanes: dict[str, dict[str, Any]] = {}
    for part in parts:
        for lane, stats in part["lanes"].items():
            seen = lanes.get(lane)
            if seen is None:
                lanes[lane] = dict(stats)
                continue
            for key, value in stats.items():
                seen[key] = max(seen[key], value) if key == "oldest_wait_ms" else seen[key] + value

    histograms = [p["wait_ms_histogram"] for p in parts]
    first = parts[0]
    at_ms = max(p["at_ms"] for p in parts)
    return {
        "at_ms": at_ms,
        "namespace": limiter.namespace,
        "shards": limiter.shards,
        "eviction": next(
            (p["eviction"] for p in parts if p["eviction"].get("evicting")), first["eviction"]
        ),
        "config_version": int(config.get("_version", 0)),
        "shadow": config.get("mode:shadow") == "1",
        "recording_s": float(config["mode:record"]) if "mode:record" in config else None,
        "limits": {
            scope: {
                "rate_per_s": s.limit.rate_per_second,
                "burst": s.limit.capacity,
                "shadow": s.shadow,
            }
            for scope, s in limits.items()
        },
        "caps": caps,
        "exemptions": core.exemptions(dict(config)),  # type: ignore[arg-type]
        # (Pauses are configuration: the home slot's, as set.)
        **metrics.pauses_shown(core.pauses(dict(config), at_ms)),  # type: ignore[arg-type]
        "totals": _summed(p["totals"] for p in parts),
        # (Fail-mode decisions are added to the home slot's shared hash.)
        "fail_mode": {
            mode: n + int(float(home_shared.get(f"f:{mode}", 0)))
            for mode, n in _summed(p["fail_mode"] for p in parts).items()
        },
        "denied_by": _summed(p["denied_by"] for p in parts),
        "would_deny_by": _summed(p["would_deny_by"] for p in parts),
        "tenant_denials": _ranked(
            (p["tenant_denials"] for p in parts), max_tenants, metrics._top, other
        ),
        "tenant_backlog": _ranked(
            (p["tenant_backlog"] for p in parts), max_tenants, metrics._top, other
        ),
        "allowed_by_queue": _ranked(
            (p["allowed_by_queue"] for p in parts), max_queues, metrics._top, other
        ),
        "allowed_by_priority": _ranked(
            (p["allowed_by_priority"] for p in parts), max_priorities, metrics._top, other
        ),
        "wait_ms_histogram": {
            "bounds": first["wait_ms_histogram"]["bounds"],
            "counts": [sum(c) for c in zip(*(h["counts"] for h in histograms), strict=True)],
            "sum": sum(h["sum"] for h in histograms),
        },
        "buckets": dict(sorted(buckets.items())),
        "concurrency": dict(sorted(concurrency.items())),
        "lanes": metrics._top_lanes(lanes, max_queues),
        "tenants": dict(sorted(_summed_tenants(parts).items())),
    }


def _summed_tenants(parts: list[Snapshot]) -> dict[str, Any]:
    """Every shown tenant (each lives on one shard; the "~other" rows are not tenants)."""
    out: dict[str, Any] = {}
    for part in parts:
        out.update(part["tenants"])
    return out
