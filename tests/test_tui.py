"""`queue-ratelimit top`: the view it computes, and the app itself against a real Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
from conftest import NO_RETRY, free_port
from textual.widgets import DataTable, Static

from queue_ratelimit import FairScheduler, Limit, Limiter
from queue_ratelimit.metrics import snapshot
from queue_ratelimit.tui import (
    BUDGET_COLUMNS,
    TenantSampler,
    TopApp,
    build_view,
    fill_bar,
    save_screenshot,
)

HOUR = 3600.0


def test_fill_bar() -> None:
    assert fill_bar(0.5, width=10) == "█████░░░░░  50%"
    assert fill_bar(1.7, width=4) == "████ 100%"
    assert fill_bar(-1, width=4) == "░░░░   0%"


def test_view_rates_are_differences_between_two_polls(limiter: Limiter) -> None:
    limiter.set_limit("global", Limit(1, per=HOUR, burst=10))
    limiter.set_limit("tenant:slow", Limit(1, per=HOUR, burst=1))
    for _ in range(4):
        limiter.acquire("slow", queue="emails", priority="high")
    first = snapshot(limiter)
    for _ in range(6):
        limiter.acquire("fast", queue="emails")
    second = dict(snapshot(limiter), at_ms=first["at_ms"] + 2000)  # two seconds later

    start = build_view(first, None)
    assert ("allowed", "–", "1") in start.decisions  # one poll: totals, no rates yet
    assert ("denied", "–", "3") in start.decisions

    view = build_view(second, first)
    assert ("allowed", "3.0", "7") in view.decisions  # 6 more admitted in 2 s
    assert ("denied", "0.0", "3") in view.decisions
    (budget,) = [row for row in view.budgets if row[0] == "global"]
    assert budget[1:3] == ("1/h (10)", "3.0")
    assert budget[3].endswith(" 30%")
    # From the snapshot's own tenant list, with the scope that denied it most.
    assert ("slow", "tenant:slow", "0.0", "3") in view.throttled
    assert ("queue emails", "3.0", "7") in view.usage
    assert ("priority high", "0.0", "1") in view.usage
    assert start.waits == "more 3"  # three waits of about an hour
    assert view.waits == "no denials since the last poll"


def test_dry_run_and_recording_are_in_the_title(limiter: Limiter) -> None:
    assert "DRY RUN" not in build_view(snapshot(limiter), None).title
    limiter.set_shadow(True)
    limiter.set_recording(900)
    title = build_view(snapshot(limiter), None).title
    assert "DRY RUN" in title
    assert "recording the last 900 s for previews" in title
    assert snapshot(limiter)["recording_s"] == 900


def rows(app: TopApp, table_id: str) -> list[list[object]]:
    table = app.query_one(table_id, DataTable)
    return [list(table.get_row_at(i)) for i in range(table.row_count)]


def test_the_dashboard_shows_a_live_namespace(limiter: Limiter) -> None:
    limiter.set_limit("global", Limit(1, per=HOUR, burst=5))
    for _ in range(7):
        limiter.acquire("acme", queue="emails")

    async def scenario() -> None:
        # (The server may hold many other keys: a large slice finds acme in a poll or two.)
        app = TopApp(limiter, interval=0.2, sample_per_poll=100_000)
        async with app.run_test(size=(160, 50)) as pilot:
            deadline = time.monotonic() + 30
            while app.polls < 2 or not any(
                str(row[0]) == "acme" for row in rows(app, "#throttled")
            ):
                assert time.monotonic() < deadline, "the dashboard never showed acme"
                await pilot.pause(0.05)
            assert limiter.namespace in str(app.sub_title)
            budgets = rows(app, "#budgets")
            assert str(budgets[0][0]) == "global"
            assert str(budgets[0][3]).endswith("  0%")
            throttled = [[str(c) for c in row] for row in rows(app, "#throttled")]
            assert throttled[0][:2] == ["everyone", "global"]
            # acme has no limit of its own (no row in the snapshot): the sampler found it.
            assert [throttled[1][0], throttled[1][1], throttled[1][3]] == ["acme", "global", "2"]
            assert app.query_one("#changes-box").display  # room for it at 160 columns
            summary = str(app.query_one("#summary", Static).render())
            assert "allowed" in summary
            assert "(5)" in summary
            assert "denied" in summary
            assert "(2)" in summary
            changes = rows(app, "#changes")
            assert [str(c) for c in changes[0][1:]] == [
                "api",
                "set global: - -> 1/h burst 5",
            ]
            limiter.set_limit("global", Limit(2, per=HOUR, burst=5), actor="ops")
            while len(rows(app, "#changes")) < 2:  # the next poll reads the audit log again
                assert time.monotonic() < deadline, "the change never showed"
                await pilot.pause(0.05)
            assert [str(c) for c in rows(app, "#changes")[0][1:]] == [
                "ops",
                "set global: 1/h burst 5 -> 2/h burst 5",
            ]
            await pilot.press("p")
            assert app.paused
            status = app.query_one("#status", Static)
            assert "paused" in str(status.render())
            await pilot.press("q")

    asyncio.run(scenario())


def test_the_dashboard_survives_an_unreachable_redis(namespace: str) -> None:
    dead = Limiter(redis.Redis(port=free_port(), retry=NO_RETRY), namespace=namespace)

    async def scenario() -> None:
        app = TopApp(dead, interval=0.2)
        async with app.run_test() as pilot:
            status = app.query_one("#status", Static)
            deadline = time.monotonic() + 20
            while "cannot read Redis" not in str(status.render()):
                assert time.monotonic() < deadline, "no error shown"
                await pilot.pause(0.05)
            assert app.polls == 0
            await pilot.press("q")

    asyncio.run(scenario())


def test_the_sampler_finds_tenants_throttled_by_a_default_limit(limiter: Limiter) -> None:
    """A slice of tenant hashes per poll (SCAN cursor kept), rates from two reads."""
    limiter.set_limit("tenant:*", Limit(1, per=HOUR, burst=1))
    for tenant, tries in (("a", 2), ("b", 4), ("c", 1)):
        for _ in range(tries):
            limiter.acquire(tenant)
    sampler = TenantSampler(limiter, per_poll=50)
    now = 1_000_000.0
    # One full pass of the SCAN cursor, a slice per poll (the server may hold other tests'
    # keys too): SCAN returns every key that exists for the whole pass.
    sampler.poll(now)
    for _ in range(100_000):
        if sampler.cursor == 0:
            break
        sampler.poll(now)
    else:
        pytest.fail("the SCAN cursor never came back to 0")
    assert set(sampler.tenants) == {"a", "b", "c"}
    assert [(t, s.denied, s.top_scope) for t, s in sampler.top()] == [
        ("b", 3, "tenant:b"),
        ("a", 1, "tenant:a"),
    ]
    for _ in range(5):
        limiter.acquire("a")
    sampler.tenants["a"].at_ms = now - 1000  # last read one second ago
    for _ in range(100_000):  # until "a" is read again
        sampler.poll(now)
        if sampler.tenants["a"].at_ms == now:
            break
    else:
        pytest.fail("the sampler never came back to tenant a")
    top = sampler.top()
    assert top[0][0] == "a"
    assert top[0][1].denied_rate == 5.0
    assert top[0][1].allowed_rate == 0.0


# -- #12: the budgets panel tells the whole truth, at 80x24 --------------------------------


def busy(limiter: Limiter) -> None:
    """A binding tenant-queue limit, tenants throttled under the defaults, an exempt tenant
    with a limit of its own, a concurrency cap in use and parked work."""
    limiter.set_limit("global", Limit(500, per=HOUR))
    limiter.set_limit("tenant:*", Limit(2, per=HOUR, burst=4))
    limiter.set_limit("tenant:*:queue:emails", Limit(1, per=HOUR, burst=2))
    limiter.set_limit("tenant:acme", Limit(20, per=HOUR, burst=40))
    limiter.set_limit("tenant:acme:queue:reports", Limit(1, per=HOUR, burst=2))
    limiter.set_limit("tenant:vip", Limit(1, per=HOUR))
    limiter.set_exempt("vip", "tenant")
    limiter.set_exempt("bigco", "all")
    limiter.set_concurrency("tenant:*", 2)
    for _ in range(4):
        limiter.acquire("acme", queue="reports", hold=600)
    for _ in range(6):
        limiter.acquire("noisy", hold=600)
        limiter.acquire("mailer", queue="emails")
    limiter.acquire("vip")
    scheduler = FairScheduler(limiter)
    for i in range(3):
        scheduler.submit("noisy", f"parked-{i}", queue="emails")


def test_the_budgets_list_every_scope_the_throttled_default_tenants_and_exemptions(
    limiter: Limiter,
) -> None:
    """They missed configured tenant-queue limits (one binding at 0% tokens) and the
    tenants throttled under a default, and showed an exempt tenant with a limit."""
    busy(limiter)
    listed = build_view(snapshot(limiter), None).budgets
    budgets = {row[0]: row for row in listed}
    assert budgets["tenant:acme:queue:reports"][1:4] == ("1/h (2)", "0.0", fill_bar(0))
    assert budgets["tenant:*"][1] == "2/h (4)"
    assert budgets["  tenant:noisy"][3].endswith(" 50%")  # under the default, in use
    assert budgets["tenant:*:queue:emails"][1] == "1/h (2)"
    assert budgets["  tenant:mailer:queue:emails"][3].endswith("  0%")
    assert budgets["tenant:vip"][1:4] == ("exempt", "–", "tenant scopes")  # no limit shown
    assert budgets["tenant:bigco"][1:4] == ("exempt", "–", "all scopes")
    assert budgets["tenant:* running"][1] == "cap 2"
    cap = [row[0] for row in listed].index("tenant:* running")
    # Its tenants under it (each was admitted twice and holds both its slots).
    assert [row[0::2] for row in listed[cap + 1 : cap + 4]] == [
        ("  tenant:acme", "2/2", ""),
        ("  tenant:mailer", "2/2", ""),
        ("  tenant:noisy", "2/2", ""),
    ]
    rows = list(budgets)
    assert rows.index("tenant:acme:queue:reports") < rows.index("global")  # binding first


def fits(table: DataTable[object]) -> bool:
    """Every column of the table is on screen (nothing scrolls sideways)."""
    return table.virtual_size.width <= table.scrollable_content_region.width


def test_top_fits_80x24(limiter: Limiter) -> None:
    """At 80x24 the budgets' tokens and fill were cut off, with a blank area below them."""
    busy(limiter)

    async def scenario() -> None:
        app = TopApp(limiter, interval=0.2, sample_per_poll=100_000)
        async with app.run_test(size=(80, 24)) as pilot:
            deadline = time.monotonic() + 30
            while app.polls < 2:
                assert time.monotonic() < deadline, "no poll"
                await pilot.pause(0.05)
            screen = app.screen.region
            budgets = app.query_one("#budgets", DataTable)
            assert fits(budgets)
            assert [c.width for c in list(budgets.columns.values())[1:]] == [
                w for _, w in BUDGET_COLUMNS
            ]
            assert budgets.region.right <= screen.right
            assert budgets.region.height >= 8  # the biggest panel, not a blank area
            for table_id in ("#throttled", "#usage"):
                table = app.query_one(table_id, DataTable)
                assert fits(table), table_id
                assert table.region.bottom <= screen.bottom - 2  # waits and footer below
            assert not app.query_one("#changes-box").display  # no room at 80 columns
            for row in rows(app, "#budgets"):
                assert len(str(row[0])) <= next(iter(budgets.columns.values())).width
            first = [str(c) for c in rows(app, "#budgets")[0]]
            assert first[0] == "tenant:* running"  # the fullest first: the cap in use
            assert not app.ENABLE_COMMAND_PALETTE  # (no palette glyph in the footer)
            await pilot.press("q")

    asyncio.run(scenario())


def test_the_screenshot_command_writes_an_svg(tmp_path: Path) -> None:
    """`python -m queue_ratelimit.tui --screenshot PATH` (make screenshot): the embedded
    engine, no server needed."""
    path = asyncio.run(save_screenshot(tmp_path / "top.svg"))
    svg = path.read_text()
    assert svg.startswith("<svg")
    for text in ("Budgets", "tenant:acme:queue:reports", "running", "Throttled"):
        assert text in svg, text
