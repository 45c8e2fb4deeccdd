"""The Redis key layout: every key of a namespace shares one Redis Cluster hash slot."""

from __future__ import annotations

from dataclasses import dataclass

from ._scopes import Scope, check_name, check_namespace

DEFAULT_PREFIX = "qrl"
DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Names the keys of one namespace: ``<prefix>:{<namespace>}:...``.

    The braces are a Redis Cluster hash tag, so the multi-key scripts stay legal on a cluster.
    """

    prefix: str = DEFAULT_PREFIX
    namespace: str = DEFAULT_NAMESPACE

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        check_namespace(self.prefix)

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.namespace}}}"

    @property
    def config(self) -> str:
        """Hash of scope -> encoded limit, plus ``exempt:<t>``, ``mode:shadow``, ``_version``."""
        return f"{self.base}:config"

    @property
    def audit(self) -> str:
        """Stream of configuration changes."""
        return f"{self.base}:audit"

    @property
    def shared(self) -> str:
        """Hash of the global and per-queue buckets and the aggregate counters."""
        return f"{self.base}:shared"

    @property
    def tenant_denials(self) -> str:
        """Sorted set of tenant -> its denials (by any scope), the most denied kept: read by
        the metrics for their per-tenant series (lua/buckets.lua, ``count_tenant_denial``)."""
        return f"{self.base}:dt"

    def tenant(self, tenant: str) -> str:
        """Hash of one tenant's buckets and counters; it expires once the tenant is idle."""
        return f"{self.base}:t:{tenant}"

    def slots(self, scope: str) -> str:
        """Sorted set of the holders of a capped scope's concurrency slots -> lease deadline
        (Redis time in microseconds); ``scope`` names one tenant, not a default."""
        return f"{self.base}:c:{scope}"

    # -- the fair scheduler's keys the metrics read (lua/scheduler.lua names them) -------
    @property
    def lanes(self) -> str:
        """Set of the lanes (queues) ever used, so metrics find them without SCAN."""
        return f"{self.base}:s:lanes"

    @property
    def inflight(self) -> str:
        """Sorted set: dispatched item -> lease deadline (ms)."""
        return f"{self.base}:s:inflight"

    def active(self, lane: str) -> str:
        """Sorted set: a lane's backlogged tenants -> pass."""
        return f"{self.base}:s:{check_name('queue', lane)}:active"

    def parked(self, lane: str) -> str:
        """Sorted set: a lane's tenants held back by their own caps -> wake time (ms)."""
        return f"{self.base}:s:{check_name('queue', lane)}:parked"

    def counts(self, lane: str) -> str:
        """Hash: a lane's backlog size per tenant, ``:total``, ``:vt``, ``:cv``."""
        return f"{self.base}:s:{check_name('queue', lane)}:n"

    def age(self, lane: str) -> str:
        """Sorted set: a lane's waiting items -> the time they were first queued (ms)."""
        return f"{self.base}:s:{check_name('queue', lane)}:age"

    def bucket_location(self, scope: Scope) -> tuple[str, str] | None:
        """The (key, field) holding a scope's bucket tokens (their Redis-clock time is in
        field ``<field>:u``); None for default scopes."""
        if scope.is_default:
            return None
        if scope.kind == "global":
            return self.shared, "b:global"
        if scope.kind == "queue":
            return self.shared, f"b:queue:{scope.queue}"
        assert scope.tenant is not None
        key = self.tenant(check_name("tenant", scope.tenant))
        return (key, "b") if scope.kind == "tenant" else (key, f"bq:{scope.queue}")
