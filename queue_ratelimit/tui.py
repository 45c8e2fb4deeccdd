"""``queue-ratelimit top``: a terminal dashboard of one namespace (the ``tui`` extra).

It polls ``metrics.snapshot`` (a few Redis round trips) once a second and shows what an
operator needs at 3 a.m.: the budgets and how full they are, decisions per second (allowed,
denied, would-deny) overall and by queue and priority, who is throttled and by which scope,
the waits denied jobs were given, parked and in-flight work, and the latest configuration
changes. Rates are differences between two polls, so the first screen shows totals only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from redis.exceptions import RedisError
from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Static

from ._core import AuditEntry
from ._counters import flush_counters
from ._decision import readable_config_value
from ._errors import RateLimitError
from ._limit import Limit
from ._limiter import Limiter
from ._scopes import Scope
from .metrics import snapshot

BAR_WIDTH = 8
CHANGES_SHOWN = 6
# Tenants listed under a default limit (tenant:*): the emptiest buckets that are not full.
DEFAULT_TENANTS_SHOWN = 8
# Tenant hashes read per poll (SCAN, then one pipelined HMGET each): a bounded cost per
# poll whatever the number of tenants; with many, the table fills in over a few polls.
SAMPLE_PER_POLL = 500
TENANTS_KEPT = 10_000
TOP_TENANTS = 12


TenantRate = Callable[[str], float | None]


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
        # The counts the server keeps in memory for a moment, written first (_counters.py).
        flush_counters(self.limiter)
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
    """``█████░░░  58%``: how full a bucket is."""
    fill = min(1.0, max(0.0, fill))
    full = round(fill * width)
    return f"{'█' * full}{'░' * (width - full)} {fill:4.0%}"


def _rate(now: float, before: float | None, seconds: float) -> float | None:
    if before is None or seconds <= 0:
        return None
    return max(0.0, (now - before) / seconds)


def _per_s(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def limit_text(setting: dict[str, Any]) -> str:
    """``50/s (100)``: a limit's rate in its most readable unit, and its burst (``10/s
    (10+50)`` with 50 burst credits; each further window of the scope has a row of its own)."""
    rate = setting["rate_per_s"]
    for unit, seconds in (("s", 1), ("m", 60), ("h", 3600), ("d", 86400)):
        if rate * seconds >= 1 or unit == "d":
            text = f"{rate * seconds:.3g}/{unit}"
            break
    shadow = " shadow" if setting.get("shadow") else ""
    credit = f"+{setting['credit']:g}" if setting.get("credit") else ""
    return f"{text} ({setting['burst']:g}{credit}){shadow}"


def _tokens(value: float) -> str:
    return f"{value:,.1f}" if value < 10_000 else f"{value:,.0f}"


def _bucket_tokens(bucket: dict[str, Any]) -> str:
    """A bucket's tokens, and its banked burst credits when its limit has them: ``4.0+50``."""
    if "credit" not in bucket:
        return _tokens(bucket["tokens"])
    return f"{_tokens(bucket['tokens'])}+{bucket['credit']:,.0f}"


def _window_rows(scope: str, buckets: dict[str, Any]) -> list[tuple[float, Row5]]:
    """The further windows of a scope with several (buckets ``"<scope> (<window>)"``)."""
    head = f"{scope} ("
    return [
        (b["fill"], (f"  {name[len(scope) + 1 :]}", "", _bucket_tokens(b), fill_bar(b["fill"]), ""))
        for name, b in buckets.items()
        if name.startswith(head)
    ]


@dataclass
class View:
    """What the screen shows, computed from two snapshots (``before`` may be None)."""

    title: str
    decisions: list[tuple[str, str, str]] = field(default_factory=list)
    budgets: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    throttled: list[tuple[str, str, str, str]] = field(default_factory=list)
    usage: list[tuple[str, str, str]] = field(default_factory=list)
    waits: str = ""

    @property
    def summary(self) -> str:
        """The decisions in two lines: rates (totals), then work waiting and in flight."""
        rates = "  ".join(
            f"{name} {per_s}/s ({total})" for name, per_s, total in self.decisions[:3]
        )
        counts = "  ".join(f"{name} {total}" for name, _, total in self.decisions[3:])
        return f"{rates}\n{counts}"


