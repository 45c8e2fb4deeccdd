"""Where a task's tenant, priority and cost come from, and how they travel in headers."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from .._errors import RateLimitError
from .._job_options import read_rate_options
from ._settings import CelerySettings

# apply_async / signature options; unknown options would travel as message *properties*,
# which RabbitMQ drops and retry() loses, so the publish hook moves them into headers.
OPTION_TENANT, OPTION_PRIORITY, OPTION_COST = "rate_tenant", "rate_priority", "rate_cost"
OPTIONS = (OPTION_TENANT, OPTION_PRIORITY, OPTION_COST)
HEADER_TENANT, HEADER_PRIORITY, HEADER_COST = "qrl_tenant", "qrl_priority", "qrl_cost"
HEADER_HINT = "qrl_hint"
# A nonce per publish: tells a broker redelivery (same nonce) from a new message that
# reuses a task id (Task.replace gives the replacement the replaced task's id).
HEADER_NONCE = "qrl_nonce"
# Set on a task handed back by pause_and_retry: the gate parks it at the head of its class.
HEADER_FRONT = "qrl_front"
# Tasks with this attribute set to False are never gated (the metrics task, for one).
GATE_ATTRIBUTE = "rate_gate"


@dataclass(frozen=True, slots=True)
class RateOptions:
    tenant: str
    priority: str
    cost: float

    def headers(self) -> dict[str, Any]:
        return {HEADER_TENANT: self.tenant, HEADER_PRIORITY: self.priority, HEADER_COST: self.cost}


def _parent_headers() -> Mapping[str, Any]:
    """Rate headers of the task running in this process, if any: work a task publishes
    (retries, children, chain continuations) belongs to the same tenant by default."""
    from celery import current_task

    # current_task is a proxy: it is falsy, not None, outside a task.
    if not current_task or getattr(current_task.request, "called_directly", True):
        return {}
    request = current_task.request
    found = {h: getattr(request, h, None) for h in (HEADER_TENANT, HEADER_PRIORITY, HEADER_COST)}
    try:
        read_rate_options(*found.values())
    except RateLimitError:
        # Malformed headers from a producer without the plugin: the gate ran the task with
        # the defaults (and said so), and its children get them too rather than an error.
        return {}
    return {k: v for k, v in found.items() if v is not None}


def resolve(
    settings: CelerySettings,
    task: Any,
    explicit: Mapping[str, Any],
    headers: Mapping[str, Any] | None = None,
) -> RateOptions:
    """Options in order of precedence: given on the call, already in the message headers,
    inherited from the running task, defaults on the task decorator, the app's defaults.

    Raises:
        InvalidName / InvalidCost: a malformed tenant, priority or cost.
    """
    headers = headers or {}
    parent = _parent_headers()

    def pick(option: str, header: str, default: Any) -> Any:
        for value in (
            explicit.get(option),
            headers.get(header),
            parent.get(header),
            getattr(task, option, None),
        ):
            if value is not None:
                return value
        return default

    tenant = pick(OPTION_TENANT, HEADER_TENANT, settings.default_tenant)
    priority = pick(OPTION_PRIORITY, HEADER_PRIORITY, settings.default_priority)
    cost = pick(OPTION_COST, HEADER_COST, 1)
    return RateOptions(*read_rate_options(tenant, priority, cost))


def pop_options(options: MutableMapping[str, Any]) -> dict[str, Any]:
    """Take the rate options out of an options mapping (they must not reach the broker)."""
    return {name: options.pop(name) for name in OPTIONS if name in options}


def gated(task: Any) -> bool:
    """Whether the gate applies to this task (True unless it opted out)."""
    return getattr(task, GATE_ATTRIBUTE, True) is not False


def running_options(request: Any, settings: CelerySettings) -> RateOptions:
    """The rate options the gate judged a running task's message by: its headers as
    ``HeaderOptions`` reads them, and every default when one of them is malformed (as the
    gate does). What a task pauses or looks up must be what the gate decided under: a
    tenant header the gate could not use (``"a:queue:b"``, a list) ran the task as the
    default tenant, and pausing the header's text instead would never hold it back."""
    headers = getattr(request, "headers", None) or {}
    found = []
    for header in (HEADER_TENANT, HEADER_PRIORITY, HEADER_COST):
        value = getattr(request, header, None)
        found.append(headers.get(header) if value is None else value)
    defaults = {
        "default_tenant": settings.default_tenant,
        "default_priority": settings.default_priority,
    }
    try:
        return RateOptions(*read_rate_options(*found, **defaults))
    except RateLimitError:
        return RateOptions(*read_rate_options(None, None, None, **defaults))


_PLAIN = (str, int, float, type(None))


class HeaderOptions:
    """Rate options of arriving messages, read from their headers (the worker's hot path).

    Headers carry what the publish hook resolved, so the worker needs no precedence rules;
    validated combinations are remembered (a few per tenant) to keep each message cheap.
    """

    MEMO_SIZE = 10_000

    def __init__(self, settings: CelerySettings) -> None:
        self.settings = settings
        self._memo: dict[tuple[Any, Any, Any], RateOptions] = {}

    def __call__(self, headers: Mapping[str, Any]) -> RateOptions:
        """Raises InvalidName / InvalidCost for malformed values in the headers (and no
        other exception, whatever they hold)."""
        tenant, priority, cost = raw = (
            headers.get(HEADER_TENANT),
            headers.get(HEADER_PRIORITY),
            headers.get(HEADER_COST),
        )
        # Only plain values are remembered: some other producer may send lists and dicts
        # (unhashable) or, with pickle, objects whose hash or == raise.
        memo = type(tenant) in _PLAIN and type(priority) in _PLAIN and type(cost) in _PLAIN
        found = self._memo.get(raw) if memo else None
        if found is None:
            found = RateOptions(
                *read_rate_options(
                    tenant,
                    priority,
                    cost,
                    default_tenant=self.settings.default_tenant,
                    default_priority=self.settings.default_priority,
                )
            )
            if memo:
                if len(self._memo) >= self.MEMO_SIZE:
                    self._memo.clear()
                self._memo[raw] = found
        return found
