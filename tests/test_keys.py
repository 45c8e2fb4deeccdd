"""The key layout (``KeySpace``): one owner for every key name, and no user-chosen name that
makes two keys one."""

from __future__ import annotations

import logging
from itertools import combinations

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from queue_ratelimit import FairScheduler, InvalidName, KeySpace, Limit, Limiter
from queue_ratelimit.metrics import publish_snapshot

# Names chosen to look like the layout's own words.
LOOKALIKES = [
    "done", "active", "parked", "receipt", "n", "age", "tp", "bl", "inflight", "lease",
    "meta", "payload", "lanes", "wake", "s", "s2", "t", "c", "cw", "rec", "config", "audit",
    "shared", "snapshot", "normal", "high", "total", "_vt", "default", "qrl",
]  # fmt: skip


# -- the collisions of issue #11 (finding 4), each failing on the layout before --------------
@pytest.fixture
def scheduler(limiter: Limiter) -> FairScheduler:
    return FairScheduler(limiter)


@pytest.mark.parametrize("item_id", ["n", "active", "age", "tp:acme"])
def test_a_queue_named_done_does_not_make_ids_duplicates(
    scheduler: FairScheduler, item_id: str
) -> None:
    assert scheduler.submit("acme", "a1", queue="done")
    # Before: the done marker of `item_id` was a key of the lane "done": "duplicate", dropped.
    assert scheduler.gate("other", item_id, queue="emails").action == "run"
    assert scheduler.submit("other", item_id, queue="emails")


def test_remembering_an_id_does_not_overwrite_a_lane(scheduler: FairScheduler) -> None:
    assert scheduler.submit("acme", "n", queue="emails")
    (item,) = scheduler.dispatch(["emails"]).items
    assert scheduler.submit("acme", "a1", queue="done")
    # Before: the marker for id "n" replaced the lane "done"'s counts hash with a string...
    assert scheduler.ack(item, remember=60)
    # ... and the next dispatch of that lane raised WRONGTYPE.
    assert [i.id for i in scheduler.dispatch(["done"]).items] == ["a1"]
    assert scheduler.gate("acme", "n", queue="emails").action == "duplicate"


def test_a_receipt_does_not_overwrite_a_lane_named_receipt(scheduler: FairScheduler) -> None:
    assert scheduler.submit("acme", "x", queue="receipt")
    assert scheduler.submit("acme", "y", queue="emails")
    receipt = scheduler.receipt_key("n")
    assert len(scheduler.dispatch(["emails"], receipt=(receipt, "nonce-1")).items) == 1
    assert scheduler.client.get(receipt) == b"nonce-1 y"
    # Before: the receipt for owner "n" was the lane "receipt"'s counts hash.
    assert [i.id for i in scheduler.dispatch(["receipt"]).items] == ["x"]
    assert scheduler.backlog("receipt") == 0


@pytest.mark.parametrize("item_id", ["a\tb", "a\nb", "a\x00b", "a\u2028b", "a b", ""])
def test_item_ids_with_whitespace_or_control_characters_are_refused(
    scheduler: FairScheduler, item_id: str
) -> None:
    # Receipts and slot holders list ids separated by whitespace: a tab would split one.
    with pytest.raises(InvalidName, match="item id"):
        scheduler.submit("acme", item_id)


# -- the layout is injective ------------------------------------------------------------------
names = st.one_of(
    st.sampled_from(LOOKALIKES),
    st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.@+=\-/]{0,12}\Z"),
)
priorities = st.one_of(st.sampled_from(["high", "normal", "low", "n", "s", "done"]),
                       st.from_regex(r"\A[a-z][a-z0-9_]{0,8}\Z"))  # fmt: skip
item_ids = st.one_of(
    st.sampled_from(LOOKALIKES),
    st.builds(lambda a, b: f"{a}:{b}", st.sampled_from(LOOKALIKES), names),
    st.text(alphabet=st.sampled_from("ab:{}*/.-_x1"), min_size=1, max_size=12),
)
scopes = st.one_of(
    st.just("global"),
    names.map(lambda q: f"queue:{q}"),
    names.map(lambda t: f"tenant:{t}"),
    st.tuples(names, names).map(lambda tq: f"tenant:{tq[0]}:queue:{tq[1]}"),
)
FIXED = ["config", "audit", "shared", "snapshot", "inflight", "lease", "meta", "payload", "lanes"]
keyed = st.one_of(
    st.sampled_from(FIXED).map(lambda kind: (kind, ())),
    names.map(lambda t: ("tenant", (t,))),
    scopes.map(lambda s: ("slots", (s,))),
    st.integers(0, 10**8).map(lambda m: ("record", (str(m),))),
    st.tuples(st.sampled_from(["active", "parked", "counts", "age"]), names).map(
        lambda kl: (kl[0], (kl[1],))
    ),
    st.tuples(names, names).map(lambda lt: ("classes", lt)),
    st.tuples(names, names).map(lambda lt: ("transit", lt)),
    st.tuples(names, names, priorities).map(lambda ltp: ("backlog", ltp)),
    st.tuples(st.sampled_from(["done", "receipt"]), item_ids).map(lambda ki: (ki[0], (ki[1],))),
    scopes.map(lambda s: ("waiters", (s,))),
)
spaces = st.sampled_from(
    [KeySpace(), KeySpace(namespace="done"), KeySpace(prefix="s2", namespace="s")]
)


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.tuples(spaces, keyed), min_size=2, max_size=40, unique=True))
def test_distinct_kinds_and_names_give_distinct_keys(
    pairs: list[tuple[KeySpace, tuple[str, tuple[str, ...]]]],
) -> None:
    keys = {}
    for space, (kind, parts) in pairs:
        key = space.name(kind, *parts)
        # Each name reads back as what made it: so no other (kind, parts) can make it.
        assert space.parse(key) == (kind, parts)
        assert key.startswith(space.base + ":")
        keys[(space, kind, parts)] = key
    for (a, ka), (b, kb) in combinations(keys.items(), 2):
        assert ka != kb, f"{a} and {b} share the key {ka}"