Row5 = tuple[str, str, str, str, str]
Group = tuple[tuple[float, int, str], list[Row5]]


def _under_default(members: list[tuple[float, Row5]]) -> tuple[float, list[Row5]]:
    """The rows of the tenants under a default (fill, row each): the emptiest that are not
    full, at most DEFAULT_TENANTS_SHOWN, and how many more; with the group's lowest fill."""
    members.sort(key=lambda m: (m[0], m[1][0]))
    shown = [m for m in members if m[0] < 1][:DEFAULT_TENANTS_SHOWN]
    rows = [(f"  {row[0]}", *row[1:]) for _, row in shown]
    rest = len(members) - len(shown)
    if rest:
        noun = "tenant" if rest == 1 else "tenants"
        more = f"more {noun}" if shown else f"{noun}, full"
        rows.append((f"  … {rest} {more}", "", "", "", ""))
    return min((fill for fill, _ in shown), default=1.0), rows


def _limit_groups(
    snap: dict[str, Any], denied_rate: Callable[[str], float | None], tenant_rate: TenantRate
) -> list[Group]:
    limits, buckets = snap["limits"], snap["buckets"]
    exemptions: dict[str, str] = snap.get("exemptions", {})
    groups: list[Group] = []
    for scope in sorted(limits):
        setting = limits[scope]
        parsed = Scope.parse(scope)
        exempt = exemptions.get(parsed.tenant or "")
        bucket = buckets.get(scope)
        fill = 1.0
        if exempt is not None and parsed.tenant is not None:
            rows: list[Row5] = [(scope, "exempt", "–", f"{exempt} scopes", "")]
        elif bucket is not None:
            fill = bucket["fill"]
            cells = (_bucket_tokens(bucket), fill_bar(fill))
            rows = [(scope, limit_text(setting), *cells, _per_s(denied_rate(scope)))]
            windows = _window_rows(scope, buckets)
            rows += [row for _, row in windows]
            fill = min([fill, *(f for f, _ in windows)])
        else:  # a default, or a tenant past the snapshot's cap
            rows = [(scope, limit_text(setting), "", "", _per_s(denied_rate(scope)))]
        if parsed.is_default:
            members = [
                (b["fill"], (name, "", _bucket_tokens(b), fill_bar(b["fill"]), rate))
                for name, b in buckets.items()
                if b.get("limit") == scope
                for rate in (_per_s(tenant_rate(name)),)
            ]
            fill, under = _under_default(members)
            rows += under
        groups.append(((fill, 0, scope), rows))
    for tenant, mode in sorted(exemptions.items()):
        if f"tenant:{tenant}" not in limits:
            row = (f"tenant:{tenant}", "exempt", "–", f"{mode} scopes", "")
            groups.append(((1.0, 1, tenant), [row]))
    return groups


def _cap_groups(snap: dict[str, Any]) -> list[Group]:
    """Concurrency caps: jobs running / the cap; the bar shows the share still free."""
    caps: dict[str, int] = snap.get("caps", {})
    running: dict[str, dict[str, Any]] = snap.get("concurrency", {})

    def row(scope: str, c: dict[str, Any]) -> tuple[float, Row5]:
        free = max(0.0, 1 - c["running"] / c["cap"])
        return free, (scope, "", f"{c['running']:,}/{c['cap']:,}", fill_bar(free), "")

    groups: list[Group] = []
    for source, cap in sorted(caps.items()):
        members = [row(s, c) for s, c in running.items() if c.get("limit") == source]
        header: Row5 = (f"{source} running", f"cap {cap:,}", "", "", "")
        if Scope.parse(source).is_default:
            fill, under = _under_default(members)
            groups.append(((fill, 2, source), [header, *under]))
        elif members:
            fill, own = members[0]
            groups.append(((fill, 2, source), [(header[0], header[1], *own[2:])]))
    return groups


