"""A Celery app with queue-ratelimit: per-tenant budgets, a global cap, fair priorities.

Run it (Redis on localhost):

    celery -A proj worker --loglevel=INFO          # in this folder
    python publish.py                              # in another terminal
    queue-ratelimit --namespace example top        # and watch it

Every example uses the namespace "example" (QUEUE_RATELIMIT_NAMESPACE changes it, for the
CLI too); the demo keeps to its own, "demo", which it clears at start.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from queue_ratelimit.celery import install

BROKER = os.environ.get(
    "CELERY_BROKER_URL", os.environ.get("REDIS_URL", "redis://localhost:6379/0")
)

NAMESPACE = os.environ.get("QUEUE_RATELIMIT_NAMESPACE", "example")

app = Celery("proj", broker=BROKER, backend=os.environ.get("CELERY_RESULT_BACKEND"))
app.conf.update(task_acks_late=os.environ.get("ACKS_LATE") == "1", worker_prefetch_multiplier=4)

install(
    app,
    redis_url=os.environ.get("QRL_REDIS_URL") or os.environ.get("REDIS_URL"),
    namespace=NAMESPACE,
    limits={
        "limits": {
            "global": "40/s",  # the cluster ceiling
            "tenant:*": {"rate": "10/s", "burst": 10},  # every tenant by default
            "tenant:bigco": "25/s",  # a premium tenant
        }
    },
)


@app.task
def send_email(to: str) -> str:
    """Pretend to send an e-mail (the point is how often this may run)."""
    time.sleep(0.01)
    return f"sent to {to}"


@app.task(rate_tenant="internal", rate_priority="low")
def nightly_report() -> str:
    """A task with default rate options on the decorator."""
    return "report"
