"""Producer side: rate options into headers, backpressure hints, and publish policies."""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Task
from kombu.utils.uuid import uuid as celery_uuid
from redis.exceptions import RedisClusterException, RedisError

from .._breaker import refused
from .._errors import RateLimited, RateLimitError
from .._scheduler import Hint
from ._identity import item_id_of
from ._options import HEADER_HINT, HEADER_NONCE, RateOptions, gated, pop_options, resolve
from ._runtime import Runtime, runtime_of

log = logging.getLogger("queue_ratelimit.celery")

# The hint of the latest publish in this thread / task, for callers that want it.
_last_hint: ContextVar[Hint | None] = ContextVar("queue_ratelimit_last_hint", default=None)
# Options already resolved (and validated) by RateLimitedTask.apply_async for the publish
# under way, so the signal handler neither resolves twice nor peeks twice, and the publish
# nonce the hint counted the job under. The runtime is kept with them: the receivers of
# every installed app see every publish in the process.
_prepared: ContextVar[tuple[Runtime, RateOptions, Hint | None, str] | None] = ContextVar(
    "queue_ratelimit_prepared", default=None
)


def last_hint() -> Hint | None:
    """The backpressure hint computed for the latest task published from this context.

    >>> add.apply_async((1, 2), rate_tenant="acme")          # doctest: +SKIP
    >>> last_hint()                                          # doctest: +SKIP
    Hint(allowed=True, wait_ms=0.0, denied_by=None, backlog=0, concurrency=False)
    """
    return _last_hint.get()


def _hint(
    runtime: Runtime,
    options: RateOptions,
    queue: str,
    item_id: str | None,
    reject: bool = False,
) -> Hint | None:
    """The hint for a job about to be published; ``item_id`` (None for a job due later:
    an ETA or countdown) counts it as in transit until a worker's gate sees it."""
    if not runtime.settings.hints:
        return None
    try:
        return runtime.scheduler.hint(
            options.tenant,
            queue=queue,
            priority=options.priority,
            cost=options.cost,
            item_id=item_id,
            count="if_allowed" if reject else "always",
        )
    except (RedisError, RedisClusterException, RateLimitError) as exc:
        # Publishing never fails because advice could not be had. While Redis is known not
        # to answer the hint is refused at once (the client's breaker), and that is said
        # once, when the breaker opens.
        level = logging.DEBUG if refused(exc) else logging.WARNING
        log.log(level, "queue-ratelimit: no backpressure hint for %s: %s", options.tenant, exc)
        return None


def make_publish_handler(app: Any) -> Any:
    """The ``before_task_publish`` receiver for ``app``."""

    def on_before_task_publish(
        sender: str | None = None,
        headers: dict[str, Any] | None = None,
        properties: dict[str, Any] | None = None,
        routing_key: str | None = None,
        **_: Any,
    ) -> None:
        runtime = runtime_of(app)
        if runtime is None or headers is None or properties is None:
            return
        prepared = _prepared.get()
        if prepared is not None and prepared[0] is not runtime:
            # Another installed app is publishing (receivers are process-wide): its own
            # receiver handles the message.
            return
        task = app.tasks.get(sender) if sender else None
        explicit = pop_options(properties)
        if task is not None and not gated(task):
            return
        nonce = headers.get(HEADER_NONCE)
        if prepared is not None:
            options, hint = prepared[1], prepared[2]
            if not isinstance(nonce, str):
                nonce = prepared[3]  # the one its hint counted it under
            _prepared.set(None)
        else:
            try:
                options = resolve(runtime.settings, task, explicit, headers)
            except RateLimitError as exc:
                # A signal cannot refuse a publish: RateLimitedTask.apply_async raises this
                # error at the call site; here it can only be logged loudly.
                log.error("queue-ratelimit: %s; %s published with default options", exc, sender)
                options = resolve(runtime.settings, task, {}, {})
            if not isinstance(nonce, str):
                nonce = uuid.uuid4().hex
            due_later = bool(headers.get("eta"))
            item_id = None if due_later else item_id_of({**headers, HEADER_NONCE: nonce})
            queue = routing_key or app.conf.task_default_queue
            hint = _hint(runtime, options, queue, item_id)
        headers.update(options.headers())
        # A nonce given on the call is kept: it is how a caller republishes a copy of a
        # message on purpose (as a broker would redeliver it).
        headers[HEADER_NONCE] = nonce
        _last_hint.set(hint)
        if hint is None:
            return
        headers[HEADER_HINT] = hint.as_header()
        # A concurrency cap's wait is only the latest a slot could come back (the earliest
        # hold to run out); slots usually come back sooner, when jobs end: no countdown.
        delay = not hint.allowed and not hint.concurrency
        if runtime.settings.policy == "delay" and delay and not headers.get("eta"):
            eta = datetime.now(UTC) + timedelta(milliseconds=hint.wait_ms)
            headers["eta"] = eta.isoformat()

    return on_before_task_publish


class RateLimitedTask(Task):
    """Task base class that validates rate options at the call site and applies the
    ``reject`` policy; ``install`` makes it the app's default base when it can.

    >>> @app.task(base=RateLimitedTask, rate_tenant="internal")   # doctest: +SKIP
    ... def report(): ...
    """

    rate_tenant: str | None = None
    rate_priority: str | None = None
    rate_cost: float | None = None

    def apply_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        runtime = runtime_of(self.app)
        if runtime is None or not gated(self):
            pop_options(options)
            return super().apply_async(args, kwargs, **options)
        explicit = pop_options(options)
        rate = resolve(runtime.settings, self, explicit, options.get("headers"))
        queue = options.get("queue") or getattr(self, "queue", None)
        queue = queue if isinstance(queue, str) else self.app.conf.task_default_queue
        # The id the gate will know the message by (item_id_of), so the hint can count it
        # as in transit: the task id and the publish nonce are chosen here.
        options["task_id"] = options.get("task_id") or celery_uuid()
        given = (options.get("headers") or {}).get(HEADER_NONCE)
        nonce = given if isinstance(given, str) else uuid.uuid4().hex
        item_id = item_id_of(
            {"id": options["task_id"], "retries": options.get("retries"), HEADER_NONCE: nonce}
        )
        due_later = options.get("eta") is not None or options.get("countdown") is not None
        policy = runtime.settings.policy
        hint = _hint(runtime, rate, queue, None if due_later else item_id, policy == "reject")
        if policy == "reject" and hint is not None and not hint.allowed:
            raise RateLimited(
                f"{self.name} for tenant {rate.tenant!r} refused: {hint.binding or 'backlog'} "
                f"would admit it in {hint.wait_ms:.0f} ms",
                wait_ms=hint.wait_ms,
                denied_by=hint.denied_by,
            )
        token = _prepared.set((runtime, rate, hint, nonce))
        try:
            result = super().apply_async(args, kwargs, **options)
        finally:
            _prepared.reset(token)
        result.rate_hint = hint
        return result
