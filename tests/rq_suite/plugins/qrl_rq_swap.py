"""Puts the plugin's RQ classes wherever RQ's own are used by name, before RQ's tests run.

Imported by ``sitecustomize`` in every Python process of the swapped run (``rq worker``
subprocesses, spawned work horses too) and loaded as a pytest plugin (``-p qrl_rq_swap``):

- every loaded ``rq`` module whose global ``Queue``, ``Worker`` or ``SimpleWorker`` is
  RQ's class gets ``queue_ratelimit.rq``'s instead: ``from rq import Queue``, ``from
  rq.worker import Worker``, ``rq worker``'s defaults (``rq.Worker``, ``rq.Queue``), and
  the queues RQ makes for itself (registries, the scheduler, dependents);
- except in the module that defines the class (``rq.queue``, ``rq.worker.worker_classes``):
  RQ's code there compares with its own class, and pickles it by that name. While pytest
  imports a test module, ``rq.queue.Queue`` is ours too, so ``from rq.queue import Queue``
  in a test gives ours.

No limit is set: the classes must behave as RQ's.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import sys
from collections.abc import Iterator
from typing import Any

import pytest
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


def swap() -> list[str]:
    """Replace RQ's classes in every rq module but their own; returns what was replaced."""
    _load_all_rq_modules()
    done = []
    for name, module in sorted(sys.modules.items()):
        if name != "rq" and not name.startswith("rq."):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, type) and value in REPLACE and value.__module__ != name:
                setattr(module, attr, REPLACE[value])
                done.append(f"{name}.{attr}")
    return done


SWAPPED = swap()


def pytest_report_header(config: Any) -> str:
    return f"queue-ratelimit: queue_ratelimit.rq's classes as {', '.join(SWAPPED)}"


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: Any) -> Iterator[None]:
    if not isinstance(collector, pytest.Module):
        return (yield)
    original = rq.queue.Queue
    rq.queue.Queue = ours.Queue
    try:
        return (yield)
    finally:
        rq.queue.Queue = original
