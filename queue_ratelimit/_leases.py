"""Slices of the shared scopes of a sharded namespace, and the rebalancer that moves them.

A sharded namespace (``Limiter(..., shards=N)``) decides each tenant on its own shard, in one
round trip to one hash slot. The shared scopes (``global``, ``queue:<q>``) cannot live on
one slot without a cross-slot call per decision, so each shard enforces a *slice* of them:
``share * rate`` and ``max(share * burst, min(burst, 1))`` of each limit, and a whole-number
part of each concurrency cap. The shares of a scope sum to 1, so the shards together never
refill faster than the limit (docs/design.md, "Shards", has the bound and why it holds).

Shares follow demand: every interval one process (whichever takes the lock on the home
slot) reads each shard's counters of admissions and denials per shared scope, gives the
shards that were never denied what they used plus headroom, and splits the rest among the
denied ones in proportion to their traffic. Pure arithmetic here (``allocate``,
``slices``); the I/O is ``Rebalancer``'s.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ._core import redis_errors
from ._errors import BackendError
from ._shard_count import judge_shards, queue_shard_record

if TYPE_CHECKING:
    from ._keys import KeySpace
    from ._shards import ShardedLimiter

log = logging.getLogger("queue_ratelimit")

# The share of a scope kept, over all shards together, for shards that use none of it: a
# shard whose tenants start sending has a rate at once (and a burst of at least one token),
# and is given more at the next rebalance. Under demand on one shard, this is what the
# others hold idle: at most 2% of the rate.
FLOOR = 0.02
# A shard that was never denied keeps what it used and this much more (of what it used).
HEADROOM = 0.10
# Shares that moved less than this, in absolute terms or relative to the share (for every
# shard), are not written: each write makes the shard's decisions plan again once (a
# config revision, about 27 us per active tenant: docs/benchmarks.md), and under uniform
# saturation the traffic each shard sees wobbles by a few percent from round to round.
MIN_MOVE, MIN_RELATIVE_MOVE = 0.01, 0.10


def shared_scope(field: str) -> str | None:
    """The shared scope a config field limits or caps (``global``, ``queue:<q>``,
    ``priority:<p>``), or None for a field every shard holds whole (tenant scopes,
    exemptions, modes, weights, pauses: a pause is a moment, the same on every shard)."""
    scope = field.removeprefix("conc:")
    if scope == "global" or scope.startswith(("queue:", "priority:")):
        return scope
    return None


def equal_shares(n: int) -> list[float]:
    return [1.0 / n] * n


def allocate(
    current: Sequence[float],
    admitted: Sequence[float],
    denied: Sequence[float],
    capacity: float | None,
) -> list[float]:
    """New shares of one shared scope, from one interval of observed demand.

    Args:
        current: each shard's share now (summing to 1).
        admitted: each shard's admissions under the scope in the interval.
        denied: each shard's denials by the scope in the interval.
        capacity: what the whole scope could admit in the interval (rate x seconds), or
            None for a scope with a concurrency cap only (its admissions stand in for it).

    When no shard was denied by the scope, nothing moves: every shard had what it asked
    for. Otherwise the shards never denied are "satisfied": they keep what they used plus
    HEADROOM (never more than they hold now), at least their floor; the denied ones split
    the rest in proportion to their traffic (admissions and denials), at least their floor.
    """
    n = len(current)
    floor = FLOOR / n
    if capacity is None or capacity <= 0:
        capacity = max(sum(admitted), 1.0)
    hungry = [d > 0 for d in denied]
    if not any(hungry):
        # Every shard had what it asked for: moving slices would only make every shard's
        # decisions plan again.
        return list(current)
    shares = [0.0] * n
    for i in range(n):
        if not hungry[i]:
            used = admitted[i] / capacity * (1 + HEADROOM) + floor
            shares[i] = max(floor, min(current[i], used))
    rest = 1.0 - sum(shares)
    traffic = [admitted[i] + denied[i] if hungry[i] else 0.0 for i in range(n)]
    weight = sum(traffic)
    for i in range(n):
        if hungry[i]:
            shares[i] = max(floor, rest * traffic[i] / weight)
    return _normalized(shares, floor)


def _normalized(wants: Sequence[float], floor: float) -> list[float]:
    total = sum(wants)
    return [max(floor, w) / total for w in wants]


def moved(old: Sequence[float], new: Sequence[float]) -> bool:
    return any(
        abs(a - b) >= max(MIN_MOVE, MIN_RELATIVE_MOVE * a) for a, b in zip(old, new, strict=True)
    )


def _limit_slices(value: str, shares: Sequence[float]) -> list[str]:
    """Each shard's slice of a limit: per window (``;``-joined), the rate, the burst (at
    least ``min(burst, 1)``) and the burst credit (flags ``c<n>``) times the share."""
    windows = []
    for text in value.split(";"):
        parts = text.split(" ")
        try:
            rate, per, burst = (float(p) for p in parts[:3])
            shadow, _, credit_text = parts[3].partition("c")
            credit = float(credit_text) if credit_text else None
        except (ValueError, IndexError):
            return [value] * len(shares)
        if len(parts) != 4 or not (rate > 0 and per > 0 and burst > 0):
            # A kind of limit this version does not know how to slice: every shard holds
            # it whole (docs/design.md says what that does to the bound).
            return [value] * len(shares)
        windows.append((rate, per, burst, shadow, credit))
    out = []
    for share in shares:
        sliced = []
        for rate, per, burst, shadow, credit in windows:
            flags = shadow if credit is None else f"{shadow}c{credit * share!r}"
            sliced.append(
                f"{rate * share!r} {per!r} {max(burst * share, min(burst, 1.0))!r} {flags}"
            )
        out.append(";".join(sliced))
    return out


def _cap_slices(value: str, shares: Sequence[float]) -> list[str]:
    """A cap of n split by largest remainder, each shard at least 1 (a cap of 0 cannot be
    configured): the parts sum to n when n >= the shards, else each shard holds 1."""
    total = int(value)
    n = len(shares)
    if total <= n:
        return ["1"] * n
    spare = total - n
    exact = [spare * s for s in shares]
    parts = [math.floor(e) for e in exact]
    order = sorted(range(n), key=lambda i: exact[i] - parts[i], reverse=True)
    for i in order[: spare - sum(parts)]:
        parts[i] += 1
    return [str(1 + p) for p in parts]


def slices(field: str, value: str, shares: Sequence[float]) -> list[str]:
    """What each shard enforces for one config field: its slice for a shared scope's
    limit or cap, the value itself otherwise ("" deletes it everywhere)."""
    if value == "" or shared_scope(field) is None:
        return [value] * len(shares)
    if field.startswith("conc:"):
        return _cap_slices(value, shares)
    return _limit_slices(value, shares)


def parse_shares(raw: str | None, n: int) -> list[float]:
    """Shares as stored at home ("0.5 0.25 0.25"); equal ones when absent or stale."""
    try:
        shares = [float(s) for s in (raw or "").split()]
    except ValueError:
        shares = []
    if len(shares) != n or not all(s > 0 for s in shares):
        return equal_shares(n)
    return shares


def shard_fields(
    config: Mapping[str, str], shares: Mapping[str, Sequence[float]], shard: int, n: int
) -> list[str]:
    """The whole configuration as shard ``shard`` of ``n`` enforces it, as lua/shards.lua's
    triples (field, value, "1" for a shared scope's limit)."""
    out: list[str] = []
    for field, value in config.items():
        if field.startswith("_"):
            continue
        scope = shared_scope(field)
        of_scope = shares.get(scope) if scope is not None else None
        part = slices(field, value, of_scope or equal_shares(n))[shard]
        out += [field, part, "1" if scope is not None and field == scope else ""]
    return out


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def counters(shared: Mapping[Any, Any], scope: str) -> tuple[float, float]:
    """(admissions, denials) of a shared scope in one shard's shared hash (lua/buckets.lua
    names the counters): every queue's admissions for ``global``, the priority's for
    ``priority:<p>``."""
    fields = {_text(k): _text(v) for k, v in shared.items()}
    denied = float(fields.get(f"d:{scope}", 0))
    if scope == "global":
        admitted = sum(float(v) for k, v in fields.items() if k.startswith("a:q:"))
    elif scope.startswith("priority:"):
        admitted = float(fields.get(f"a:p:{scope.removeprefix('priority:')}", 0))
    else:
        admitted = float(fields.get(f"a:q:{scope.removeprefix('queue:')}", 0))
    return admitted, denied


@dataclass(frozen=True, slots=True)
class RebalanceReport:
    """What one rebalance did.

    Attributes:
        epoch: the rebalancer's fencing epoch (grows with every rebalance).
        version: the configuration version the slices were computed from.
        shares: each shared scope's shares after the round, by scope.
        writes: shard writes made (slices moved, shards brought up to date).
        synced: shards found behind the configuration and copied it whole.
        seconds: how long the round took, as the client saw it.
        fenced: a newer round started meanwhile (its lock taken after this one's ran
            out): this one stopped at the first shard that refused it, and left the
            state at home to the newer one.
    """

    epoch: int
    version: int
    shares: dict[str, tuple[float, ...]]
    writes: int
    synced: int
    seconds: float
    fenced: bool = False


class RoundPlan:
    """What one rebalance round writes, computed from its reads (I/O-free: the sync and the
    asyncio rebalancer run the same plan).

    Attributes:
        version: the home configuration version the slices come from.
        shares: each shared scope's shares after the round.
        writes: (shard, mode, triples) in the order to write them: slices that shrink,
            then slices that grow, then whole copies to shards behind the configuration.
        synced: shards found behind, copied whole.
        state: the fields of the home slot's lease hash to write after the shards.
    """

    __slots__ = ("shares", "state", "synced", "version", "writes")

    def __init__(
        self,
        version: int,
        shares: dict[str, list[float]],
        writes: list[tuple[int, str, list[str]]],
        synced: int,
        state: dict[str, str],
    ) -> None:
        self.version, self.shares, self.writes = version, shares, writes
        self.synced, self.state = synced, state

    def report(self, epoch: int, writes: int, seconds: float, fenced: bool) -> RebalanceReport:
        shares = {s: tuple(v) for s, v in self.shares.items()}
        return RebalanceReport(epoch, self.version, shares, writes, self.synced, seconds, fenced)


class Sharded(Protocol):
    """What a rebalancer needs of its limiter's layout (``_shard_layout.ShardLayout``)."""

    shards: int
    shard_keys: list[KeySpace]

    @property
    def keys(self) -> KeySpace: ...

    def recheck_shards(self) -> None: ...


class RoundClock:
    """The part of a rebalancer that is no I/O: when the next round is due in this process,
    the lock it takes, what it reads and what it makes of the replies (``plan``). Subclassed
    by ``Rebalancer`` (redis) and ``_async_shards.AsyncRebalancer`` (redis.asyncio)."""

    def __init__(self, limiter: Sharded, interval: float) -> None:
        self.limiter: Sharded = limiter
        self.interval = interval
        self.due = time.monotonic() + interval
        self.owner = uuid.uuid4().hex
        self._failing = False
        self.last: RebalanceReport | None = None

    def lock_args(self) -> tuple[str, str, int]:
        """The lock a round takes for one interval (``SET key owner NX PX ms``)."""
        return self.limiter.keys.rebalance, self.owner, max(1, int(self.interval * 1000))

    def started(self) -> None:
        self.due = time.monotonic() + self.interval

    def queue_lock(self, pipe: Any) -> None:
        """A tick's one round trip (sync or asyncio pipeline): try the lock, and record or
        read the namespace's shard count (``_shard_count``) on the way."""
        key, owner, ms = self.lock_args()
        pipe.set(key, owner, nx=True, px=ms)
        queue_shard_record(pipe, self.limiter.keys, self.limiter.shards)

    def locked(self, replies: Sequence[Any]) -> bool:
        """Whether this tick runs a round: it took the lock and the namespace is still
        recorded with this limiter's count. Another count recorded since (``shards set
        --force``): no round (it would cut the slices for the wrong count), and the
        limiter checks again before its next script call, which then refuses."""
        took, _, recorded = replies
        try:
            judge_shards(self.limiter.keys, self.limiter.shards, recorded)
        except BackendError:
            self.limiter.recheck_shards()
            return False
        return bool(took)

    def failed(self, exc: Exception | None) -> None:
        """A round's outcome: logged once per streak of failures (Redis away: every
        interval would fail alike)."""
        if exc is None:
            self._failing = False
            return
        level = logging.DEBUG if self._failing else logging.WARNING
        log.log(level, "queue-ratelimit: rebalancing the shards failed: %s", exc)
        self._failing = True

    def queue_reads(self, pipe: Any) -> None:
        """A round's reads, on one pipeline (sync or asyncio: queueing is the same)."""
        lim = self.limiter
        pipe.hgetall(lim.keys.config)
        pipe.hgetall(lim.keys.share)
        for keys in lim.shard_keys:
            pipe.hget(keys.config, "_version")
            pipe.hgetall(keys.shared)

    def plan(self, now_us: int, replies: Sequence[Any]) -> RoundPlan:
        """The round's writes, from ``queue_reads``' replies at Redis time ``now_us``."""
        n = self.limiter.shards
        config = {_text(k): _text(v) for k, v in replies[0].items()}
        state = {_text(k): _text(v) for k, v in replies[1].items()}
        versions = [int(_text(v or 0)) for v in replies[2::2]]
        shared = replies[3::2]
        version = int(config.get("_version", 0))

        scopes = sorted({s for f in config if (s := shared_scope(f)) is not None})
        old = {s: parse_shares(state.get(f"shares:{s}"), n) for s in scopes}
        seen = json.loads(state.get("seen", "{}"))
        new = dict(old)
        counts: dict[str, list[list[float]]] = {}
        elapsed = (now_us - int(seen.get("at", now_us))) / 1e6
        for scope in scopes:
            now_counts = [list(counters(shared[i], scope)) for i in range(n)]
            counts[scope] = now_counts
            before = seen.get("n", {}).get(scope)
            if not before or len(before) != n or elapsed <= 0:
                continue
            admitted = [_delta(c[0], b[0]) for c, b in zip(now_counts, before, strict=True)]
            denied = [_delta(c[1], b[1]) for c, b in zip(now_counts, before, strict=True)]
            shares = allocate(old[scope], admitted, denied, _capacity(config.get(scope), elapsed))
            if moved(old[scope], shares):
                new[scope] = shares

        writes = _slice_writes(config, old, new, versions, version)
        behind = [i for i in range(n) if versions[i] < version]
        for i in behind:
            writes.append((i, "sync", shard_fields(config, new, i, n)))
        state_fields: dict[str, str] = {"seen": json.dumps({"at": now_us, "n": counts})}
        for scope, shares in new.items():
            state_fields[f"shares:{scope}"] = " ".join(repr(round(s, 6)) for s in shares)
        return RoundPlan(version, new, writes, len(behind), state_fields)


def _slice_writes(
    config: Mapping[str, str],
    old: Mapping[str, Sequence[float]],
    new: Mapping[str, Sequence[float]],
    versions: Sequence[int],
    version: int,
) -> list[tuple[int, str, list[str]]]:
    """Writes of the slices that moved, shrinking ones first (so the shards' rates never sum
    to more than the limit while they move); shards behind are copied whole instead."""
    n = len(versions)
    shrink: list[list[str]] = [[] for _ in range(n)]
    grow: list[list[str]] = [[] for _ in range(n)]
    for scope, shares in new.items():
        if shares is old[scope]:
            continue
        for field in (scope, f"conc:{scope}"):
            value = config.get(field)
            if value is None:
                continue
            parts = slices(field, value, shares)
            flag = "" if field.startswith("conc:") else "1"
            for i in range(n):
                target = shrink if shares[i] <= old[scope][i] else grow
                target[i] += [field, parts[i], flag]
    return [
        (i, "", batch[i])
        for batch in (shrink, grow)
        for i in range(n)
        if batch[i] and versions[i] >= version
    ]


class Rebalancer(RoundClock):
    """Moves the shared scopes' slices between the shards of one namespace by demand.

    ``tick`` (called after decisions) runs a round at most once per ``interval`` in this
    process, and only when it takes the namespace's lock (``SET NX PX``) for the interval:
    one process of all rebalances each interval. A round takes a new epoch and fences every
    shard with it (an older round still writing is refused from then on, everywhere), then
    one pipeline of reads, a write per shard whose slices moved (shrinking slices first, so
    the shards' sum never goes over the limit while they move), and a write of the state at
    home, unless a newer round fenced this one off meanwhile.
    """

    limiter: ShardedLimiter

    def __init__(self, limiter: ShardedLimiter, interval: float) -> None:
        super().__init__(limiter, interval)
        self._busy = threading.Lock()

    def tick(self) -> None:
        """Rebalance if it is this process's turn; never raises (a failed round is logged
        and tried again an interval later)."""
        if not self._busy.acquire(blocking=False):
            return
        try:
            self.started()
            pipe = self.limiter.client.pipeline(transaction=False)
            self.queue_lock(pipe)
            if self.locked(pipe.execute()):
                self.last = self.run()
            self.failed(None)
        except Exception as exc:  # (a round is best effort: decisions must go on)
            self.failed(exc)
        finally:
            self._busy.release()

    def run(self) -> RebalanceReport:
        """One round now, lock or not (``Limiter.rebalance``).

        Raises:
            BackendUnavailable / BackendError: as the limiter's calls do.
        """
        started = time.perf_counter()
        lim = self.limiter
        with redis_errors():
            epoch = int(lim.client.hincrby(lim.keys.share, "epoch", 1))
        # Fenced everywhere at once (and every decision counted so far written, in the
        # shards' hashes: the counts kept in memory).
        if any(lim.write_shard(i, 0, str(epoch), "fence", []) < 0 for i in range(lim.shards)):
            return RebalanceReport(epoch, 0, {}, 0, 0, time.perf_counter() - started, True)
        with redis_errors():
            seconds, micros = lim.client.time()
            pipe = lim.client.pipeline()
            self.queue_reads(pipe)
            replies = pipe.execute()
        plan = self.plan(seconds * 1_000_000 + micros, replies)
        writes = 0
        for shard, mode, triples in plan.writes:
            if lim.write_shard(shard, plan.version, str(epoch), mode, triples) < 0:
                return plan.report(epoch, writes, time.perf_counter() - started, True)
            writes += 1
        # Only while this round's epoch is the newest: a newer round that started meanwhile
        # writes its own state, which this one's must not overwrite if it lands later.
        fenced = lim.write_state(str(epoch), plan.state) < 0
        return plan.report(epoch, writes, time.perf_counter() - started, fenced)


def _delta(now: float, before: float) -> float:
    """A counter's growth; one that went down was reset (its hash lost): all it holds is
    new."""
    return now - before if now >= before else now


def _capacity(value: str | None, elapsed: float) -> float | None:
    """Tokens a limit (config value) refills in ``elapsed`` seconds, or None."""
    if not value:
        return None
    try:
        rate, per = (float(p) for p in value.split(" ")[:2])
    except ValueError:
        return None
    return rate / per * elapsed if per > 0 else None
