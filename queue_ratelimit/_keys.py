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

    def tenant(self, tenant: str) -> str:
        """Hash of one tenant's buckets and counters; it expires once the tenant is idle."""
        return f"{self.base}:t:{tenant}"

    def slots(self, scope: str) -> str:
        """Sorted set of the holders of a capped scope's concurrency slots -> lease deadline
        (Redis time in microseconds); ``scope`` names one tenant, not a default."""
        return f"{self.base}:c:{scope}"

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
