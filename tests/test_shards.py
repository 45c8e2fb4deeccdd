"""A namespace spread over shards (``Limiter(client, shards=N)``) on one Redis server: key
names, routing, configuration on every shard, slices and their rebalancing, lua/shards.lua.
The cluster tests (tests/test_cluster.py) check the spread over primaries and the bound."""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from conftest import tenants_on
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from queue_ratelimit import ConfigError, CostExceedsBurst, FairScheduler, KeySpace, Limit, Limiter
from queue_ratelimit._leases import FLOOR, allocate, slices
from queue_ratelimit._scheduler import HeldBack
from queue_ratelimit._sharded_scheduler import ShardedScheduler
from queue_ratelimit._shards import ShardedLimiter
from queue_ratelimit.cli import main as cli_main
from queue_ratelimit.metrics import snapshot

HOUR = 3600.0


# -- shards=1 is the layout as it was ----------------------------------------------------------
def test_one_shard_keeps_every_key_name_and_the_plain_limiter(
    redis_client: redis.Redis, namespace: str
) -> None:
    lim = Limiter(redis_client, namespace=namespace, shards=1)
    assert type(lim) is Limiter
    assert type(Limiter(redis_client, namespace=namespace)) is Limiter
    k = lim.keys
    assert (k.base, k.config, k.shared, k.tenant("acme")) == (
        f"qrl:{{{namespace}}}",
        f"qrl:{{{namespace}}}:config",
        f"qrl:{{{namespace}}}:shared",
        f"qrl:{{{namespace}}}:t:acme",
    )
    assert KeySpace(namespace="ns", shards=1) == KeySpace(namespace="ns")
    # (A decision names the tenant hash and the shared hash; the config hash is read from
    # the shared hash's name: lua/acquire.lua.)
    call = lim._core.decision_call("acquire", "acme", "q", None, 1)
    assert list(call.keys) == [
        f"qrl:{{{namespace}}}:t:acme".encode(),
        f"qrl:{{{namespace}}}:shared".encode(),
    ]
    assert list(call.args) == [b"q"]
    # The same method: one packed FCALL per decision, nothing added on its path.
    assert type(lim)._decide is Limiter._decide
    lim.set_limit("tenant:*", "10/s")
    lim.acquire("acme")  # (loads the library)
    redis_client.config_resetstat()
    lim.acquire("acme")
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_fcall"]["calls"] == 1
    # (What the script calls is counted too; nothing a rebalancer would send is there.)
    assert not {"cmdstat_set", "cmdstat_hgetall", "cmdstat_hincrbyfloat"} & set(stats)


@pytest.mark.parametrize("bad", [0, -1, 1025, 2.0, "3", True])
def test_a_bad_shard_count_is_refused(redis_client: redis.Redis, bad: object) -> None:
    with pytest.raises(ConfigError, match="shards"):
        Limiter(redis_client, shards=bad)  # type: ignore[arg-type]


# -- the key layout of shards ------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 7, 64])
def test_shard_tags_spread_over_the_slot_space(n: int) -> None:
    home = KeySpace(namespace="ns", shards=n)
    for i in range(n):
        keys = home.for_shard(i)
        slot = key_slot(keys.config.encode())
        assert i * REDIS_CLUSTER_HASH_SLOTS // n <= slot < (i + 1) * REDIS_CLUSTER_HASH_SLOTS // n
        assert keys.base.startswith(f"qrl:{{ns:{i}")
        # Every kind reads back through the shard's own layout, never the home's.
        assert keys.parse(keys.tenant("acme")) == ("tenant", ("acme",))
        assert home.parse(keys.tenant("acme")) is None
    assert home.base == "qrl:{ns}"


def test_a_tenant_has_one_shard_every_process_agrees_on() -> None:
    home = KeySpace(namespace="ns", shards=5)
    assert home.shard_of("acme") == zlib.crc32(b"acme") % 5
    assert KeySpace(namespace="ns").shard_of("acme") == 0


