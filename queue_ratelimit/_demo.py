"""``queue-ratelimit demo``: a synthetic multi-tenant workload through the limiter, shown live."""

from __future__ import annotations

import itertools
import os
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

from ._decision import Decision
from ._embedded import describe_engine, embedded_client
from ._limit import Limit
from ._limiter import Limiter

NAMESPACE = "demo"
NOISY, VIP, QUIET = "acme", "initech", ("umbrella", "hooli")


@dataclass(frozen=True, slots=True)
class Rule:
    """A limit the demo sets, and why."""

    scope: str
    limit: str
    note: str
    shadow: bool = False


@dataclass(frozen=True, slots=True)
class Load:
    """One stream of jobs: ``rate`` jobs/s, ``surge`` jobs/s from half-time on."""

    tenant: str
    queue: str
    rate: float
    note: str
    cost: int = 1
    priority: str = "normal"
    surge: float | None = None


RULES = (
    Rule("global", "300/s", "the cluster ceiling, shared by every tenant"),
    Rule("tenant:*", "40/s", "the default budget of every tenant"),
    Rule("tenant:globex", "120/s", "a premium tenant's own, higher budget"),
    Rule("tenant:globex:queue:reports", "15/s", "one queue of one tenant"),
    Rule("queue:emails", "30/s", "SHADOW: decides and counts, never denies", shadow=True),
)
LOADS = (
    Load(NOISY, "default", 200, "noisy: floods at 5x its default budget"),
    Load("globex", "default", 80, "premium", priority="high"),
    Load("globex", "reports", 40, "premium; this queue has its own cap", priority="low"),
    Load(VIP, "default", 80, "VIP (exempt); surges to 200/s at half-time", surge=200),
    Load(QUIET[0], "emails", 20, "quiet"),
    Load(QUIET[1], "emails", 10, "quiet; each job costs 2 tokens", cost=2),
)

SURGES = tuple(load for load in LOADS if load.surge)


@dataclass(frozen=True, slots=True)
class Bucket:
    """A bucket the workload touches: its scope, the rule it gets its limit from."""

    scope: str
    rule: Rule

    @property
    def limit(self) -> Limit:
        return Limit.parse(self.rule.limit)

    @property
    def label(self) -> str:
        return self.scope + (" (shadow)" if self.rule.shadow else "")

    @property
    def limit_text(self) -> str:
        return self.rule.limit + ("*" if self.rule.scope != self.scope else "")


def _buckets() -> list[Bucket]:
    """Every bucket the loads pass through, in display order."""
    rules = {r.scope: r for r in RULES}
    found: dict[str, Bucket] = {"global": Bucket("global", rules["global"])}
    for load in LOADS:
        if load.tenant != VIP:
            scope = f"tenant:{load.tenant}"
            found[scope] = Bucket(scope, rules.get(scope, rules["tenant:*"]))
    for load in LOADS:
        for scope in (f"tenant:{load.tenant}:queue:{load.queue}", f"queue:{load.queue}"):
            if scope in rules:
                found[scope] = Bucket(scope, rules[scope])
    return list(found.values())


