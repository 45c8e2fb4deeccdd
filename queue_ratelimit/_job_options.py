"""A job's rate options as another program wrote them: Celery message headers, RQ job meta.

Those values can be anything the producer's serializer carries: lists, dicts, NaN, huge
numbers and strings from JSON or msgpack, and with pickle any object at all, including
ones whose ``repr``, ``hash`` or ``bool`` raise. Reading them must never take a worker down,
so every failure becomes the typed error the checks raise for a bad value.
"""

from __future__ import annotations

from ._core import check_cost
from ._errors import InvalidName, RateLimitError
from ._scopes import check_name, check_priority

DEFAULT_TENANT, DEFAULT_PRIORITY, DEFAULT_COST = "default", "normal", 1.0


def read_rate_options(
    tenant: object,
    priority: object,
    cost: object,
    *,
    default_tenant: str = DEFAULT_TENANT,
    default_priority: str = DEFAULT_PRIORITY,
) -> tuple[str, str, float]:
    """(tenant, priority, cost), each that is None taking its default.

    Raises:
        InvalidName / InvalidCost: a value of the wrong type or shape, and nothing else,
            whatever the value is.
    """
    try:
        return (
            # Plain str copies: a str subclass from a pickled message may override hash or
            # ==, and the names are used as dict keys further on.
            str.__str__(check_name("tenant", default_tenant if tenant is None else tenant)),
            str.__str__(check_priority(default_priority if priority is None else priority)),
            check_cost(DEFAULT_COST if cost is None else cost),
        )
    except RateLimitError:
        raise
    except Exception as exc:  # an object whose methods fail (from a pickled message)
        raise InvalidName(f"a rate option could not be read ({type(exc).__name__})") from None