def test_decisions_use_the_tenants_shard_only(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    sharded.set_limit("tenant:*", Limit(1, per=HOUR, burst=2))
    for shard in range(3):
        (tenant,) = tenants_on(sharded, shard)
        assert sharded.acquire(tenant).allowed
        assert redis_client.exists(sharded.shard_keys[shard].tenant(tenant))
        for other in set(range(3)) - {shard}:
            assert not redis_client.exists(sharded.shard_keys[other].tenant(tenant))
        assert not redis_client.exists(sharded.keys.tenant(tenant))
        assert sharded.acquire(tenant).allowed
        assert sharded.acquire(tenant).denied_by == f"tenant:{tenant}"


# -- configuration reaches every shard ----------------------------------------------------------
def test_configuration_is_written_to_every_shard_and_read_at_home(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    assert sharded.set_limit("global", Limit(30, per=1, burst=60)) == 1
    assert sharded.set_limit("tenant:*", "5/s") == 2
    assert sharded.set_concurrency("queue:q", 10) == 3
    assert sharded.set_exempt("vip", "all") == 4
    assert sharded.set_shadow(True) == 5
    for keys in sharded.shard_keys:
        config = {k.decode(): v.decode() for k, v in redis_client.hgetall(keys.config).items()}
        assert config["_version"] == "5"
        assert config["global"] == "10.0 1.0 20.0 -"  # a third of the rate and of the burst
        assert config["tenant:*"] == redis_client.hget(sharded.keys.config, "tenant:*").decode()
        assert config["exempt:vip"] == "all"
        assert config["mode:shadow"] == "1"
    caps = [int(redis_client.hget(k.config, "conc:queue:q")) for k in sharded.shard_keys]
    assert sum(caps) == 10
    assert min(caps) >= 3
    # Reads give the limit as set, from the home slot.
    assert sharded.get_limit("global").limit == Limit(30, per=1, burst=60)
    assert sharded.concurrency() == {"queue:q": 10}
    assert sharded.config_version() == 5
    assert [e.field for e in sharded.audit_log(count=2)] == ["mode:shadow", "exempt:vip"]
    assert sharded.delete_limit("global") == 6
    for keys in sharded.shard_keys:
        assert redis_client.hget(keys.config, "global") is None


def test_an_older_write_of_a_field_changes_nothing_on_a_shard(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    """Two processes setting one field may reach a shard in either order: the newer
    version stays (lua/shards.lua's per-field register)."""
    sharded.set_limit("tenant:*", "5/s")
    sharded.set_limit("tenant:*", "7/s")
    config = sharded.shard_keys[0].config
    assert sharded.write_shard(0, 1, "", "", ["tenant:*", "5.0 1.0 5.0 -", ""]) == 0
    assert redis_client.hget(config, "tenant:*") == b"7.0 1.0 7.0 -"
    assert sharded.write_shard(0, 2, "", "", ["tenant:*", "", ""]) == 1  # (same version: a retry)
    assert redis_client.hget(config, "tenant:*") is None


def test_a_rebalancer_with_an_older_epoch_is_fenced_off(sharded: ShardedLimiter) -> None:
    sharded.set_limit("global", "30/s")
    assert sharded.write_shard(0, 1, "5", "", ["global", "20.0 1.0 20.0 -", "1"]) == 1
    assert sharded.write_shard(0, 1, "4", "", ["global", "5.0 1.0 5.0 -", "1"]) == -1


def test_a_shard_behind_the_configuration_is_copied_whole(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    """A change that reached the home slot but not a shard (the process died between) is
    repaired by the next rebalance."""
    sharded.set_limit("tenant:*", "5/s")
    shard = sharded.shard_keys[1].config
    redis_client.hset(shard, mapping={"_version": 0, "stray": "x"})
    redis_client.hdel(shard, "tenant:*", "_v:tenant:*")
    report = sharded.rebalance()
    assert report.synced == 1
    assert redis_client.hget(shard, "tenant:*") == b"5.0 1.0 5.0 -"
    assert redis_client.hget(shard, "stray") is None
    assert redis_client.hget(shard, "_version") == b"1"


# -- settling a bucket when its slice moves ------------------------------------------------------
def test_a_growing_slice_refills_nothing_retroactively(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    """Emptied under a slow slice, a bucket whose slice grows refills from the change on,
    not from its last write: the settle in lua/shards.lua."""
    sharded.set_limit("global", Limit(3, per=HOUR, burst=3))  # 1 per hour per shard, burst 1
    (tenant,) = tenants_on(sharded, 0)
    assert sharded.acquire(tenant).allowed
    assert not sharded.acquire(tenant).allowed
    shared = sharded.shard_keys[0].shared
    # Its last write an hour ago: at the old rate it holds one token now (its burst).
    seconds, micros = redis_client.time()
    redis_client.hset(shared, "b:global:u", (seconds - 3600) * 1_000_000 + micros)
    sharded.write_shard(0, 1, "1", "", ["global", f"{3000 / HOUR!r} 1.0 100.0 -", "1"])
    tokens = float(redis_client.hget(shared, "b:global"))
    assert tokens == pytest.approx(1.0, abs=0.01)  # not 100: the hour refilled at the old rate
    assert sharded.acquire(tenant).allowed
    assert not sharded.acquire(tenant).allowed


# -- costs above a slice ------------------------------------------------------------------------
def test_a_cost_above_the_slice_but_within_the_burst_is_denied_not_refused(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    sharded.set_limit("global", Limit(30, per=1, burst=30))
    (tenant,) = tenants_on(sharded, 2)
    decision = sharded.acquire(tenant, cost=20)
    assert not decision.allowed
    assert decision.denied_by == "global"
    assert redis_client.hget(sharded.shard_keys[2].shared, "d:global") == b"1"
    with pytest.raises(CostExceedsBurst) as info:
        sharded.acquire(tenant, cost=31)
    assert info.value.burst == 30


# -- concurrency slots --------------------------------------------------------------------------
def test_slots_are_released_on_the_shard_that_holds_them(sharded: ShardedLimiter) -> None:
    sharded.set_concurrency("tenant:*", 1)
    sharded.set_concurrency("global", 30)
    for shard in range(3):
        (tenant,) = tenants_on(sharded, shard)
        held = sharded.acquire(tenant)
        assert held.slot is not None
        assert held.slot.token.startswith(f"{shard}.")
        assert sharded.running(f"tenant:{tenant}") == 1
        assert not sharded.acquire(tenant).allowed
        assert sharded.extend_slot(held, 30)
        assert sharded.release(str(held.slot))
        assert not sharded.release(held)
        assert sharded.acquire(tenant).allowed
    assert sharded.running("global") == 3


# -- the allocation -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("current", "admitted", "denied", "capacity", "expected"),
    [
        # All demand on shard 0: the others keep their floor.
        ([1 / 3] * 3, [100, 0, 0], [500, 0, 0], 100, [1 - 2 * FLOOR / 3, FLOOR / 3, FLOOR / 3]),
        # Uniform saturation: equal.
        ([1 / 3] * 3, [33, 33, 33], [90, 90, 90], 100, [1 / 3] * 3),
        # No traffic at all, or no denial: nothing moves.
        ([0.5, 0.3, 0.2], [0, 0, 0], [0, 0, 0], 100, [0.5, 0.3, 0.2]),
        ([0.5, 0.3, 0.2], [10, 30, 20], [0, 0, 0], 100, [0.5, 0.3, 0.2]),
        # Shard 1 satisfied with 20 of 100: keeps 20 + headroom, the hungry one the rest.
        (
            [0.5, 0.5],
            [
                50,
                20,
            ],
            [10, 0],
            100,
            [1 - 0.23, 0.23],
        ),
    ],
)
def test_allocate(
    current: list[float],
    admitted: list[float],
    denied: list[float],
    capacity: float,
    expected: list[float],
) -> None:
    assert allocate(current, admitted, denied, capacity) == pytest.approx(expected, abs=1e-6)


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.integers(1, 16).flatmap(
        lambda n: st.tuples(
            st.lists(st.floats(0.01, 1), min_size=n, max_size=n),
            st.lists(st.floats(0, 1e4), min_size=n, max_size=n),
            st.lists(st.floats(0, 1e4), min_size=n, max_size=n),
            st.one_of(st.none(), st.floats(0.1, 1e5)),
        )
    )
)
def test_shares_always_sum_to_one_and_keep_a_floor(
    drawn: tuple[list[float], list[float], list[float], float | None],
) -> None:
    current, admitted, denied, capacity = drawn
    total = sum(current)
    current = [c / total for c in current]
    shares = allocate(current, admitted, denied, capacity)
    assert sum(shares) == pytest.approx(1.0)
    if any(denied):
        assert min(shares) >= FLOOR / len(shares) / 2
    else:
        assert shares == current


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.lists(st.floats(0.001, 1), min_size=1, max_size=16),
    st.integers(1, 10_000),
    st.floats(0.001, 1e6),
    st.floats(0.001, 1e6),
)
def test_slices_sum_to_the_whole(raw: list[float], cap: int, rate: float, burst: float) -> None:
    shares = [s / sum(raw) for s in raw]
    n = len(shares)
    caps = [int(c) for c in slices("conc:global", str(cap), shares)]
    assert min(caps) >= 1
    assert sum(caps) == max(cap, n)
    limits = [v.split(" ") for v in slices("queue:q", f"{rate!r} 1.0 {burst!r} -", shares)]
    assert sum(float(p[0]) for p in limits) == pytest.approx(rate)
    assert sum(float(p[2]) for p in limits) <= burst + n * min(burst, 1.0) + 1e-6
    assert slices("tenant:*", "5.0 1.0 5.0 -", shares) == ["5.0 1.0 5.0 -"] * n


def test_a_rebalance_moves_the_slice_to_the_denied_shard(sharded: ShardedLimiter) -> None:
    sharded.set_limit("global", Limit(30, per=HOUR, burst=30))
    sharded.rebalance()  # (the first round only notes the counters)
    (tenant,) = tenants_on(sharded, 1)
    while sharded.acquire(tenant).allowed:
        pass
    sharded.acquire(tenant)
    report = sharded.rebalance()
    shares = report.shares["global"]
    assert shares[1] == pytest.approx(1 - 2 * FLOOR / 3, abs=1e-3)
    assert sharded.shares()["global"] == pytest.approx(list(shares), abs=1e-5)
    assert report.writes == 3
    # The denied shard now holds nearly the whole burst; what it had spent stays spent.
    assert not sharded.acquire(tenant).allowed
    assert sharded.rebalance().writes == 0  # nothing moved: nothing written


# -- the fair scheduler: lanes per shard ------------------------------------------------------
def test_the_scheduler_keeps_each_tenants_work_on_its_shard_and_runs_it_once(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    scheduler = FairScheduler(sharded, lease=30)
    assert isinstance(scheduler, ShardedScheduler)
    tenants = [t for s in range(3) for t in tenants_on(sharded, s, 2)]
    items = {f"{t}-{i}": t for t in tenants for i in range(5)}
    for item_id, tenant in items.items():
        assert scheduler.submit(tenant, item_id, queue="q", payload=item_id.encode())
    assert not scheduler.submit(tenants[0], f"{tenants[0]}-0", queue="q")  # a duplicate
    for tenant in tenants:
        shard = sharded.shard_keys[sharded.shard_of(tenant)]
        assert redis_client.llen(shard.backlog("q", tenant, "normal")) == 5
    assert scheduler.backlog("q") == 30
    assert scheduler.backlog("q", tenants[0]) == 5
    seen: list[str] = []
    shards_served = set()
    while True:
        batch = scheduler.dispatch(["q"], max_items=4)
        if not batch.items:
            assert batch.wait_ms is None
            break
        shards_served.add({sharded.shard_of(i.tenant) for i in batch.items}.pop())
        assert scheduler.in_flight() == len(batch.items)
        for item in batch.items:
            assert item.payload == item.id.encode()
            seen.append(item.id)
            assert scheduler.ack(item)
    assert sorted(seen) == sorted(items)
    assert shards_served == {0, 1, 2}
    assert scheduler.backlog("q") == 0


def test_purge_reaches_every_shard(sharded: ShardedLimiter) -> None:
    scheduler = FairScheduler(sharded, lease=30)
    tenants = [t for s in range(3) for t in tenants_on(sharded, s, 1)]
    for tenant in tenants:
        for i in range(3):
            assert scheduler.submit(tenant, f"{tenant}-{i}", queue="q")
    assert sorted(scheduler.purge("q", tenant=tenants[1])) == [
        f"{tenants[1]}-{i}" for i in range(3)
    ]
    assert scheduler.backlog("q") == 6
    assert len(scheduler.purge("q")) == 6
    assert scheduler.backlog("q") == 0
    assert not scheduler.dispatch(["q"], max_items=4).items


def test_the_scheduler_under_a_sharded_cap_and_slots(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    scheduler = FairScheduler(sharded, lease=30)
    sharded.set_limit("global", Limit(6, per=HOUR, burst=6))  # 2 per shard
    sharded.set_concurrency("tenant:*", 1)
    (tenant,) = tenants_on(sharded, 1)
    verdict = scheduler.gate(tenant, "g1", queue="q")
    assert verdict.action == "run"
    assert verdict.slot is not None
    assert verdict.slot.token.startswith("1.")
    assert scheduler.gate(tenant, "g2", queue="q").action == "park"
    assert sharded.release(verdict.slot)
    for i in range(3):
        scheduler.submit(tenant, f"s{i}", queue="q")
    batch = scheduler.dispatch(["q"], max_items=5)
    assert [i.id for i in batch.items] == ["s0"]  # its cap: one at a time
    assert batch.items[0].slot is not None
    assert batch.items[0].slot.token.startswith("1.")
    assert scheduler.ack(batch.items[0].id)  # a bare id: found on its shard
    batch = scheduler.dispatch(["q"], max_items=5)
    assert batch.items == ()  # the shard's slice of the global cap (2) is spent
    assert batch.wait_ms is not None
    assert batch.wait_ms > 0
    assert scheduler.nack("s1") is False


def test_a_sharded_dispatch_says_what_every_shard_it_asked_held_back(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    """``held_back`` of a sharded dispatch: that of every shard it asked, up to the one
    that hands out items; a dispatch turn's reader gives its shard's."""
    scheduler = FairScheduler(sharded)
    sharded.set_limit("tenant:*", [Limit(100), Limit(1, per=HOUR, burst=1)])
    spent = [tenants_on(sharded, shard)[0] for shard in (0, 1)]
    one, other = tenants_on(sharded, 2, 2)
    for tenant in spent:
        assert sharded.acquire(tenant).allowed  # its hour's budget is gone
    for tenant in (*spent, one, other):
        for i in range(2):
            scheduler.submit(tenant, f"{tenant}-{i}", queue="q")
    # A turn (as the Celery gate sends them) on shard 0: its tenant held back, nothing out.
    keys, args, read = scheduler.dispatch_turn(["q"], max_items=5)
    turn = read(redis_client.execute_command(*scheduler.command(keys, args)))
    assert turn.items == ()
    assert [(h.tenant, h.binding) for h in turn.held_back] == [
        (spent[0], f"tenant:{spent[0]} (1/h)")
    ]
    # Then shards 1 (its tenant held back) and 2 (one of each tenant out, both held back).
    batch = scheduler.dispatch(["q"], max_items=5)
    assert sorted(i.tenant for i in batch.items) == sorted([one, other])
    assert batch.held_back[0] == HeldBack("q", spent[1], f"tenant:{spent[1]}", "1/h")
    assert sorted(h.tenant for h in batch.held_back[1:]) == sorted([one, other])
    # Every tenant is parked now: none is judged anew, none said to be held back.
    for _ in range(3):
        batch = scheduler.dispatch(["q"], max_items=5)
        assert (batch.items, batch.held_back) == ((), ())


def test_every_key_a_sharded_namespace_writes_is_named_by_its_layouts(
    sharded: ShardedLimiter, redis_client: redis.Redis, namespace: str
) -> None:
    scheduler = FairScheduler(sharded, lease=30)
    sharded.set_limit("global", Limit(30, per=HOUR, burst=30))
    sharded.set_concurrency("tenant:*", 1)
    tenants = [t for s in range(3) for t in tenants_on(sharded, s)]
    for tenant in tenants:
        held = sharded.acquire(tenant, queue="q")
        sharded.release(held)
        scheduler.submit(tenant, f"{tenant}-1", queue="q")
    for _ in range(3):
        for item in scheduler.dispatch(["q"], max_items=3).items:
            scheduler.ack(item, remember=60)
    sharded.acquire(tenants[0])
    sharded.rebalancer.tick()
    sharded.rebalance()
    layouts = [sharded.keys, *sharded.shard_keys]
    kinds = set()
    for raw in redis_client.scan_iter(match=f"qrl:{{{namespace}*", count=1000):
        key = raw.decode()
        parsed = [p for p in (k.parse(key) for k in layouts) if p is not None]
        assert len(parsed) == 1, key
        kinds.add(parsed[0][0])
    assert {"config", "shared", "tenant", "share", "rebalance", "done", "audit"} <= kinds


def test_a_change_that_reached_home_only_reaches_the_shards_at_the_next_rebalance(
    sharded: ShardedLimiter, redis_client: redis.Redis, namespace: str
) -> None:
    """A change written at home by a process that stopped before writing the shards: the
    next rebalance finds the shards behind its version and copies the configuration. (A
    Limiter without the shards is refused: tests/test_shard_count.py.)"""
    sharded.set_limit("tenant:*", "5/s")
    call = sharded._core.set_limit_call("global", Limit(30, per=1, burst=30), False, "api")
    Limiter._run_config(sharded, call)  # (the home write only)
    with pytest.raises(ConfigError, match="used with 3 shard"):
        Limiter(redis_client, namespace=namespace).set_limit("global", "1/s")
    assert redis_client.hget(sharded.shard_keys[0].config, "global") is None
    assert sharded.rebalance().synced == 3
    for keys in sharded.shard_keys:
        assert redis_client.hget(keys.config, "global") == b"10.0 1.0 10.0 -"
        assert redis_client.hget(keys.config, "tenant:*") == b"5.0 1.0 5.0 -"


def test_the_metrics_snapshot_adds_up_the_shards(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    sharded.set_limit("global", Limit(30, per=HOUR, burst=30))
    sharded.set_limit("tenant:*", Limit(2, per=HOUR, burst=2))
    sharded.set_concurrency("global", 30)
    tenants = [t for s in range(3) for t in tenants_on(sharded, s)]
    held = []
    for tenant in tenants:
        for _ in range(3):  # two admitted, one denied by the tenant's own bucket
            held.append(sharded.acquire(tenant, queue="q"))
    scheduler = FairScheduler(sharded, lease=30)
    scheduler.submit(tenants[1], "parked-1", queue="q")
    snap = snapshot(sharded)
    assert snap["shards"] == 3
    assert snap["totals"]["allowed"] == 6
    assert snap["totals"]["denied"] == 3
    assert snap["totals"]["parked"] == 1
    assert snap["denied_by"] == {"tenant:*": 3}
    assert snap["allowed_by_queue"] == {"q": 6}
    assert set(snap["tenants"]) == set(tenants)
    assert all(snap["tenants"][t]["allowed"] == 2 for t in tenants)
    assert snap["limits"]["global"]["burst"] == 30  # as set, not a slice
    assert snap["buckets"]["global"]["burst"] == 30
    assert snap["buckets"]["global"]["tokens"] == pytest.approx(24, abs=0.1)
    assert snap["concurrency"]["global"] == {"cap": 30, "running": 6, "limit": "global"}
    assert snap["lanes"]["q"]["backlog"] == 1
    assert snap["tenant_backlog"] == {tenants[1]: 1}
    assert sum(snap["wait_ms_histogram"]["counts"]) == 3
    # The pauses as set at home, in the snapshot's shape (the Prometheus collector reads it).
    assert snap["pauses"] == {}
    sharded.pause("tenant:" + tenants[0], 60)
    paused = snapshot(sharded)["pauses"]
    assert list(paused) == ["tenant:" + tenants[0]]
    assert 59 < paused["tenant:" + tenants[0]]["remaining_s"] <= 60


def test_windows_and_burst_credits_are_sliced_and_settled_window_by_window(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    """Several windows per scope and burst credits (#13): each window's rate, burst and
    credit are sliced; a slice that moves settles every window's bucket and bank."""
    windows = (Limit(30, per=1, burst=30, credit=60), Limit(3000, per=86400, burst=3000))
    sharded.set_limit("global", windows)
    config = sharded.shard_keys[0].config
    assert redis_client.hget(config, "global") == b"10.0 1.0 10.0 -c20.0;1000.0 86400.0 1000.0 -"
    (tenant,) = tenants_on(sharded, 0)
    for _ in range(30):
        assert sharded.acquire(tenant).allowed  # 10 of the bucket, then the bank's 20
    shared = sharded.shard_keys[0].shared
    day = redis_client.hmget(shared, "b:global:w86400", "b:global:w86400:u")
    assert float(day[0]) == pytest.approx(1000 - 30, abs=0.1)
    # Last written an hour ago; then the slice doubles: every window is settled at the old
    # rate (the bucket and its bank refill to the old 10 + 20; the day window by 1000/24 up
    # to its old 1000), not at the new one (to 60, and by 2000/24).
    seconds, micros = redis_client.time()
    hour_ago = (seconds - 3600) * 1_000_000 + micros
    redis_client.hset(shared, mapping={"b:global:u": hour_ago, "b:global:w86400:u": hour_ago})
    value = "20.0 1.0 20.0 -c40.0;2000.0 86400.0 2000.0 -"
    sharded.write_shard(0, sharded.config_version(), "9", "", ["global", value, "1"])
    got = redis_client.hmget(shared, "b:global", "b:global:c", "b:global:w86400")
    assert (float(got[0]), float(got[1])) == pytest.approx((20, 10), abs=0.01)
    assert float(got[2]) == pytest.approx(1000, abs=0.01)
    while sharded.acquire(tenant).allowed:
        pass
    # A cost within the whole window's burst + credit but above the slice's is denied.
    decision = sharded.acquire(tenant, cost=80)
    assert not decision.allowed
    with pytest.raises(CostExceedsBurst) as info:
        sharded.acquire(tenant, cost=91)
    assert info.value.burst == 90


def test_the_cli_writes_and_reads_a_sharded_namespace(
    sharded: ShardedLimiter, redis_client: redis.Redis, redis_url: str, namespace: str
) -> None:
    runner = CliRunner(
        env={
            "REDIS_URL": redis_url,
            "QUEUE_RATELIMIT_NAMESPACE": namespace,
            "QUEUE_RATELIMIT_URL": None,
        }
    )
    result = runner.invoke(cli_main, ["--shards", "3", "limits", "set", "global", "30/s"])
    assert result.exit_code == 0, result.output
    for keys in sharded.shard_keys:
        assert redis_client.hget(keys.config, "global") == b"10.0 1.0 10.0 -"
    result = runner.invoke(cli_main, ["--shards", "0", "limits", "list"])
    assert result.exit_code == 2
    assert "--shards" in result.output


def test_priority_scopes_are_sliced_and_pauses_reach_every_shard(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    """Priority scopes are shared (sliced like global and queues); a pause is a moment,
    copied to every shard, and so is its end."""
    sharded.set_limit("priority:low", Limit(30, per=HOUR, burst=30))
    for keys in sharded.shard_keys:
        assert redis_client.hget(keys.config, "priority:low") == b"10.0 3600.0 10.0 -"
    tenants = [t for s in range(3) for t in tenants_on(sharded, s)]
    assert sharded.acquire(tenants[0], priority="low").remaining["priority:low"] == 9
    pause = sharded.pause("queue:q", 60)
    for tenant in tenants:
        decision = sharded.acquire(tenant, queue="q")
        assert not decision.allowed
        assert decision.paused
    for keys in sharded.shard_keys:
        assert redis_client.hget(keys.config, "pause:queue:q") == str(pause.until_ms).encode()
    assert sharded.resume("queue:q")
    assert all(sharded.acquire(t, queue="q").allowed for t in tenants)


def test_a_preview_replays_every_shards_recorded_traffic(sharded: ShardedLimiter) -> None:
    sharded.set_recording(600)
    tenants = [t for s in range(3) for t in tenants_on(sharded, s)]
    for tenant in tenants:
        for _ in range(5):
            assert sharded.acquire(tenant, queue="q").allowed
    preview = sharded.preview("global", Limit(1, per=HOUR, burst=3))
    assert preview.work == 15  # every shard's traffic, not the home slot's (none)
    # (Recorded by the second: 1/h refills 1/3600 a second straddled, see test_async_shards.)
    assert 12 - 60 / 3600 <= preview.delayed <= 12
    assert sharded.preview("tenant:*", Limit(1, per=HOUR, burst=5)).delayed == 0


def test_a_sharded_namespace_over_evalsha(sharded: ShardedLimiter) -> None:
    """Servers without Functions run the same scripts as EVALSHA (shards.lua included)."""
    sharded._scripts.transport = "evalsha"
    sharded.set_limit("global", Limit(30, per=HOUR, burst=30))
    tenants = [t for s in range(3) for t in tenants_on(sharded, s)]
    for tenant in tenants:
        assert sharded.acquire(tenant).remaining["global"] == 9
    sharded.rebalance()
    while sharded.acquire(tenants[1]).allowed:
        pass
    assert sharded.rebalance().shares["global"][1] > 0.9
    assert sharded._scripts.transport == "evalsha"


def test_a_failing_rebalance_never_fails_a_decision_and_warns_once(
    sharded: ShardedLimiter, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise redis.ConnectionError("away")

    monkeypatch.setattr(sharded.rebalancer, "run", broken)
    (tenant,) = tenants_on(sharded, 0)
    with caplog.at_level(logging.DEBUG, logger="queue_ratelimit"):
        for _ in range(3):
            sharded.rebalancer.due = 0.0
            sharded.client.delete(sharded.keys.rebalance)
            assert sharded.acquire(tenant).allowed
    failures = [r for r in caplog.records if "rebalancing the shards failed" in r.message]
    assert [r.levelno for r in failures] == [logging.WARNING, logging.DEBUG, logging.DEBUG]


# -- rounds that overlap, pauses that ran out ---------------------------------------------------
def test_a_round_fences_every_shard_so_an_older_round_writes_nowhere(
    sharded: ShardedLimiter,
) -> None:
    """An older round (its lock ran out while it stalled) is refused on every shard once a
    newer round started, also on shards the newer one had nothing to write to."""
    sharded.set_limit("global", "30/s")
    report = sharded.rebalance()
    assert report.writes == 0  # (nothing moved: the round wrote no slice)
    for shard in range(3):
        stale = sharded.write_shard(shard, 1, str(report.epoch - 1), "", ["global", "", "1"])
        assert stale == -1
    assert all(sharded.client.hget(k.config, "global") for k in sharded.shard_keys)


def test_a_fenced_round_leaves_the_shards_and_the_state_at_home_to_the_newer_one(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    sharded.set_limit("global", Limit(30, per=HOUR, burst=30))
    sharded.rebalance()
    (tenant,) = tenants_on(sharded, 1)
    while sharded.acquire(tenant).allowed:
        pass
    before = redis_client.hgetall(sharded.keys.share)
    # A newer round's epoch is on shard 2 already (this process stalled past its lock).
    redis_client.hset(sharded.shard_keys[2].config, "_lease", 10**9)
    report = sharded.rebalance()
    after = redis_client.hgetall(sharded.keys.share)
    assert {k: v for k, v in after.items() if k != b"epoch"} == {
        k: v for k, v in before.items() if k != b"epoch"
    }
    assert report.fenced
    assert report.writes == 0
    for keys in sharded.shard_keys:
        assert redis_client.hget(keys.config, "global") == b"10.0 3600.0 10.0 -"


@pytest.mark.parametrize(
    ("home_epoch", "epoch", "written"),
    [
        (7, "7", 2),  # the newest round: its state goes in
        (8, "7", -1),  # a newer round took an epoch since: refused, nothing written
        (None, "1", -1),  # no round ever started at home: nobody's state to write
    ],
)
def test_a_rounds_state_goes_home_only_while_its_epoch_is_the_newest(
    sharded: ShardedLimiter,
    redis_client: redis.Redis,
    home_epoch: int | None,
    epoch: str,
    written: int,
) -> None:
    share = sharded.keys.share
    if home_epoch is not None:
        redis_client.hset(share, mapping={"epoch": home_epoch, "seen": "old"})
    before = redis_client.hgetall(share)
    assert sharded.write_state(epoch, {"seen": "new", "shares:global": "0.5 0.25 0.25"}) == written
    after = redis_client.hgetall(share)
    if written < 0:
        assert after == before
    else:
        assert after[b"seen"] == b"new"
        assert after[b"shares:global"] == b"0.5 0.25 0.25"


def test_an_older_rounds_state_landing_after_a_newer_rounds_is_refused(
    sharded: ShardedLimiter, redis_client: redis.Redis, namespace: str
) -> None:
    """The window before the newer round's fence: the older round has read and planned (it
    wrote no slice, or wrote them before the fence), the newer round runs whole, then the
    older round's state write lands. It used to overwrite the newer round's counters seen
    (and shares), so the next round measured demand from the wrong point."""
    sharded.set_limit("global", Limit(30, per=HOUR, burst=30))
    tenants = [t for s in range(3) for t in tenants_on(sharded, s)]
    for tenant in tenants:
        sharded.acquire(tenant)
    other = Limiter(redis_client, namespace=namespace, shards=3, rebalance_interval=3600)
    assert isinstance(other, ShardedLimiter)  # another process of the namespace
    plan = sharded.rebalancer.plan
    newer: dict[bytes, bytes] = {}

    def plan_then_a_newer_round(now_us: int, replies: list[object]) -> Any:
        planned = plan(now_us, replies)
        for tenant in tenants:  # traffic the newer round counts, the older did not
            other.acquire(tenant)
        assert not other.rebalance().fenced
        newer.update(redis_client.hgetall(sharded.keys.share))
        return planned

    sharded.rebalancer.plan = plan_then_a_newer_round  # type: ignore[method-assign]
    report = sharded.rebalance()
    assert report.fenced
    assert redis_client.hgetall(sharded.keys.share) == newer


def test_pauses_the_home_slot_forgets_are_forgotten_on_the_shards(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    """A pause or resume at home forgets the pauses that ran out (lua/config.lua); the
    shards forget them too, rather than keep them as past moments."""
    ran_out = sharded.pause("queue:a", 0.001)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        seconds, micros = redis_client.time()
        if seconds * 1000 + micros / 1000 > ran_out.until_ms:
            break
    sharded.pause("queue:b", 60)
    assert redis_client.hget(sharded.keys.config, "pause:queue:a") is None
    for keys in sharded.shard_keys:
        assert redis_client.hget(keys.config, "pause:queue:a") is None
        assert redis_client.hget(keys.config, "pause:queue:b") is not None
    # A resume forgets them as well (here: none left), and a later pause of the same scope
    # (a newer version) is written whatever came first.
    assert sharded.resume("queue:b")
    sharded.pause("queue:a", 60)
    for keys in sharded.shard_keys:
        assert redis_client.hget(keys.config, "pause:queue:b") is None
        assert redis_client.hget(keys.config, "pause:queue:a") is not None


# -- what waits, read over every shard -----------------------------------------------------------
def test_celery_inspect_adds_up_every_shards_backlog(sharded: ShardedLimiter) -> None:
    """``celery inspect qrl_gate``'s backlog figures: every shard's lanes, added up."""
    from types import SimpleNamespace

    from queue_ratelimit.celery._inspect import backlog_report

    scheduler = FairScheduler(sharded)
    tenants = [tenants_on(sharded, shard)[0] for shard in range(3)]
    for n, tenant in enumerate(tenants):
        for i in range(n + 1):
            scheduler.submit(tenant, f"{tenant}-{i}", queue="q")
    assert scheduler.dispatch(["q"]).items  # one in flight, on whichever shard it came from
    gate = SimpleNamespace(_rt=SimpleNamespace(scheduler=scheduler), lanes=["q"])
    shown = backlog_report(gate)  # type: ignore[arg-type]
    assert shown["in_flight"] == 1
    assert shown["queues"]["q"]["waiting"] == 5
    assert sum(shown["queues"]["q"]["tenants"].values()) == 5
    assert set(shown["queues"]["q"]["tenants"]) <= set(tenants)
    assert shown["queues"]["q"]["tenants"][tenants[2]] >= 2


# -- the Celery gate's wire on a sharded namespace ----------------------------------------------
def test_a_sharded_schedulers_calls_go_over_the_wire_turn_by_turn(
    sharded: ShardedLimiter, redis_client: redis.Redis
) -> None:
    """The gate's calls on a sharded namespace go over its wire (one connection: every
    shard's slot is on the one server): a dispatch is one shard per turn, the turns go round
    the shards, and a settlement of a dispatched item reaches its shard."""
    from queue_ratelimit.celery._settler import usable
    from queue_ratelimit.celery._wire import Wire

    scheduler = FairScheduler(sharded)
    sharded.set_concurrency("tenant:*", 5)
    assert usable(scheduler)
    (tenant,) = tenants_on(sharded, 2)
    for i in range(3):
        scheduler.submit(tenant, f"job-{i}", queue="q")
    wire = Wire(redis_client, None)
    got: list[tuple[int, object]] = []
    readers = []
    assert scheduler.dispatch_turns == 3
    for turn in range(scheduler.dispatch_turns):
        keys, args, read = scheduler.dispatch_turn(["q"], max_items=5)
        readers.append(read)
        wire.send([scheduler.command(keys, args)], lambda r, n=turn: got.append((n, r)))
    wire.drain()
    batches = [readers[n](result[0]) for n, result in got]  # type: ignore[index]
    (found,) = [b for b in batches if b.items]
    assert sorted(i.id for i in found.items) == ["job-0", "job-1", "job-2"]
    assert all(i.slot is not None and i.slot.token.startswith("2.") for i in found.items)
    assert scheduler.in_flight() == 3
    settled: list[object] = []
    for item in found.items:
        keys, args = scheduler.settle_call(item, "ack", 0)
        wire.send([scheduler.command(keys, args)], settled.append)
    wire.drain()
    assert [r[0] for r in settled] == [1, 1, 1]  # type: ignore[index]
    assert scheduler.in_flight() == 0
    wire.close()
