"""Scope names (``global``, ``tenant:<t>``, ``tenant:<t>:queue:<q>``, ``queue:<q>``,
``priority:<p>``) and the validation of every name that ends up inside a Redis key."""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass
from typing import Literal

from ._errors import InvalidName, InvalidScope

# Colons separate key parts, braces are Redis Cluster hash tags, "*" marks a default scope,
# and whitespace or control characters make keys unreadable in redis-cli: none may appear.
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.@+=\-/]{0,127}"
PRIORITY_PATTERN = r"[a-z][a-z0-9_]{0,31}"
_NAME_RE = re.compile(NAME_PATTERN)
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
_PRIORITY_RE = re.compile(PRIORITY_PATTERN)
ANY_TENANT = "*"
MAX_ITEM_ID = 256
_SPACE_RE = re.compile(r"\s")
# Every scope Scope.parse reads, and the concrete ones (no default): for documents such as
# the admin API's OpenAPI schema, where a pattern must say exactly what is accepted.
_Q = rf"queue:{NAME_PATTERN}"
_P = rf"priority:{PRIORITY_PATTERN}"
SCOPE_PATTERN = rf"^(global|{_Q}|{_P}|tenant:(\*|{NAME_PATTERN})(:{_Q})?)$"
CONCRETE_SCOPE_PATTERN = rf"^(global|{_Q}|{_P}|tenant:{NAME_PATTERN}(:{_Q})?)$"
# The scopes a concurrency cap may be set on (every one but a priority).
CAP_SCOPE_PATTERN = rf"^(global|{_Q}|tenant:(\*|{NAME_PATTERN})(:{_Q})?)$"

ScopeKind = Literal["global", "queue", "tenant", "tenant_queue", "priority"]


def _shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: an error never echoes megabytes back."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        # Only the head is shown: no need to build the repr of megabytes first.
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_name(kind: str, value: object) -> str:
    """Return ``value`` if it is a usable tenant or queue name, else raise ``InvalidName``."""
    if not isinstance(value, str):
        raise InvalidName(f"{kind} name must be a string, got {type(value).__name__}")
    if not _NAME_RE.fullmatch(value):
        raise InvalidName(
            f"invalid {kind} name {_shown(value)}: use 1-128 characters from letters, digits and "
            f"_ . @ + = - / (starting with a letter, digit or _; no ':', '{{', '}}', '*', spaces)"
        )
    return value


def check_item_id(value: object) -> str:
    """Return ``value`` if it is a usable scheduler item id (a job id), else raise
    ``InvalidName``.

    Any printable text up to 256 characters without whitespace: ids come from the queue
    systems (Celery task ids, RQ job ids). An id is the last part of the keys it names
    (``KeySpace.done``), so it may contain ':'; whitespace would split the replies and
    receipts that list ids (and slot holders) by spaces.
    """
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_ITEM_ID
        or not value.isprintable()
        or _SPACE_RE.search(value)
    ):
        raise InvalidName(
            f"item id must be a non-empty string of at most {MAX_ITEM_ID} printable characters "
            f"without whitespace, got {_shown(value)}"
        )
    return value


def check_namespace(value: object) -> str:
    """Return ``value`` if it is a usable namespace, else raise ``InvalidName``."""
    if not isinstance(value, str) or not _NAMESPACE_RE.fullmatch(value):
        raise InvalidName(
            f"invalid namespace {_shown(value)}: use 1-64 characters from letters, digits, _ . -"
        )
    return value


def check_priority(value: object) -> str:
    """Return ``value`` if it is a usable priority name (``high``, ``normal``...)."""
    if not isinstance(value, str) or not _PRIORITY_RE.fullmatch(value):
        raise InvalidName(
            f"invalid priority {_shown(value)}: use 1-32 lowercase letters, digits or _, "
            f"starting with a letter"
        )
    return value


