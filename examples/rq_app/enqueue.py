"""Enqueue a burst of jobs for three tenants through the rate-limited queue.

python enqueue.py                      # then: queue-ratelimit rq worker emails --burst
"""

from __future__ import annotations

import os

import redis
from tasks import send_email

from queue_ratelimit import Limiter
from queue_ratelimit.rq import Queue

if __name__ == "__main__":
    connection = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    limiter = Limiter(connection, namespace=os.environ.get("QUEUE_RATELIMIT_NAMESPACE", "default"))
    limiter.set_limit("global", "40/s")
    limiter.set_limit("tenant:*", "10/s")
    limiter.set_limit("tenant:bigco", "25/s")
    queue = Queue("emails", connection=connection)
    for i in range(30):
        for tenant, priority in (("acme", "high"), ("bigco", "normal"), ("tiny", "low")):
            job = queue.enqueue(
                send_email, f"user{i}@{tenant}.example", rate_tenant=tenant, rate_priority=priority
            )
    print("last job:", job.id, "hint:", job.rate_hint)
    print("on RQ's list:", queue.count, "in the fair backlog:", queue.rate_backlog)
