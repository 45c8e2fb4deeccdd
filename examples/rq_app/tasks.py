"""Job functions for the RQ example (workers import them by name)."""

from __future__ import annotations

import os
import time

import redis


def send_email(to: str) -> str:
    """Pretend to send an e-mail, and record when it ran (for the example's report)."""
    client = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
    seconds, micros = client.time()
    client.rpush("example:rq:ran", f"{to} {seconds + micros / 1e6:.6f}")
    time.sleep(0.005)
    return f"sent to {to}"