@dataclass(frozen=True, slots=True)
class Scope:
    """A parsed scope. ``tenant`` is ``"*"`` for the default that applies to every tenant.

    ``priority:<p>`` is one bucket for all work of priority ``<p>``, across every tenant
    and queue (a ceiling on ``low``, say, whatever its weight in the fair scheduler).
    """

    kind: ScopeKind
    tenant: str | None = None
    queue: str | None = None
    priority: str | None = None

    @classmethod
    def parse(cls, text: object) -> Scope:
        """Parse a scope string.

        >>> Scope.parse("tenant:acme:queue:emails")
        Scope(kind='tenant_queue', tenant='acme', queue='emails')

        Raises:
            InvalidScope: the text names no known scope.
            InvalidName: a tenant or queue name inside it is malformed.
        """
        if not isinstance(text, str):
            raise InvalidScope(f"a scope must be a string, got {type(text).__name__}")
        parts = text.split(":")
        if parts == ["global"]:
            return cls("global")
        if len(parts) == 2 and parts[0] == "queue":
            return cls("queue", queue=check_name("queue", parts[1]))
        if len(parts) == 2 and parts[0] == "priority":
            return cls("priority", priority=check_priority(parts[1]))
        if len(parts) in (2, 4) and parts[0] == "tenant":
            tenant = parts[1] if parts[1] == ANY_TENANT else check_name("tenant", parts[1])
            if len(parts) == 2:
                return cls("tenant", tenant=tenant)
            if parts[2] == "queue":
                return cls("tenant_queue", tenant=tenant, queue=check_name("queue", parts[3]))
        raise InvalidScope(
            f"unknown scope {_shown(text)}: expected 'global', 'queue:<q>', 'tenant:<t>', "
            f"'tenant:<t>:queue:<q>', 'priority:<p>' (use '*' for <t> to set every tenant's "
            f"default)"
        )

    @property
    def is_default(self) -> bool:
        """True for ``tenant:*`` and ``tenant:*:queue:<q>``, the per-tenant defaults."""
        return self.tenant == ANY_TENANT

    @property
    def default(self) -> Scope | None:
        """The per-tenant default a tenant scope falls back to (``tenant:*`` or
        ``tenant:*:queue:<q>``; a default is its own), None for queue and global scopes."""
        if self.kind == "tenant":
            return Scope("tenant", tenant=ANY_TENANT)
        if self.kind == "tenant_queue":
            return Scope("tenant_queue", tenant=ANY_TENANT, queue=self.queue)
        return None

    def limit_source(self, configured: Container[str], exempt: str | None = None) -> str | None:
        """The configured scope whose limit this scope's bucket follows: its own, else its
        tenant default; None when neither is in ``configured``, or when the tenant's
        exemption (``exempt``: ``"tenant"`` lifts tenant scopes, ``"all"`` every scope)
        lifts it. The rule ``build_plan`` in lua/buckets.lua applies to each decision;
        this is its one Python version (metrics, previews, the dashboard).

        >>> Scope.parse("tenant:acme:queue:emails").limit_source({"tenant:*:queue:emails"})
        'tenant:*:queue:emails'
        """
        default = self.default
        if exempt == "all" or (exempt is not None and default is not None):
            return None
        for candidate in (str(self), str(default) if default is not None else None):
            if candidate is not None and candidate in configured:
                return candidate
        return None

    def __str__(self) -> str:
        if self.kind == "global":
            return "global"
        if self.kind == "queue":
            return f"queue:{self.queue}"
        if self.kind == "priority":
            return f"priority:{self.priority}"
        if self.kind == "tenant":
            return f"tenant:{self.tenant}"
        return f"tenant:{self.tenant}:queue:{self.queue}"


def scope_name(scope: str | Scope) -> str:
    """Validate a scope given as text or ``Scope`` and return its canonical string."""
    return str(scope if isinstance(scope, Scope) else Scope.parse(scope))
