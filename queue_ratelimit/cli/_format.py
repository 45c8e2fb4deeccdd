"""How the commands print: aligned tables, modes and whole jobs."""

from __future__ import annotations

import math

from .._decision import format_limit
from .._demo import _table

__all__ = ["_cell", "_jobs", "_mode", "_table", "format_limit"]

# The longest name a table cell shows (the JSON forms keep whole names).
_MAX_CELL = 100


def _mode(shadow: bool) -> str:
    return "shadow" if shadow else "enforce"


def _jobs(amount: float) -> str:
    """Work in whole jobs: the replay is a fluid model, and a job that has waited at all,
    or is partly served, counts whole (424.821 still waiting is 425 jobs)."""
    return f"{math.ceil(round(amount, 6)):,}"


def _cell(name: str) -> str:
    """A name we did not check (RQ's queue names: anyone writing to Redis adds one) as a
    table cell: control characters escaped, so that a name cannot move the cursor, clear
    the screen or break a row in the operator's terminal; cut short past ``_MAX_CELL``."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in name)
    if len(shown) > _MAX_CELL:
        return f"{shown[:_MAX_CELL]}... ({len(name)} characters)"
    return shown
