"""Puts the plugin's RQ classes wherever RQ uses its own, before RQ's tests run.

Imported by ``sitecustomize`` in every Python process of the swapped run (``rq worker``
subprocesses, spawned work horses too) and loaded as a pytest plugin (``-p qrl_rq_swap``).
Every ``rq`` module is loaded, then each reference to RQ's ``Queue``, ``Worker`` or
``SimpleWorker`` becomes ``queue_ratelimit.rq``'s class: module globals (``from rq import
Queue``, ``from rq.queue import Queue``, ``from rq.worker import Worker`` in the tests;
``rq worker``'s defaults ``rq.Worker`` and ``rq.Queue``; the queues RQ makes for itself in
registries, the scheduler, dependents), class attributes (``BaseWorker.queue_class``, so
RQ's other workers use our queue too) and default argument values (``WorkerPool``'s
worker class). RQ's originals stay only as our classes' bases.

Anything less leaves RQ's code and the tests holding different classes, and the tests
that patch ``Queue`` or compare with it then fail for that reason alone.

No limit is set: the classes must behave as RQ's.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
import sys
from typing import Any

import rq
import rq.queue
import rq.worker

import queue_ratelimit.rq as ours

REPLACE = {
    rq.queue.Queue: ours.Queue,
    rq.worker.Worker: ours.Worker,
    rq.worker.SimpleWorker: ours.SimpleWorker,
}


def _load_all_rq_modules() -> None:
    for info in pkgutil.walk_packages(rq.__path__, "rq."):
        # An optional integration whose library is not installed stays unloaded.
        with contextlib.suppress(ImportError):
            importlib.import_module(info.name)


def _swap_defaults(function: Any, where: str, done: list[str]) -> None:
    """Default argument values are bound when a function is defined: replace them too."""
    defaults = getattr(function, "__defaults__", None)
    if defaults and any(isinstance(d, type) and d in REPLACE for d in defaults):
        function.__defaults__ = tuple(
            REPLACE.get(d, d) if isinstance(d, type) else d for d in defaults
        )
        done.append(f"{where} (default)")
    kwdefaults = getattr(function, "__kwdefaults__", None)
    if kwdefaults and any(isinstance(d, type) and d in REPLACE for d in kwdefaults.values()):
        function.__kwdefaults__ = {
            k: REPLACE.get(d, d) if isinstance(d, type) else d for k, d in kwdefaults.items()
        }
        done.append(f"{where} (default)")


def swap() -> list[str]:
    """Replace RQ's classes in every rq module, class and default argument value."""
    _load_all_rq_modules()
    done: list[str] = []
    for name, module in sorted(sys.modules.items()):
        if name != "rq" and not name.startswith("rq."):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, type) and value in REPLACE:
                setattr(module, attr, REPLACE[value])
                done.append(f"{name}.{attr}")
            elif inspect.isfunction(value) and value.__module__ == name:
                _swap_defaults(value, f"{name}.{attr}", done)
            elif isinstance(value, type) and value.__module__ == name:
                for cls_attr, cls_value in list(vars(value).items()):
                    where = f"{name}.{attr}.{cls_attr}"
                    if isinstance(cls_value, type) and cls_value in REPLACE:
                        setattr(value, cls_attr, REPLACE[cls_value])
                        done.append(where)
                    elif isinstance(cls_value, (classmethod, staticmethod)):
                        _swap_defaults(cls_value.__func__, where, done)
                    elif inspect.isfunction(cls_value):
                        _swap_defaults(cls_value, where, done)
    return done


SWAPPED = swap()


def pytest_report_header(config: Any) -> str:
    return f"queue-ratelimit: queue_ratelimit.rq's classes as {', '.join(SWAPPED)}"


def pytest_sessionstart(session: Any) -> None:
    # Something that imported RQ's classes again would make the run test RQ's.
    for module, name in ((rq, "Queue"), (rq.queue, "Queue"), (rq.worker, "Worker")):
        if getattr(module, name) not in REPLACE.values():
            raise RuntimeError(f"{module.__name__}.{name} is not queue_ratelimit.rq's")