def _pause_groups(snap: dict[str, Any]) -> list[Group]:
    """Paused scopes (Limiter.pause), above everything else: nothing of them is admitted."""
    pauses: dict[str, dict[str, Any]] = snap.get("pauses", {})
    return [
        ((-1.0, 0, scope), [(scope, "PAUSED", f"{p['remaining_s']:,.1f} s left", "", "")])
        for scope, p in sorted(pauses.items())
    ]


def _budget_rows(
    snap: dict[str, Any], denied_rate: Callable[[str], float | None], tenant_rate: TenantRate
) -> list[Row5]:
    """Every configured limit, each default followed by its most throttled tenants, the
    exemptions, and the concurrency caps with the jobs running under them. Groups come
    emptiest first (a binding scope at the top, whatever its name), then by name; paused
    scopes before them all."""
    groups = _pause_groups(snap) + _limit_groups(snap, denied_rate, tenant_rate)
    groups += _cap_groups(snap)
    return [row for _, rows in sorted(groups) for row in rows]


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
    view.decisions.append(("parked", "", f"{totals.get('parked', 0):,}"))
    view.decisions.append(("in flight", "", f"{totals['in_flight']:,}"))
    view.decisions.append(("reaped", "", f"{totals['reaped']:,}"))
    if totals.get("lost"):  # only ever on a Redis that evicts keys
        view.decisions.append(("LOST (evicted)", "", f"{totals['lost']:,}"))
    failed = sum(snap.get("fail_mode", {}).values())
    if failed:
        view.decisions.append(("fail-mode decisions", "", f"{failed:,}"))

    def denied_rate(scope: str) -> float | None:
        return _rate(snap["denied_by"].get(scope, 0), then("denied_by", scope) or 0, seconds)

    def tenant_rate(scope: str) -> float | None:
        tenant = Scope.parse(scope).tenant or ""
        now = snap["tenants"].get(tenant, {}).get("denied_by", {}).get(scope, 0)
        return _rate(now, then("tenants", tenant, "denied_by", scope) or 0, seconds)

    view.budgets = _budget_rows(snap, denied_rate, tenant_rate)

    # Who is throttled: by the scope that decided ("everyone" for shared scopes and the
    # defaults, tenant:* counting every tenant under it; the tenant for its own scopes),
    # then tenants, with the scope that denied each most (sampled), or the tenants the
    # snapshot lists.
    listed = {tenant for tenant, _ in tenants or []}
    for scope, count in sorted(snap["denied_by"].items(), key=lambda kv: -kv[1]):
        # (A pause's denials count as "pause:<scope>", tenants' as "pause:tenant:*".)
        parsed = Scope.parse(scope.removeprefix("pause:"))
        who = "everyone" if parsed.tenant in (None, "*") else str(parsed.tenant)
        if who not in listed:  # (a sampled tenant has a row of its own below)
            view.throttled.append((who, scope, _per_s(denied_rate(scope)), f"{count:,}"))
    if tenants is not None:
        for tenant, sample in tenants:
            rate_text = _per_s(sample.denied_rate)
            view.throttled.append((tenant, sample.top_scope, rate_text, f"{sample.denied:,.0f}"))
    else:
        for tenant, stats in sorted(snap["tenants"].items(), key=lambda kv: -kv[1]["denied"]):
            if stats["denied"]:
                rate = _rate(stats["denied"], then("tenants", tenant, "denied") or 0, seconds)
                top = max(stats.get("denied_by", {"": 0}).items(), key=lambda kv: kv[1])[0]
                view.throttled.append((tenant, top, _per_s(rate), f"{stats['denied']:,}"))

    for kind, key in (("queue", "allowed_by_queue"), ("priority", "allowed_by_priority")):
        for name, count in sorted(snap[key].items()):
            rate = _rate(count, then(key, name) or 0, seconds)
            view.usage.append((f"{kind} {name}", _per_s(rate), f"{count:,}"))
    for lane, stats in sorted(snap["lanes"].items()):
        oldest = f"{stats['oldest_wait_ms'] / 1000:,.1f} s old" if stats["backlog"] else ""
        view.usage.append((f"parked {lane}", oldest, f"{stats['backlog']:,}"))

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


