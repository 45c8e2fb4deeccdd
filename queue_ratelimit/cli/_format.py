"""How the commands print: aligned tables, modes and whole jobs."""

from __future__ import annotations

import math

from .._decision import format_limit
from .._demo import _table

__all__ = ["_jobs", "_mode", "_table", "format_limit"]


def _mode(shadow: bool) -> str:
    return "shadow" if shadow else "enforce"


def _jobs(amount: float) -> str:
    """Work in whole jobs: the replay is a fluid model, and a job that has waited at all,
    or is partly served, counts whole (424.821 still waiting is 425 jobs)."""
    return f"{math.ceil(round(amount, 6)):,}"
