"""Gate credit: extra admissions taken in advance only while nothing is contended."""

from __future__ import annotations

import math

import pytest
import redis

from queue_ratelimit import ConfigError, FairScheduler, Limit, Limiter, _scheduler

HOURLY = 3600.0  # no token returns while a test runs


@pytest.fixture
def scheduler(limiter: Limiter) -> FairScheduler:
    return FairScheduler(limiter)


def tokens(limiter: Limiter, scope: str, tenant: str = "acme", queue: str = "default") -> float:
    return limiter.peek(tenant, queue=queue).remaining[scope]


def test_credit_is_granted_only_down_to_half_the_burst(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    limiter.set_limit("tenant:*", Limit(20, per=HOURLY, burst=20))
    first = scheduler.gate("acme", "j1", credit=8)
    assert (first.action, first.credit) == ("run", 8)
    assert tokens(limiter, "tenant:acme") == pytest.approx(11, abs=0.01)  # 1 + 8 taken
    # 11 left: one more job leaves 10 = half the burst, so no credit beyond it.
    second = scheduler.gate("acme", "j2", credit=8)
    assert (second.action, second.credit) == ("run", 0)
    assert tokens(limiter, "tenant:acme") == pytest.approx(10, abs=0.01)


def test_the_tightest_bucket_bounds_the_credit_and_cost_scales_it(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    limiter.set_limit("tenant:*", Limit(100, per=HOURLY, burst=100))
    limiter.set_limit("global", Limit(20, per=HOURLY, burst=20))
    verdict = scheduler.gate("acme", "j1", cost=2, credit=50)
    # global: (20 - 2 - 10) / 2 = 4 more jobs of cost 2.
    assert verdict.credit == 4
    assert tokens(limiter, "global") == pytest.approx(10, abs=0.01)
    assert tokens(limiter, "tenant:acme") == pytest.approx(90, abs=0.01)


def test_shadow_buckets_do_not_limit_credit(limiter: Limiter, scheduler: FairScheduler) -> None:
    limiter.set_limit("tenant:*", Limit(100, per=HOURLY, burst=100))
    limiter.set_limit("global", Limit(4, per=HOURLY, burst=4), shadow=True)
    assert scheduler.gate("acme", "j1", credit=10).credit == 10


def test_no_credit_unless_asked_and_unused_credit_can_be_refunded(
    limiter: Limiter, scheduler: FairScheduler
) -> None:
    limiter.set_limit("tenant:*", Limit(20, per=HOURLY, burst=20))
    assert scheduler.gate("acme", "j1").credit == 0
    assert tokens(limiter, "tenant:acme") == pytest.approx(19, abs=0.01)
    granted = scheduler.gate("acme", "j2", credit=5).credit
    assert granted == 5
    limiter.refund("acme", queue="default", cost=granted)
    assert tokens(limiter, "tenant:acme") == pytest.approx(18, abs=0.01)


def test_free_credit_when_no_bucket_applies(limiter: Limiter, scheduler: FairScheduler) -> None:
    """Nothing to take, nothing to give back: the whole credit, marked free."""
    verdict = scheduler.gate("acme", "j1", credit=8)
    assert (verdict.action, verdict.credit, verdict.credit_free) == ("run", 8, True)
    limiter.set_limit("tenant:*", Limit(20, per=HOURLY, burst=20))
    bounded = scheduler.gate("acme", "j2", credit=8)
    assert (bounded.credit, bounded.credit_free) == (8, False)


@pytest.mark.parametrize("credit", [-1, 1.5, True, "3", 1_000_001, 10**30])
def test_bad_credit_is_refused(scheduler: FairScheduler, credit: object) -> None:
    with pytest.raises(ConfigError, match="credit"):
        scheduler.gate("acme", "j1", credit=credit)  # type: ignore[arg-type]


def _stored(limiter: Limiter) -> dict[str, object]:
    client = limiter.client
    return {
        key.decode(): client.hgetall(key) if client.type(key) == b"hash" else client.type(key)
        for key in client.scan_iter(match=f"{limiter.keys.base}:*")
    }


@pytest.mark.parametrize(
    ("cost", "credit"), [(-1.0, 0), (math.nan, 0), (1e13, 0), (1e-10, 0), (1.0, 10**30)]
)
def test_the_gate_script_checks_its_numbers_before_it_writes(
    limiter: Limiter,
    scheduler: FairScheduler,
    monkeypatch: pytest.MonkeyPatch,
    cost: float,
    credit: int,
) -> None:
    """What the Python side refuses, gate.lua refuses too (another client could send it),
    before anything is written. Before, a negative cost was admitted and added tokens."""
    limiter.set_limit("tenant:*", Limit(20, per=HOURLY, burst=20))
    monkeypatch.setattr(_scheduler, "check_cost", lambda c: c)
    monkeypatch.setattr(_scheduler, "MAX_CREDIT", 10**40)
    before = _stored(limiter)
    with pytest.raises((ConfigError, redis.ResponseError), match=r"(cost|credit) must be a number"):
        scheduler.gate("acme", "j1", cost=cost, credit=credit)
    assert _stored(limiter) == before


class _Entry:
    def cancel(self) -> None:
        pass


class _Timer:
    def call_after(self, *_: object) -> _Entry:
        return _Entry()


def test_the_ledger_gives_back_only_credit_that_took_tokens(limiter: Limiter) -> None:
    from queue_ratelimit.celery._credit import CreditLedger

    limiter.set_limit("tenant:*", Limit(20, per=HOURLY, burst=20))
    limiter.acquire("acme", cost=10)
    limiter.acquire("bigco", cost=10)
    ledger = CreditLedger(lambda: limiter, _Timer, ttl=60)
    ledger.grant(("acme", "default", "normal", 1.0), 4, free=True)
    ledger.grant(("bigco", "default", "normal", 1.0), 4)
    assert ledger.spend(("bigco", "default", "normal", 1.0))
    ledger.close()
    assert tokens(limiter, "tenant:acme") == pytest.approx(10, abs=0.01)  # nothing given
    assert tokens(limiter, "tenant:bigco", tenant="bigco") == pytest.approx(13, abs=0.01)
