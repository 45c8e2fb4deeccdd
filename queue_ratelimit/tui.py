"""``queue-ratelimit top``: a terminal dashboard of one namespace (the ``tui`` extra).

It polls ``metrics.snapshot`` (a few Redis round trips) once a second and shows what an
operator needs at 3 a.m.: the budgets and how full they are, decisions per second (allowed,
denied, would-deny) overall and by queue and priority, who is throttled and by which scope,
the waits denied jobs were given, parked and in-flight work, and the latest configuration
changes. Rates are differences between two polls, so the first screen shows totals only.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any, ClassVar

from redis.exceptions import RedisError
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Static

from ._core import AuditEntry
from ._decision import readable_config_value
from ._errors import RateLimitError
from ._limiter import Limiter
from .metrics import snapshot

BAR_WIDTH = 20
CHANGES_SHOWN = 6
# Tenant hashes read per poll (SCAN, then one pipelined HMGET each): a bounded cost per
# poll whatever the number of tenants; with many, the table fills in over a few polls.
SAMPLE_PER_POLL = 500
TENANTS_KEPT = 10_000
TOP_TENANTS = 12


@dataclass
class TenantSample:
    """A tenant's counters when last read, and the rates between its last two reads."""

    allowed: float
    denied: float
    at_ms: float
    top_scope: str = ""  # the scope that denied it most
    allowed_rate: float | None = None
    denied_rate: float | None = None


class TenantSampler:
    """Walks the namespace's tenant hashes a slice per poll (a SCAN cursor kept between
    polls), so that tenants throttled by a default limit (``tenant:*``), which the metrics
    snapshot does not list one by one, show up too."""

    def __init__(self, limiter: Limiter, per_poll: int = SAMPLE_PER_POLL) -> None:
        self.limiter = limiter
        self.per_poll = per_poll
        self.cursor = 0
        self.tenants: dict[str, TenantSample] = {}
        self.prefix = limiter.keys.tenant_prefix

    def poll(self, now_ms: float) -> None:
        client = self.limiter.client
        self.cursor, keys = client.scan(self.cursor, match=f"{self.prefix}*", count=self.per_poll)
        if not keys:
            return
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        for key, fields in zip(keys, pipe.execute(), strict=True):
            name = (key.decode() if isinstance(key, bytes) else key)[len(self.prefix) :]
            self._record(name, fields, now_ms)
        if len(self.tenants) > TENANTS_KEPT:  # forget the longest unseen
            for stale in sorted(self.tenants, key=lambda t: self.tenants[t].at_ms)[
                : len(self.tenants) - TENANTS_KEPT
            ]:
                del self.tenants[stale]

    def _record(self, tenant: str, fields: dict[Any, Any], now_ms: float) -> None:
        allowed = denied = most = 0.0
        top_scope = ""
        for raw_key, raw_value in fields.items():
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            if key == "n:a":
                allowed = float(raw_value)
            elif key.startswith("d:"):  # denials by deciding scope (lua/buckets.lua)
                count = float(raw_value)
                denied += count
                if count > most:
                    most, top_scope = count, key[2:]
        old = self.tenants.get(tenant)
        sample = TenantSample(allowed, denied, now_ms, top_scope)
        if old is not None and now_ms > old.at_ms:
            seconds = (now_ms - old.at_ms) / 1000
            sample.allowed_rate = max(0.0, allowed - old.allowed) / seconds
            sample.denied_rate = max(0.0, denied - old.denied) / seconds
        self.tenants[tenant] = sample

    def top(self, count: int = TOP_TENANTS) -> list[tuple[str, TenantSample]]:
        """The most throttled tenants: by denials per second, then by denials."""
        ranked = sorted(
            (item for item in self.tenants.items() if item[1].denied),
            key=lambda item: (-(item[1].denied_rate or 0.0), -item[1].denied),
        )
        return ranked[:count]


def fill_bar(fill: float, width: int = BAR_WIDTH) -> str:
    """``███████░░░░ 58%``: how full a bucket is."""
    fill = min(1.0, max(0.0, fill))
    full = round(fill * width)
    return f"{'█' * full}{'░' * (width - full)} {fill:4.0%}"


def _rate(now: float, before: float | None, seconds: float) -> float | None:
    if before is None or seconds <= 0:
        return None
    return max(0.0, (now - before) / seconds)