class Tally:
    """Counters shared by the load threads; keys are tuples such as ``("admitted", scope)``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, ...]] = Counter()

    def record(self, load: Load, decision: Decision) -> None:
        with self._lock:
            c = self._counts
            c["jobs", load.tenant] += 1
            if decision.allowed:
                c["ok", load.tenant] += 1
                for scope in decision.remaining:
                    c["admitted", scope] += load.cost
                for scope in decision.would_deny:
                    c["would", scope] += load.cost
            else:
                by = decision.denied_by or "?"
                c["denied", by] += load.cost
                c["by", load.tenant, by] += 1

    def snapshot(self) -> Counter[tuple[str, ...]]:
        with self._lock:
            return Counter(self._counts)


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], align: str) -> list[str]:
    """Rows as aligned text; ``align`` has an ``l`` or ``r`` per column."""
    cells = [list(headers), *[list(r) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(
            cell.ljust(w) if a == "l" else cell.rjust(w)
            for cell, w, a in zip(row, widths, align, strict=True)
        ).rstrip()
        for row in cells
    ]


def _n(value: float) -> str:
    return f"{value:,.0f}"


def _pct(value: float) -> str:
    return f"{value:.0%}"


History = list[tuple[float, Counter[tuple[str, ...]]]]


class Demo:
    """Runs the loads in threads for ``duration`` seconds and reports on ``out``.

    Args:
        limiter: the limiter to drive (its namespace is cleared first).
        duration: seconds of load.
        out: where the report goes.
        live: redraw the report in place (a terminal) instead of appending to it (a log).
        embedded: the limiter runs on the embedded engine (its state dies with the process).
    """

    def __init__(
        self, limiter: Limiter, duration: float, out: TextIO, *, live: bool, embedded: bool
    ) -> None:
        self.limiter = limiter
        self.duration = duration
        self.out = out
        self.live = live
        self.embedded = embedded
        self.buckets = _buckets()
        self.tally = Tally()
        self.stop = threading.Event()
        self.errors: list[Exception] = []
        self.events: list[str] = []
        self.start = 0.0
        self._drawn = 0  # lines of the live block on screen, to redraw it in place

    def say(self, *lines: str) -> None:
        self.out.write("".join(line + "\n" for line in lines))
        self.out.flush()

    # -- set-up ------------------------------------------------------------------------
    def prepare(self) -> None:
        """Clear the demo namespace, set the limits and describe what is about to run."""
        client = self.limiter.client
        stale = list(client.scan_iter(match=self.limiter.keys.pattern, count=1000))
        if stale:
            client.delete(*stale)
        for rule in RULES:
            self.limiter.set_limit(rule.scope, rule.limit, shadow=rule.shadow, actor="demo")
        self.limiter.set_exempt(VIP, "tenant", actor="demo")
        width = max(len(r.scope) for r in RULES)
        self.say(
            f"queue-ratelimit demo: {self.duration:g} s of synthetic multi-tenant load",
            f"engine:    {describe_engine(self.limiter)}",
            f"namespace: {NAMESPACE!r} (cleared at start)",
            "",
            "limits:",
            *(f"  {r.scope:<{width}}  {r.limit:>6}  {r.note}" for r in RULES),
            f"  {'exempt:' + VIP:<{width}}  {'tenant':>6}  VIP: skips its tenant caps, "
            "still under global",
            "load (a thread per line, paced):",
            *(f"  {ld.tenant:<9} {ld.queue:<8} {ld.rate:>4g} jobs/s  {ld.note}" for ld in LOADS),
            "",
        )

    # -- load ----------------------------------------------------------------------------
    def drive(self, load: Load) -> None:
        """Send ``load``'s jobs through ``acquire`` at its pace until the end or a stop."""
        half, end = self.start + self.duration / 2, self.start + self.duration
        due = self.start
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= end:
                    return
                if now < due:
                    self.stop.wait(min(due, end) - now)
                    continue
                decision = self.limiter.acquire(
                    load.tenant, queue=load.queue, priority=load.priority, cost=load.cost
                )
                self.tally.record(load, decision)
                rate = load.surge if load.surge and now >= half else load.rate
                # A machine too slow for the pace skips jobs instead of bursting to catch up.
                due = max(due + 1 / rate, now - 0.05)
        except Exception as exc:  # re-raised by run(); the other threads stop too
            self.errors.append(exc)
            self.stop.set()

    def run(self) -> int:
        """Run the workload and print the summary; returns 0 when every cap held, else 1."""
        self.prepare()
        threads = [
            threading.Thread(target=self.drive, args=(ld,), name=f"load-{ld.tenant}", daemon=True)
            for ld in LOADS
        ]
        self.start = time.monotonic()
        for t in threads:
            t.start()
        history: History = [(0.0, Counter())]
        surged = False
        try:
            while not self.stop.is_set():
                now = time.monotonic() - self.start
                if now >= self.duration:
                    break
                # Wake on whole seconds, and at half-time when the surge starts.
                marks = [self.duration, int(now) + 1]
                if now < self.duration / 2:
                    marks.append(self.duration / 2)
                self.stop.wait(min(marks) - now)
                history.append((time.monotonic() - self.start, self.tally.snapshot()))
                if not surged and history[-1][0] >= self.duration / 2 - 1e-3:
                    surged = True
                    self.event(
                        f"{history[-1][0]:.1f} s: "
                        + ", ".join(f"{ld.tenant} surges to {ld.surge:g} jobs/s" for ld in SURGES)
                    )
                if history[-1][0] - history[-2][0] >= 0.5:
                    self.report(history)
                else:  # the half-time mark fell just before a whole second: merge them
                    history.pop()
        except KeyboardInterrupt:
            self.event("interrupted: stopping the load early")
        finally:
            self.stop.set()
            for t in threads:
                t.join()
        elapsed = time.monotonic() - self.start
        if self.errors:
            raise self.errors[0]
        history.append((elapsed, self.tally.snapshot()))
        return self.summary(elapsed, history)

    def event(self, text: str) -> None:
        self.events.append(text)
        if not self.live:
            self.say(f"-- {text}")

    # -- live report ---------------------------------------------------------------------
    def report(self, history: History) -> None:
        """Rates over the last interval, per scope and per tenant."""
        (t0, was), (t1, now) = history[-2], history[-1]
        span = max(t1 - t0, 1e-6)

        def rate(*key: str) -> float:
            return (now[key] - was[key]) / span

        rows = []
        for b in self.buckets:
            admitted = rate("admitted", b.scope)
            rows.append(
                [
                    b.label,
                    b.limit_text,
                    _n(admitted),
                    _n(rate("denied", b.scope)),
                    _n(rate("would", b.scope)) if b.rule.shadow else "-",
                    _pct(admitted / b.limit.rate_per_second),
                ]
            )
        tenants = []
        for tenant in _tenants():
            jobs, ok = rate("jobs", tenant), rate("ok", tenant)
            by = Counter({k[2]: v - was[k] for k, v in now.items() if k[:2] == ("by", tenant)})
            top = ", ".join(scope for scope, n in by.most_common(2) if n > 0) or "-"
            tenants.append([tenant, _n(jobs), _n(ok), _n(jobs - ok), top])
        block = [
            f"t = {t1:4.1f} s of {self.duration:g} s: rates over the last {span:.1f} s",
            *_table(
                ["scope (tokens/s)", "limit", "admitted", "denied", "would-deny", "use"],
                rows,
                "lrrrrr",
            ),
            "",
            *_table(
                ["tenant (jobs/s)", "sent", "admitted", "denied", "denied by"], tenants, "lrrrl"
            ),
        ]
        if self.live:
            # Redraw in place: up over the previous block, clear to the end of the screen.
            up = f"\x1b[{self._drawn}F\x1b[J" if self._drawn else ""
            block = [*(f"-- {e}" for e in self.events), *block, ""]
            self.out.write(up + "".join(line + "\n" for line in block))
            self.out.flush()
            self._drawn = len(block)
            return
        # A log (CI, a pipe): a line a second, the full tables every five seconds.
        glob = rows[0]
        self.say(
            f"t = {t1:4.1f} s  global {glob[2]} of {glob[1]}  admitted/sent jobs/s: "
            + "  ".join(f"{t[0]} {t[2]}/{t[1]}" for t in tenants)
        )
        if round(t1) % 5 == 0 and abs(t1 - round(t1)) < 0.25 and t1 < self.duration - 0.5:
            self.say("", *block, "")

    # -- summary -------------------------------------------------------------------------
    def summary(self, elapsed: float, history: History) -> int:
        """Check every cap over the whole run and print the verdict; returns the exit status."""
        final = history[-1][1]
        rows, failures = [], []
        for b in self.buckets:
            lim = b.limit
            cap = lim.rate_per_second * elapsed + lim.capacity
            admitted, would = final["admitted", b.scope], final["would", b.scope]
            # A shadow bucket spends only what it could have granted, so what it did not flag
            # is what enforcing it would have admitted: that is what must stay under the cap.
            held = (admitted - would if b.rule.shadow else admitted) <= cap * (1 + 1e-9)
            if not held:
                failures.append(b.scope)
            # Intervals in which the scope denied: how much of R*t it delivered while binding.
            busy = [
                (t1 - t0, now["admitted", b.scope] - was["admitted", b.scope])
                for (t0, was), (t1, now) in itertools.pairwise(history)
                if now["denied", b.scope] > was["denied", b.scope]
            ]
            busy_s = sum(s for s, _ in busy)
            use = sum(a for _, a in busy) / (lim.rate_per_second * busy_s) if busy_s else None
            rows.append(
                [
                    b.label,
                    b.limit_text,
                    _n(admitted),
                    _n(would) if b.rule.shadow else "-",
                    _n(cap),
                    "yes" if held else "NO",
                    f"{busy_s:.0f} s",
                    "-" if use is None else _pct(use),
                ]
            )
        tenant_rows = []
        for tenant in _tenants():
            jobs, ok = final["jobs", tenant], final["ok", tenant]
            by = sorted(
                ((k[2], v) for k, v in final.items() if k[:2] == ("by", tenant)),
                key=lambda kv: -kv[1],
            )
            tenant_rows.append(
                [
                    tenant,
                    _n(jobs),
                    _pct(ok / max(1, jobs)),
                    _n(jobs - ok),
                    ", ".join(f"{scope} {n:,}" for scope, n in by) or "-",
                ]
            )
        default = Limit.parse(next(r.limit for r in RULES if r.scope == "tenant:*"))
        quiet_by: Counter[str] = Counter()
        for key, count in final.items():
            if key[0] == "by" and key[1] in QUIET:
                quiet_by["global" if key[2] == "global" else "own"] += count
        notes = [
            f"{VIP} is exempt: {_n(final['ok', VIP])} jobs admitted where the default budget "
            f"allows {_n(default.rate_per_second * elapsed + default.capacity)}, every one "
            "counted toward global.",
            f"{NOISY} flooded: its {_n(final['jobs', NOISY] - final['ok', NOISY])} denied jobs "
            "took no tokens from any bucket (a decision passes every bucket or takes from none). "
            f"The quiet tenants ({', '.join(QUIET)}) lost {_n(quiet_by['own'])} jobs to their "
            f"own caps and {_n(quiet_by['global'])} to global, none to {NOISY}'s bucket.",
            "plain acquire calls share global first come, first served: weighting it between "
            "tenants is the fair scheduler's job (FairScheduler), which this demo does not use.",
        ]
        if not self.embedded:
            notes.append(
                f"the state stays in namespace {NAMESPACE!r}: "
                f"queue-ratelimit --namespace {NAMESPACE} limits list"
            )
        self.say(
            "",
            f"summary over T = {elapsed:.1f} s: a cap held when admitted <= R*T + B "
            "(shadow: admitted - would-deny)",
            *_table(
                ["scope", "limit", "admitted", "would-deny", "R*T+B", "held", "binding", "use"],
                rows,
                "lrrrrrrr",
            ),
            "  * from tenant:*, the default: each tenant still has its own bucket",
            "  binding: seconds in which the scope denied; use: tokens admitted in those seconds",
            "  / (R * those seconds), over 100% when the burst was spent then too",
            "",
            *_table(["tenant", "jobs", "admitted", "denied", "denied by"], tenant_rows, "lrrrl"),
            "",
            *(textwrap.fill(n, 92, initial_indent="- ", subsequent_indent="  ") for n in notes),
        )
        if failures:
            self.say(f"CAP EXCEEDED: {', '.join(failures)}")
            return 1
        self.say("Every cap held.")
        return 0


def _tenants() -> list[str]:
    return list(dict.fromkeys(load.tenant for load in LOADS))


def run(duration: float = 20.0, url: str | None = None, out: TextIO | None = None) -> int:
    """Run the demo on Redis at ``url``, or on the embedded engine; returns the exit status.

    Args:
        duration: seconds of load.
        url: a Redis URL; None runs the package's Lua scripts in process (fakeredis + lupa).
        out: where to write (default: standard output); redrawn in place only on a terminal.

    Raises:
        ImportError: no ``url`` and the ``embedded`` extra is missing.
        RateLimitError, redis.RedisError: from the limiter (Redis unreachable, say).
    """
    stream = sys.stdout if out is None else out
    if url is None:
        limiter = Limiter(embedded_client(), namespace=NAMESPACE)
    else:
        limiter = Limiter.from_url(url, namespace=NAMESPACE)
    with limiter:
        # Cursor movement only where a terminal will honour it; logs get plain appended lines.
        live = stream.isatty() and os.environ.get("TERM", "") != "dumb"
        demo = Demo(limiter, duration, stream, live=live, embedded=url is None)
        return demo.run()
