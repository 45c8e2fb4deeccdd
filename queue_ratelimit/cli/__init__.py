"""The ``queue-ratelimit`` command: the demo, and runtime control of limits in Redis.

One module per command group; importing each registers its commands on :func:`main`::

    _app             the group, its options (--url, --namespace) and one-line errors
    _format          tables, modes and whole jobs as the commands print them
    _demo            demo
    _bench           bench
    _serve           serve
    _top             top
    _limits          limits: list, get, set, delete, concurrency, exempt, weight, dry-run
    _limits_history  limits: record, preview, audit
    _backlog         backlog: purge
    _shards          shards: show, set
    _rq              rq: worker, info
"""

from __future__ import annotations

from . import _backlog, _bench, _demo, _limits, _limits_history, _rq, _serve, _shards, _top
from ._app import DEFAULT_URL, Settings, main, masked
from ._format import _jobs as _jobs
from ._format import format_limit
from ._serve import is_loopback

__all__ = ["DEFAULT_URL", "Settings", "format_limit", "is_loopback", "main", "masked"]
# The modules imported for their commands (registered on main as they load).
_COMMAND_MODULES = (
    _backlog,
    _bench,
    _demo,
    _limits,
    _limits_history,
    _rq,
    _serve,
    _shards,
    _top,
)
