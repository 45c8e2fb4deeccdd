"""Tests for scope parsing, name validation and the Redis key layout (one Cluster slot)."""

from __future__ import annotations

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from queue_ratelimit import (
    ConfigError,
    InvalidName,
    InvalidScope,
    KeySpace,
    Limit,
    Limiter,
    Scope,
)

VALID_NAMES = [
    "acme",
    "a",
    "A",
    "0",
    "_",
    "_private",
    "Tenant-42",
    "user@example.com",
    "a.b-c+d=e/f",
    "x" * 128,
]

INVALID_NAMES = [
    "",
    "a:b",
    ":acme",
    "acme:",
    "{acme}",
    "ac{me",
    "ac}me",
    "*",
    "a*",
    " acme",
    "acme ",
    "a b",
    "a\nb",
    "acme\n",
    "a\tb",
    "a\x00b",
    "-acme",
    ".acme",
    "@acme",
    "/acme",
    "x" * 129,
    "café",
    "ünicode",
    "テナント",
    "a\\b",
    "a'b",
    'a"b',
    "a#b",
    "a?b",
    "a%b",
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_tenant_and_queue_names(name: str) -> None:
    assert Scope.parse(f"tenant:{name}") == Scope("tenant", tenant=name)
    assert Scope.parse(f"queue:{name}") == Scope("queue", queue=name)
    assert Scope.parse(f"tenant:{name}:queue:{name}") == Scope("tenant_queue", name, name)


# "tenant:*" is the default scope, so "*" is tested as a tenant only through the limiter.
@pytest.mark.parametrize("name", [n for n in INVALID_NAMES if n != "*"])
def test_invalid_tenant_names_in_a_scope(name: str) -> None:
    # A name with a colon changes the shape of the scope, so it is an unknown scope instead.
    with pytest.raises((InvalidName, InvalidScope)) as info:
        Scope.parse(f"tenant:{name}")
    if ":" not in name:
        assert info.type is InvalidName
        assert "invalid tenant name" in str(info.value)
        assert "no ':', '{', '}', '*', spaces" in str(info.value)


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_queue_names_in_a_scope(name: str) -> None:
    with pytest.raises((InvalidName, InvalidScope)) as info:
        Scope.parse(f"tenant:acme:queue:{name}")
    if ":" not in name:
        assert info.type is InvalidName
        assert "invalid queue name" in str(info.value)


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_names_are_refused_by_every_limiter_call(limiter: Limiter, name: str) -> None:
    for call in (
        lambda: limiter.acquire(name),
        lambda: limiter.peek(name),
        lambda: limiter.refund(name),
        lambda: limiter.acquire("acme", queue=name),
        lambda: limiter.set_exempt(name),
    ):
        with pytest.raises(InvalidName):
            call()
    if name != "*":  # "tenant:*" is the default scope
        with pytest.raises(ConfigError):
            limiter.set_limit(f"tenant:{name}", "1/s")
    assert not list(limiter.client.scan_iter(match=f"qrl:{{{limiter.namespace}}}:*"))


@pytest.mark.parametrize("value", [None, 42, b"acme", ["acme"]])
def test_non_string_names_are_refused(limiter: Limiter, value: object) -> None:
    with pytest.raises(InvalidName, match="tenant name must be a string"):
        limiter.acquire(value)  # type: ignore[arg-type]
    if value is not None:  # queue=None means "no queue"
        with pytest.raises(InvalidName, match="queue name must be a string"):
            limiter.acquire("acme", queue=value)  # type: ignore[arg-type]


# text, kind, tenant, queue, is_default
SCOPES = [
    ("global", "global", None, None, False),
    ("queue:emails", "queue", None, "emails", False),
    ("tenant:acme", "tenant", "acme", None, False),
    ("tenant:*", "tenant", "*", None, True),
    ("tenant:acme:queue:emails", "tenant_queue", "acme", "emails", False),
    ("tenant:*:queue:emails", "tenant_queue", "*", "emails", True),
]


@pytest.mark.parametrize(("text", "kind", "tenant", "queue", "is_default"), SCOPES)
def test_scope_forms(
    text: str, kind: str, tenant: str | None, queue: str | None, is_default: bool
) -> None:
    scope = Scope.parse(text)
    assert (scope.kind, scope.tenant, scope.queue) == (kind, tenant, queue)
    assert scope.is_default is is_default
    assert str(scope) == text
    assert Scope.parse(str(scope)) == scope


# text, the error it raises
BAD_SCOPES = [
    ("", InvalidScope),
    ("Global", InvalidScope),
    ("GLOBAL", InvalidScope),
    ("globals", InvalidScope),
    ("global:x", InvalidScope),
    (" global", InvalidScope),
    ("tenant", InvalidScope),
    ("queue", InvalidScope),
    ("tenants:acme", InvalidScope),
    ("user:acme", InvalidScope),
    ("tenant:acme:queue", InvalidScope),
    ("tenant:acme:q:emails", InvalidScope),
    ("tenant:acme:queues:emails", InvalidScope),
    ("tenant:acme:queue:emails:x", InvalidScope),
    ("queue:emails:tenant:acme", InvalidScope),
    ("tenant:a:b", InvalidScope),
    ("tenant:", InvalidName),
    ("queue:", InvalidName),
    ("queue:*", InvalidName),
    ("tenant:acme:queue:*", InvalidName),
    ("tenant:*:queue:*", InvalidName),
    ("tenant:**", InvalidName),
    ("tenant:{acme}", InvalidName),
    ("tenant:ac me", InvalidName),
    ("tenant:acme\n", InvalidName),
    ("queue:{emails}", InvalidName),
]


@pytest.mark.parametrize(("text", "error"), BAD_SCOPES)
def test_bad_scopes(text: str, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        Scope.parse(text)
    assert isinstance(info.value, ConfigError)
    if error is InvalidScope:
        assert f"unknown scope {text!r}" in str(info.value)
        assert "'tenant:<t>:queue:<q>'" in str(info.value)


@pytest.mark.parametrize("value", [None, 7, b"global", ("global",)])
def test_non_string_scope(value: object) -> None:
    with pytest.raises(InvalidScope, match="a scope must be a string"):
        Scope.parse(value)


@pytest.mark.parametrize(("text", "error"), BAD_SCOPES)
def test_limiter_refuses_bad_scopes(limiter: Limiter, text: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        limiter.set_limit(text, "1/s")
    with pytest.raises(error):
        limiter.get_limit(text)
    with pytest.raises(error):
        limiter.delete_limit(text)
    assert limiter.limits() == {}


def test_scope_objects_are_accepted_by_the_limiter(limiter: Limiter) -> None:
    scope = Scope("tenant_queue", tenant="acme", queue="emails")
    limiter.set_limit(scope, "2/s")
    assert limiter.get_limit("tenant:acme:queue:emails").limit == Limit(2)
    assert limiter.get_limit(scope).scope == "tenant:acme:queue:emails"


@pytest.mark.parametrize(
    "namespace",
    ["", "a:b", "{ns}", "n}s", "n s", "n\n", "x" * 65, "-ns", "ns*", "ns/x", "ñs", None],
)
def test_invalid_namespaces_and_prefixes(redis_client: redis.Redis, namespace: object) -> None:
    with pytest.raises(InvalidName, match="invalid namespace"):
        Limiter(redis_client, namespace=namespace)  # type: ignore[arg-type]
    with pytest.raises(InvalidName, match="invalid namespace"):
        Limiter(redis_client, namespace="ok", prefix=namespace)  # type: ignore[arg-type]
    with pytest.raises(InvalidName):
        KeySpace(namespace=namespace)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "priority", ["", "High", "1st", "a-b", "x" * 33, "a b", "a:b", "high\n", 3]
)
def test_invalid_priorities(limiter: Limiter, priority: object) -> None:
    with pytest.raises(InvalidName, match="invalid priority"):
        limiter.acquire("acme", priority=priority)  # type: ignore[arg-type]


def test_key_layout() -> None:
    keys = KeySpace(prefix="app", namespace="prod-1")
    assert keys.base == "app:{prod-1}"
    assert keys.config == "app:{prod-1}:config"
    assert keys.audit == "app:{prod-1}:audit"
    assert keys.shared == "app:{prod-1}:shared"
    assert keys.tenant("acme") == "app:{prod-1}:t:acme"
    assert KeySpace().base == "qrl:{default}"


@pytest.mark.parametrize(
    ("scope", "location"),
    [
        ("global", ("shared", "b:global")),
        ("queue:emails", ("shared", "b:queue:emails")),
        ("tenant:acme", ("tenant", "b")),
        ("tenant:acme:queue:emails", ("tenant", "bq:emails")),
        ("tenant:*", None),
        ("tenant:*:queue:emails", None),
    ],
)
def test_bucket_locations(scope: str, location: tuple[str, str] | None) -> None:
    keys = KeySpace(namespace="ns")
    where = keys.bucket_location(Scope.parse(scope))
    if location is None:
        assert where is None
    else:
        key = keys.shared if location[0] == "shared" else keys.tenant("acme")
        assert where == (key, location[1])


@pytest.mark.parametrize("namespace", ["ns", "prod-1", "a.b_c", "x" * 64, "0"])
def test_every_key_of_a_namespace_is_in_one_cluster_slot(namespace: str) -> None:
    keys = KeySpace(namespace=namespace)
    slot = key_slot(namespace.encode())
    names = [keys.config, keys.audit, keys.shared]
    names += [keys.tenant(t) for t in VALID_NAMES]
    for scope in ("global", "queue:q", "tenant:acme", "tenant:acme:queue:q"):
        location = keys.bucket_location(Scope.parse(scope))
        assert location is not None
        names.append(location[0])
    assert {key_slot(name.encode()) for name in names} == {slot}


def test_keys_written_by_a_limiter_stay_in_its_namespace_and_slot(
    limiter: Limiter, redis_client: redis.Redis
) -> None:
    before = set(redis_client.keys("*"))
    limiter.set_limit("global", "100/s")
    limiter.set_limit("queue:emails", "100/s")
    limiter.set_limit("tenant:*", "100/s")
    limiter.set_limit("tenant:*:queue:emails", "100/s")
    limiter.set_limit("tenant:acme:queue:emails", Limit(1, burst=1))
    limiter.set_exempt("vip", "all")
    for tenant in VALID_NAMES:
        limiter.acquire(tenant, queue="emails", priority="high")
        limiter.acquire(tenant, queue="emails", priority="high")  # denied for acme
        limiter.refund(tenant, queue="emails")
    limiter.acquire("vip", queue="emails")
    limiter.delete_limit("tenant:acme:queue:emails")
    created = {k.decode() for k in set(redis_client.keys("*")) - before}
    base = f"qrl:{{{limiter.namespace}}}:"
    assert created, "the limiter wrote nothing"
    assert all(k.startswith(base) for k in created), created
    assert {key_slot(k.encode()) for k in created} == {key_slot(limiter.namespace.encode())}
    assert {k for k in created if k.startswith(f"{base}t:")} == {
        f"{base}t:{t}" for t in [*VALID_NAMES, "vip"]
    }


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(tenant=st.text(max_size=140), queue=st.one_of(st.none(), st.text(max_size=140)))
def test_any_caller_input_is_refused_or_stays_in_the_namespace(
    limiter: Limiter, tenant: str, queue: str | None
) -> None:
    base = f"qrl:{{{limiter.namespace}}}:"
    try:
        limiter.peek(tenant, queue=queue)
    except InvalidName:
        return
    key = limiter.keys.tenant(tenant)
    assert key == f"{base}t:{tenant}"
    assert key_slot(key.encode()) == key_slot(limiter.namespace.encode())
    # A valid name has no character that could end the hash tag or start another key part.
    assert not set(tenant + (queue or "")) & set(":{}* \t\r\n")


@settings(max_examples=300, deadline=None, database=None)
@given(text=st.text(alphabet=st.sampled_from("tenant:queue*{}ab \n"), max_size=40))
def test_scope_parsing_is_total(text: str) -> None:
    """Every string either parses to a scope that prints back as itself, or raises a ConfigError."""
    try:
        scope = Scope.parse(text)
    except ConfigError:
        return
    assert str(scope) == text
    location = KeySpace(namespace="ns").bucket_location(scope)
    if location is not None:
        assert location[0].startswith("qrl:{ns}:")
