"""The Grafana dashboard (dashboards/queue-ratelimit.json) asks only for what the collector
exports: every PromQL expression in it is taken apart, and each metric it names, and each
label it groups by, must be in a real scrape of a namespace with traffic of every kind."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from queue_ratelimit import FairScheduler, Limit, Limiter
from queue_ratelimit.metrics import FAMILIES, PREFIX, RateLimitCollector

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "queue-ratelimit.json"
HOUR = 3600.0
# Words of PromQL that are neither metrics nor functions.
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
IDENTIFIER = re.compile(r"(?<![\w$.])([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()")


def expressions(node: Any) -> Iterator[str]:
    """Every PromQL expression of a dashboard: the panels' targets and the variables'
    queries."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for value in node:
            yield from expressions(value)


def parse(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the grouping labels of a PromQL expression (or a Grafana
    ``label_values(metric, label)``)."""
    assert expr.count("(") == expr.count(")"), expr
    assert expr.count("{") == expr.count("}"), expr
    text = STRING.sub('""', expr)
    if text.startswith("label_values("):
        metric, label = (part.strip() for part in text[len("label_values(") : -1].split(","))
        return {metric}, {label}
    labels = set()
    for match in GROUPING.finditer(text):
        labels |= {label.strip() for label in match.group(2).split(",") if label.strip()}
    text = GROUPING.sub(" ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    names = {
        word
        for word in IDENTIFIER.findall(text)
        if word not in KEYWORDS and not re.fullmatch(r"[0-9.eE+-]+|Inf|NaN", word)
    }
    return names, labels


@pytest.fixture
def exported(limiter: Limiter) -> dict[str, set[str]]:
    """Sample name -> its label names, from a scrape of a namespace with traffic of every
    kind the collector reports."""
    limiter.set_limit("global", Limit(1000, per=HOUR))
    limiter.set_limit("tenant:*", Limit(1, per=HOUR))
    limiter.set_limit("queue:shadowed", Limit(1, per=HOUR), shadow=True)
    limiter.set_limit("queue:banked", Limit(1, per=HOUR, credit=2))  # burst credits
    limiter.set_concurrency("tenant:*", 5)
    limiter.pause("queue:paused", 600)
    for tenant in ("acme", "beta"):
        for _ in range(3):
            limiter.acquire(tenant, queue="shadowed", priority="high")
    scheduler = FairScheduler(limiter, lease=0.001)
    for i in range(3):
        scheduler.submit("gamma", f"job-{i}", queue="emails")
    scheduler.dispatch(["emails"], max_items=1)  # takes gamma's token; the rest wait
    registry = CollectorRegistry()
    registry.register(RateLimitCollector(limiter))
    found: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            found.setdefault(sample.name, set()).update(sample.labels)
    return found


def test_every_family_has_samples_in_the_scrape(exported: dict[str, set[str]]) -> None:
    """(So that the check below compares the dashboard with real samples.)"""
    for family in FAMILIES:
        assert family.exported in exported, family.exported
    assert f"{PREFIX}denied_wait_seconds_bucket" in exported


def test_every_promql_expression_names_only_exported_metrics(
    exported: dict[str, set[str]],
) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    found = list(expressions(dashboard))
    assert len(found) >= 15
    used = set()
    for expr in found:
        names, labels = parse(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - set(exported)
        assert not unknown, f"{expr!r} names {unknown}, which the collector does not export"
        have = set().union(*(exported[name] for name in names))
        assert labels <= have | {"le"}, f"{expr!r} groups by {labels - have}"
        used |= names
    # Each of the dashboard's subjects is there.
    for needed in (
        "decisions_total",
        "scope_decisions_total",
        "tenant_denials_total",
        "denied_wait_seconds_bucket",
        "bucket_fill_ratio",
        "queue_parked_jobs",
        "in_flight_jobs",
        "oldest_parked_age_seconds",
        "fail_mode_events_total",
        "concurrency_running",
    ):
        assert PREFIX + needed in used, needed


@pytest.mark.parametrize(
    ("expr", "names", "labels"),
    [
        (
            'sum by (scope) (rate(x_total{namespace=~"$ns", a="b"}[$__rate_interval]))',
            {"x_total"},
            {"scope"},
        ),
        (
            "histogram_quantile(0.9, sum by (le) (rate(h_bucket[5m])))",
            {"h_bucket"},
            {"le"},
        ),
        ("max(a / on (q) b) or vector(0)", {"a", "b"}, {"q"}),
        ("label_values(queue_ratelimit_up, namespace)", {"queue_ratelimit_up"}, {"namespace"}),
    ],
)
def test_the_promql_reader(expr: str, names: set[str], labels: set[str]) -> None:
    assert parse(expr) == (names, labels)


def test_the_promql_reader_finds_a_misspelt_metric(
    exported: dict[str, set[str]],
) -> None:
    names, _ = parse("sum(rate(queue_ratelimit_denied_wait_ms_bucket[5m]))")
    assert names - set(exported) == {"queue_ratelimit_denied_wait_ms_bucket"}
