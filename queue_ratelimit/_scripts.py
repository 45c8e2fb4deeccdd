"""Loading the Lua scripts shipped in the package and registering them on a client."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

# Scripts that admit work are prefixed with this library so the bucket arithmetic exists once.
_LIBRARY = "buckets.lua"
_USES_LIBRARY = frozenset({"acquire.lua", "gate.lua", "scheduler.lua"})


def _read(name: str) -> str:
    packaged = resources.files("queue_ratelimit").joinpath("lua", name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # An editable install (or a plain checkout on sys.path) has the scripts at the top level
    # of the repository, where they are kept; wheels carry them inside the package.
    return (Path(__file__).resolve().parent.parent / "lua" / name).read_text(encoding="utf-8")


@functools.cache
def script_source(name: str) -> str:
    """The full source of a script, with the shared library prepended where it is used."""
    body = _read(name)
    if name in _USES_LIBRARY:
        return _read(_LIBRARY) + "\n" + body
    return body
