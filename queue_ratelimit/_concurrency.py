"""Concurrency caps: how many jobs of a scope may run at once (config ``conc:<scope>``)."""

from __future__ import annotations

import math

from ._errors import InvalidLimit
from ._scopes import _shown

CONCURRENCY_PREFIX = "conc:"
MAX_CONCURRENCY = 1_000_000


def check_concurrency(value: object) -> int:
    """A concurrency cap: a whole number of jobs in [1, MAX_CONCURRENCY], else InvalidLimit."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidLimit(f"a concurrency cap must be a whole number of jobs, got {_shown(value)}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise InvalidLimit(f"a concurrency cap must be a whole number of jobs, got {_shown(value)}")
    if not 1 <= value <= MAX_CONCURRENCY:
        raise InvalidLimit(
            f"a concurrency cap must be between 1 and {MAX_CONCURRENCY:,} jobs, got {_shown(value)}"
        )
    return int(value)