# Fixed widths of the budgets table's columns after the scope (limit, tokens, fill,
# denied/s): the scope column gets what the screen has left, so the tokens and the fill
# are never cut, down to 80 columns.
BUDGET_COLUMNS = (("limit (burst)", 13), ("tokens", 9), ("fill", BAR_WIDTH + 5), ("denied/s", 8))
# The bottom panels' columns, fitting 45 and 35 columns at 80 (names cut if they must be).
THROTTLED_COLUMNS = (("who", 9), ("denied most by", 15), ("/s", 5), ("total", 6))
USAGE_COLUMNS = (("", 14), ("admitted/s", 10), ("total", 5))
# Below this width the recent changes are left out (the other panels need the room).
CHANGES_MIN_WIDTH = 120


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


class TopApp(App[None]):
    """The dashboard. ``interval``: seconds between polls; ``sample_per_poll``: tenant
    hashes read per poll.

    Layout, from 80x24 up: the decisions in two lines; the budgets across the whole width
    (tokens and fill always whole, the scope cut if it must be); who is throttled, the
    usage by queue and priority and (from 120 columns) the recent changes side by side;
    the waits given to denied jobs in one line.
    """

    TITLE = "queue-ratelimit top"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #summary { height: 2; padding: 0 1; }
    #status { color: $warning; height: auto; }
    .title { text-style: bold; height: 1; padding: 0 1; }
    DataTable { height: 1fr; overflow-x: hidden; scrollbar-size-vertical: 1; }
    #budgets-box { height: 3fr; min-height: 5; }
    #bottom { height: 2fr; min-height: 5; }
    #throttled-box { width: 45fr; }
    #usage-box { width: 35fr; }
    #changes-box { width: 40fr; }
    #waits { height: 1; padding: 0 1; }
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
        self.view: View | None = None
        self._scope_width = 0

    def compose(self) -> ComposeResult:
        yield Header(show_clock=True, icon="≡")
        yield Static("", id="status")
        yield Static("", id="summary")
        with Vertical(id="budgets-box"):
            yield Static("Budgets", classes="title")
            yield DataTable(id="budgets", cursor_type="none")
        with Horizontal(id="bottom"):
            with Vertical(id="throttled-box"):
                yield Static("Throttled", classes="title")
                yield DataTable(id="throttled", cursor_type="none")
            with Vertical(id="usage-box"):
                yield Static("Usage", classes="title")
                yield DataTable(id="usage", cursor_type="none")
            with Vertical(id="changes-box"):
                yield Static("Recent changes", classes="title")
                yield DataTable(id="changes", cursor_type="none")
        yield Static("", id="waits")
        yield Footer()

    def on_mount(self) -> None:
        throttled = self.query_one("#throttled", DataTable)
        for label, width in THROTTLED_COLUMNS:
            throttled.add_column(label, width=width)
        usage = self.query_one("#usage", DataTable)
        for label, width in USAGE_COLUMNS:
            usage.add_column(label, width=width)
        self.query_one("#changes", DataTable).add_columns("at", "who", "what")
        self._fit(self.size.width)
        self.refresh_data()
        self.set_interval(self.interval, self.refresh_data)

    def on_resize(self, event: events.Resize) -> None:
        self._fit(event.size.width)

    def _fit(self, width: int) -> None:
        """Columns for this width: the budgets' scope takes what the others leave."""
        self.query_one("#changes-box").display = width >= CHANGES_MIN_WIDTH
        fixed = sum(w for _, w in BUDGET_COLUMNS)
        # Two cells of padding per column, one for the vertical scrollbar.
        scope_width = min(48, max(12, width - fixed - 2 * (len(BUDGET_COLUMNS) + 1) - 1))
        if scope_width == self._scope_width:
            return
        self._scope_width = scope_width
        table = self.query_one("#budgets", DataTable)
        table.clear(columns=True)
        table.add_column("scope", width=scope_width)
        for label, w in BUDGET_COLUMNS:
            table.add_column(label, width=w)
        if self.view is not None:
            self._fill_budgets(self.view)

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

    def _fill_budgets(self, view: View) -> None:
        table = self.query_one("#budgets", DataTable)
        table.clear()
        table.add_rows((_clip(row[0], self._scope_width), *row[1:]) for row in view.budgets)

    def _show(self, snap: dict[str, Any], changes: list[tuple[str, str, str]] | None) -> None:
        if changes is not None:
            self.changes_version = snap["config_version"]
            table = self.query_one("#changes", DataTable)
            table.clear()
            table.add_rows(changes)
        view = build_view(snap, self.last, self.sampler.top())
        self.view = view
        self.last = snap
        self.polls += 1
        self.sub_title = view.title
        if not self.paused:
            self.query_one("#status", Static).update("")
        self.query_one("#summary", Static).update(view.summary)
        self._fill_budgets(view)
        for table_id, rows, columns in (
            ("#throttled", view.throttled, THROTTLED_COLUMNS),
            ("#usage", view.usage, USAGE_COLUMNS),
        ):
            table = self.query_one(table_id, DataTable)
            table.clear()
            table.add_rows(
                tuple(_clip(cell, width) for cell, (_, width) in zip(row, columns, strict=True))
                for row in rows
            )
        self.query_one("#waits", Static).update(f"Waits given to denied jobs: {view.waits}")