@settings(max_examples=200, deadline=None, database=None)
@given(st.text(alphabet=st.sampled_from("qrl:{}defaultsn2bcwrtp*x"), max_size=40))
def test_parse_recognises_only_names_the_layout_makes(text: str) -> None:
    space = KeySpace()
    parsed = space.parse(text)
    if parsed is None or parsed[0] == "legacy":
        return
    kind, parts = parsed
    try:
        assert space.name(kind, *parts) == text
    except InvalidName:
        pytest.fail(f"{text!r} parsed as {parsed} but is not a name the layout makes")


# -- the scripts use the layout's names -------------------------------------------------------
def test_every_key_the_scripts_write_is_named_by_keyspace(
    limiter: Limiter, redis_client: redis.Redis
) -> None:
    """Exercise every script path that writes, then read back every key of the namespace:
    each is one KeySpace names (so no script spells a layout of its own), of its type."""
    scheduler = FairScheduler(limiter, lease=30)
    limiter.set_limit("tenant:slow", Limit(1, per=3600, burst=1))
    limiter.set_concurrency("tenant:capped", 1)
    limiter.set_recording(60)
    plain = f"{limiter.keys.base}-plain-list"  # a queue system's own list, not ours
    try:
        for tenant in ("acme", "slow", "capped"):
            for i in range(3):
                scheduler.submit(tenant, f"{tenant}:{i}", queue="done", payload=b"x")
        scheduler.route("acme", "r1", plain, queue="other")
        scheduler.adopt("other", plain, [("r1", "acme", "high", 1)])
        assert scheduler.gate("gated", "g1", queue="fresh").action == "run"
        batch = scheduler.dispatch(
            ["done", "other"], max_items=10, receipt=(scheduler.receipt_key("me"), "1")
        )
        assert batch.items
        for item in batch.items:
            scheduler.ack(item, remember=60)
        scheduler.dispatch(["done"], max_items=10)  # capped waits for its slot again
        decision = limiter.acquire("capped")
        limiter.release(decision)
        scheduler.submit("acme", "waits", queue="later")
        scheduler.hint("acme", queue="later", item_id="hinted")
        publish_snapshot(limiter)
    finally:
        redis_client.delete(plain)
    types = {
        "config": "hash", "audit": "stream", "shared": "hash", "snapshot": "string", "dt": "zset",
        "tenant": "hash", "slots": "zset", "record": "hash", "inflight": "zset",
        "lease": "hash", "meta": "hash", "payload": "hash", "lanes": "set", "active": "zset",
        "parked": "zset", "counts": "hash", "age": "zset", "classes": "zset",
        "backlog": "list", "done": "string", "receipt": "string", "waiters": "set",
        "transit": "zset",
    }  # fmt: skip
    seen = set()
    for raw in redis_client.scan_iter(match=limiter.keys.pattern, count=1000):
        key = raw.decode()
        parsed = limiter.keys.parse(key)
        assert parsed is not None, f"{key} is no KeySpace name"
        assert parsed[0] != "legacy", key
        assert redis_client.type(key).decode() == types[parsed[0]], key
        seen.add(parsed[0])
    # The run touched the scheduler's kinds, not only the limiter's.
    assert {
        "backlog",
        "classes",
        "active",
        "parked",
        "done",
        "receipt",
        "waiters",
        "transit",
    } <= seen


def test_work_left_in_the_old_layout_is_reported(
    limiter: Limiter, caplog: pytest.LogCaptureFixture
) -> None:
    limiter.client.hset(limiter.keys.legacy_meta, "job-1", "emails acme normal 1 0")
    scheduler = FairScheduler(limiter)
    with caplog.at_level(logging.WARNING, logger="queue_ratelimit"):
        scheduler.submit("acme", "job-2")
        scheduler.submit("acme", "job-3")
    warnings = [r.getMessage() for r in caplog.records if "layout" in r.getMessage()]
    assert len(warnings) == 1, "once, at the first call"
    assert "1 item(s)" in warnings[0]
    assert limiter.keys.parse(limiter.keys.legacy_meta) == ("legacy", ("s:meta",))
