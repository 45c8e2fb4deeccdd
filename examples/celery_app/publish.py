"""Publish a burst of tasks for a few tenants and print the backpressure hints."""

from __future__ import annotations

from proj import NAMESPACE, send_email

from queue_ratelimit.celery import last_hint

if __name__ == "__main__":
    for i in range(30):
        for tenant, priority in (("acme", "high"), ("bigco", "normal"), ("tiny", "low")):
            send_email.apply_async(
                (f"user{i}@{tenant}.example",), rate_tenant=tenant, rate_priority=priority
            )
    print("last hint:", last_hint())
    print(f"watch it: queue-ratelimit --namespace {NAMESPACE} top")