# -- the screenshot in the docs ---------------------------------------------------------
# `python -m queue_ratelimit.tui --screenshot docs/top.svg` (`make screenshot`): the
# dashboard at 80x24 on a namespace of the embedded engine (no Redis server needed) with a
# little of everything: a binding tenant-queue limit, tenants throttled under the
# defaults, an exempt tenant, concurrency caps in use and parked work.


def demo_limiter() -> Limiter:
    """A namespace of the embedded engine, configured as in the screenshot."""
    from ._embedded import embedded_client
    from ._scheduler import FairScheduler

    limiter = Limiter(embedded_client(), namespace="demo")
    limiter.set_limit("global", "500/s")
    limiter.set_limit("queue:emails", Limit(50, burst=50))
    limiter.set_limit("tenant:*", Limit(5, burst=10))
    limiter.set_limit("tenant:*:queue:emails", Limit(2, burst=4))
    limiter.set_limit("tenant:acme", Limit(20, burst=40, credit=100))  # burst credits
    limiter.set_limit("tenant:acme:queue:reports", Limit(1, per=3600, burst=2))
    limiter.set_limit("tenant:zed", ["2/s", "100/h"])  # two windows
    limiter.set_exempt("bigco", "tenant")
    limiter.set_concurrency("tenant:*", 4)
    scheduler = FairScheduler(limiter)
    for i in range(12):
        scheduler.submit("noisy", f"noisy-{i}", queue="emails")
    for i in range(3):
        scheduler.submit("zed", f"zed-{i}", queue="reports")
    return limiter


def _traffic(limiter: Limiter, stop: threading.Event) -> None:
    """Jobs of a few tenants until ``stop``: some admitted, some denied."""
    plan = (("acme", "reports"), ("noisy", "emails"), ("zed", None), ("bigco", "emails"))
    while not stop.is_set():
        for tenant, queue in plan:
            decision = limiter.acquire(tenant, queue=queue, priority="high", hold=600)
            if decision.slot is not None and tenant != "noisy":
                limiter.release(decision)
        stop.wait(0.02)


async def save_screenshot(path: Path, size: tuple[int, int] = (80, 24)) -> Path:
    """The dashboard on ``demo_limiter()`` after a few polls, as an SVG at ``path``."""
    limiter = demo_limiter()
    stop = threading.Event()
    worker = threading.Thread(target=_traffic, args=(limiter, stop), daemon=True)
    worker.start()
    try:
        app = TopApp(limiter, interval=0.5)
        async with app.run_test(size=size) as pilot:
            while app.polls < 3:
                await pilot.pause(0.1)
            app.save_screenshot(filename=path.name, path=str(path.parent))
            await pilot.press("q")
    finally:
        stop.set()
        worker.join()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m queue_ratelimit.tui")
    parser.add_argument("--screenshot", type=Path, required=True, help="the SVG to write")
    parser.add_argument("--size", default="80x24", help="columns x rows (default 80x24)")
    args = parser.parse_args(argv)
    columns, rows = (int(n) for n in args.size.lower().split("x"))
    print(asyncio.run(save_screenshot(args.screenshot, (columns, rows))))


if __name__ == "__main__":
    main()
