"""A pause reaches work a worker admitted before it: each gated task looks, as it starts, in
the process that runs it, whether one of its scopes is paused, and hands itself back if so.

A Celery worker holds admissions ahead of its pool: gate credit (up to ``credit`` jobs per
worker for up to ``credit_ttl``), jobs taken on ahead of a free process (``reserve``,
prefetch), jobs in the prefork pool's own buffer. Their tokens were taken before the pause,
and none of them asks Redis again before it runs, so a pause would not stop them. A message
telling the workers (pub/sub) would reach each consumer some time after the pause call
returned, never before; the credit could be refused for pausable scopes, but every scope is.
Only a look at the pause when the task starts is always in time: it runs in the pool
process (many at once, off the consumer's thread), one pipelined round trip per task
(``HMGET`` of the task's five pause fields and ``TIME``: the pause is on Redis's clock).
A task that starts after the pause call returned sees it, and is handed back as
``pause_and_retry`` hands back the task that paused: republished with a new nonce and
marked for the head of its class in the fair backlog (where the gate parks it until the
pause ends), then ``Ignore``: no failure, no retry counted. The one that had already
started when the pause was set runs (it was running).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from .._client import queue_time
from .._errors import RateLimitError
from ._lane import running_queue
from ._options import gated, running_options
from ._runtime import runtime_of

log = logging.getLogger("queue_ratelimit.celery")

# Marks a task's run already guarded (a worker started twice in one process).
_GUARDED = "_qrl_pause_guarded"


def pause_fields(tenant: str, queue: str, priority: str) -> list[str]:
    """The config fields of the pauses that stop a job of (tenant, queue, priority), as
    lua/buckets.lua plan_pauses reads them."""
    return [
        f"pause:tenant:{tenant}",
        f"pause:tenant:{tenant}:queue:{queue}",
        f"pause:queue:{queue}",
        f"pause:priority:{priority}",
        "pause:global",
    ]


def pause_left_ms(client: Any, config_key: str, fields: list[str]) -> float:
    """Milliseconds left of the longest running pause among ``fields`` (0: none), on
    Redis's clock (one round trip)."""
    pipe = client.pipeline(transaction=False)
    pipe.hmget(config_key, fields)
    queue_time(pipe, config_key)
    ends, (seconds, micros) = pipe.execute()
    now_ms = int(seconds) * 1000 + int(micros) / 1000
    return max([0.0] + [float(end) - now_ms for end in ends if end is not None])


def guard_tasks(app: Any) -> int:
    """Make every gated task of ``app`` look for a pause of its scopes as it starts (see
    the module's text); returns how many were guarded. Called as the worker starts, before
    the pool's processes are made, so they inherit it."""
    guarded = 0
    for task in list(app.tasks.values()):
        if not gated(task) or getattr(task, _GUARDED, False):
            continue
        task.run = _guarded_run(task, task.run)
        setattr(task, _GUARDED, True)
        guarded += 1
    return guarded


def _guarded_run(task: Any, run: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(run)
    def run_unless_paused(*args: Any, **kwargs: Any) -> Any:
        if _paused(task):
            from ._pause import hand_back

            hand_back(task)
        return run(*args, **kwargs)

    return run_unless_paused


def _paused(task: Any) -> bool:
    request = task.request
    if getattr(request, "called_directly", True):
        return False
    runtime = runtime_of(task.app)
    if runtime is None:
        return False
    # (The tenant and priority the gate judged the message by: a malformed header ran it
    # as the default, and only the default's pauses hold it back.)
    options = running_options(request, runtime.settings)
    queue = running_queue(request, task.app.conf.task_default_queue)  # the gate's lane
    fields = pause_fields(options.tenant, queue, options.priority)
    try:
        limiter = runtime.limiter
        return pause_left_ms(limiter.client, limiter.keys.config, fields) > 0
    except (RedisError, RateLimitError) as exc:
        # Redis unreachable: the job was admitted; a pause it cannot see does not stop it
        # (as the gate's fail mode decides for what it cannot ask about).
        log.warning("queue-ratelimit: could not look for a pause before %s: %s", task.name, exc)
        return False
