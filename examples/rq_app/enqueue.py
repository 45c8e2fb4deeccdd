"""Enqueue a burst of jobs for three tenants through the rate-limited queue.

    python enqueue.py                                        # in this folder, then:
    queue-ratelimit --namespace example rq worker emails --burst
    queue-ratelimit --namespace example top                  # and watch it

Every example uses the namespace "example" (QUEUE_RATELIMIT_NAMESPACE changes it, for the
CLI and the workers too); the demo keeps to its own, "demo", which it clears at start.
"""

from __future__ import annotations

import os

import redis
from tasks import send_email

from queue_ratelimit import Limiter
from queue_ratelimit.rq import Queue

if __name__ == "__main__":
    connection = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    namespace = os.environ.get("QUEUE_RATELIMIT_NAMESPACE", "example")
    limiter = Limiter(connection, namespace=namespace)
    limiter.set_limit("global", "40/s")
    limiter.set_limit("tenant:*", "10/s")
    limiter.set_limit("tenant:bigco", "25/s")
    queue = Queue("emails", connection=connection, rate_namespace=namespace)
    for i in range(30):
        for tenant, priority in (("acme", "high"), ("bigco", "normal"), ("tiny", "low")):
            job = queue.enqueue(
                send_email, f"user{i}@{tenant}.example", rate_tenant=tenant, rate_priority=priority
            )
    print("last job:", job.id, "hint:", job.rate_hint)
    print("on RQ's list:", queue.count, "in the fair backlog:", queue.rate_backlog)
    print(f"run them: queue-ratelimit --namespace {namespace} rq worker emails --burst")
    print(f"watch it: queue-ratelimit --namespace {namespace} top")