def _per_s(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


@dataclass
class View:
    """What the screen shows, computed from two snapshots (``before`` may be None)."""

    title: str
    decisions: list[tuple[str, str, str]] = field(default_factory=list)
    budgets: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    throttled: list[tuple[str, str, str, str]] = field(default_factory=list)
    usage: list[tuple[str, str, str]] = field(default_factory=list)
    waits: str = ""


def build_view(
    snap: dict[str, Any],
    before: dict[str, Any] | None,
    tenants: list[tuple[str, TenantSample]] | None = None,
) -> View:
    """The dashboard's rows, from the latest snapshot and the one before it; ``tenants``:
    the most throttled tenants found by a ``TenantSampler`` (else those the snapshot
    lists)."""
    seconds = (snap["at_ms"] - before["at_ms"]) / 1000 if before else 0.0

    def then(*path: str) -> Any:
        node: Any = before
        for key in path:
            if not isinstance(node, dict):
                return None
            node = node.get(key)
        return node

    totals = snap["totals"]
    flags = " · DRY RUN (shadow): nothing is denied" if snap["shadow"] else ""
    if snap.get("recording_s"):
        flags += f" · recording the last {snap['recording_s']:g} s for previews"
    if snap.get("eviction", {}).get("evicting"):
        flags += f" · REDIS EVICTS KEYS ({snap['eviction']['policy']}): parked work may be lost"
    view = View(title=f"namespace {snap['namespace']} · config v{snap['config_version']}{flags}")
    for name in ("allowed", "denied", "would_deny"):
        rate = _rate(totals[name], then("totals", name), seconds)
        view.decisions.append((name.replace("_", "-"), _per_s(rate), f"{totals[name]:,}"))
    view.decisions.append(("in flight", "", f"{totals['in_flight']:,}"))
    view.decisions.append(("reaped", "", f"{totals['reaped']:,}"))
    if totals.get("lost"):  # only ever on a Redis that evicts keys
        view.decisions.append(("LOST (evicted)", "", f"{totals['lost']:,}"))

    limits = snap["limits"]
    for scope, bucket in sorted(snap["buckets"].items()):
        setting = limits.get(scope) or limits.get("tenant:*") or {}
        denied = _rate(snap["denied_by"].get(scope, 0), then("denied_by", scope) or 0, seconds)
        mode = " (shadow)" if setting.get("shadow") else ""
        view.budgets.append(
            (
                scope + mode,
                f"{setting.get('rate_per_s', 0):g}/s, burst {bucket['burst']:g}",
                f"{bucket['tokens']:,.1f}",
                fill_bar(bucket["fill"]),
                _per_s(denied),
            )
        )

    # Concurrency caps beside the budgets: jobs running / the cap, the bar shows what is free.
    for scope, c in sorted(snap.get("concurrency", {}).items()):
        denied = _rate(snap["denied_by"].get(scope, 0), then("denied_by", scope) or 0, seconds)
        view.budgets.append(
            (
                f"{scope} (concurrency)",
                f"{c['cap']:,} at once",
                f"{c['running']:,}/{c['cap']:,} running",
                fill_bar(max(0.0, 1 - c["running"] / c["cap"])),
                _per_s(denied),
            )
        )

    # Denials by the scope that decided: queue and global scopes for everyone, and each
    # listed tenant's own (their sum over the tenant is its denials).
    # Who is throttled: everyone, by queue and global scopes; then tenants, with the scope
    # that denied each most (sampled), or the tenants the snapshot lists.
    for scope, count in sorted(snap["denied_by"].items(), key=lambda kv: -kv[1]):
        rate = _rate(count, then("denied_by", scope) or 0, seconds)
        view.throttled.append(("everyone", scope, _per_s(rate), f"{count:,}"))
    if tenants is not None:
        for tenant, sample in tenants:
            rate_text = _per_s(sample.denied_rate)
            view.throttled.append((tenant, sample.top_scope, rate_text, f"{sample.denied:,.0f}"))
    else:
        for tenant, stats in sorted(snap["tenants"].items(), key=lambda kv: -kv[1]["denied"]):
            if stats["denied"]:
                rate = _rate(stats["denied"], then("tenants", tenant, "denied") or 0, seconds)
                view.throttled.append((tenant, "", _per_s(rate), f"{stats['denied']:,}"))

    for kind, key in (("queue", "allowed_by_queue"), ("priority", "allowed_by_priority")):
        for name, count in sorted(snap[key].items()):
            rate = _rate(count, then(key, name) or 0, seconds)
            view.usage.append((f"{kind} {name}", _per_s(rate), f"{count:,}"))
    for lane, stats in sorted(snap["lanes"].items()):
        oldest = f"oldest {stats['oldest_wait_ms'] / 1000:,.1f} s" if stats["backlog"] else ""
        view.usage.append((f"parked in {lane}", oldest, f"{stats['backlog']:,}"))

    histogram = snap["wait_ms_histogram"]
    labels = [f"≤{b}ms" for b in histogram["bounds"]] + ["more"]
    counts = histogram["counts"]
    previous = then("wait_ms_histogram", "counts") or [0] * len(counts)
    recent = [now - old for now, old in zip(counts, previous, strict=False)]
    shown = recent if before else counts
    view.waits = "  ".join(f"{label} {n:,}" for label, n in zip(labels, shown, strict=True) if n)
    if not view.waits:
        view.waits = "no denials" + (" since the last poll" if before else "")
    return view


def change_rows(entries: list[AuditEntry]) -> list[tuple[str, str, str]]:
    """Audit entries as rows: local time, who, and what changed (values as written)."""
    rows = []
    for entry in entries:
        at = datetime.datetime.fromtimestamp(entry.at_ms / 1000).strftime("%H:%M:%S")
        old = readable_config_value(entry.field, entry.old)
        new = readable_config_value(entry.field, entry.new)
        rows.append((at, entry.actor, f"{entry.op} {entry.field}: {old} -> {new}"))
    return rows


class TopApp(App[None]):
    """The dashboard. ``interval``: seconds between polls; ``sample_per_poll``: tenant
    hashes read per poll."""

    TITLE = "queue-ratelimit top"
    CSS = """
    DataTable { height: auto; max-height: 16; margin-bottom: 1; }
    #status { color: $warning; }
    .title { text-style: bold; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "Quit"),
        Binding("p", "pause", "Pause / resume"),
    ]

    def __init__(
        self, limiter: Limiter, *, interval: float = 1.0, sample_per_poll: int = SAMPLE_PER_POLL
    ) -> None:
        super().__init__()
        self.limiter = limiter
        self.interval = interval
        self.paused = False
        self.last: dict[str, Any] | None = None
        self.polls = 0
        self.sampler = TenantSampler(limiter, per_poll=sample_per_poll)
        self.changes_version: int | None = None

    def compose(self) -> ComposeResult:
        yield Header(show_clock=True)
        yield Static("", id="status")
        with Horizontal():
            with Vertical():
                yield Static("Decisions", classes="title")
                yield DataTable(id="decisions", cursor_type="none")
                yield Static("Usage", classes="title")
                yield DataTable(id="usage", cursor_type="none")
                yield Static("Recent changes", classes="title")
                yield DataTable(id="changes", cursor_type="none")
            with Vertical():
                yield Static("Budgets", classes="title")
                yield DataTable(id="budgets", cursor_type="none")
                yield Static("Throttled (denials; tenants sampled)", classes="title")
                yield DataTable(id="throttled", cursor_type="none")
        yield Static("", id="waits")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#decisions", DataTable).add_columns("", "per s", "total")
        self.query_one("#budgets", DataTable).add_columns(
            "scope", "limit", "tokens", "fill", "denied/s"
        )
        self.query_one("#throttled", DataTable).add_columns(
            "who", "denied most by", "per s", "total"
        )
        self.query_one("#usage", DataTable).add_columns("", "admitted/s", "total")
        self.query_one("#changes", DataTable).add_columns("at", "who", "what")
        self.refresh_data()
        self.set_interval(self.interval, self.refresh_data)

    def action_pause(self) -> None:
        self.paused = not self.paused
        self.query_one("#status", Static).update("paused" if self.paused else "")

    def refresh_data(self) -> None:
        if not self.paused:
            self.run_worker(self._poll, thread=True, exclusive=True, group="poll")

    def _poll(self) -> None:
        try:
            snap = snapshot(self.limiter)
            self.sampler.poll(snap["at_ms"])
            # The audit log is read again only when the configuration moved.
            changes = None
            if snap["config_version"] != self.changes_version:
                changes = change_rows(self.limiter.audit_log(count=CHANGES_SHOWN))
        except (RateLimitError, RedisError, OSError) as exc:
            self.call_from_thread(self._show_error, exc)
            return
        self.call_from_thread(self._show, snap, changes)

    def _show_error(self, exc: Exception) -> None:
        self.query_one("#status", Static).update(f"cannot read Redis ({exc}); retrying")

    def _show(self, snap: dict[str, Any], changes: list[tuple[str, str, str]] | None) -> None:
        if changes is not None:
            self.changes_version = snap["config_version"]
            table = self.query_one("#changes", DataTable)
            table.clear()
            table.add_rows(changes)
        view = build_view(snap, self.last, self.sampler.top())
        self.last = snap
        self.polls += 1
        self.sub_title = view.title
        if not self.paused:
            self.query_one("#status", Static).update("")
        for table_id, rows in (
            ("#decisions", view.decisions),
            ("#budgets", view.budgets),
            ("#throttled", view.throttled),
            ("#usage", view.usage),
        ):
            table = self.query_one(table_id, DataTable)
            table.clear()
            table.add_rows(rows)
        self.query_one("#waits", Static).update(f"Waits given to denied jobs: {view.waits}")
