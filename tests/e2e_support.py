"""What the Celery and RQ end-to-end tests share: worker processes and the cap check."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

LOG_TAIL_LINES = 80
# Executions are stamped when the job starts, a few ms after the gate admitted it (the
# worker hands it to its pool or saves its state first). Admissions in a window of T can
# therefore show up spread over T plus this much.
HANDOFF = 0.1


@dataclass
class GroupProcess:
    """A worker process in a process group of its own (its children in it too)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the process and everything in its group, at once."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"(no log: {exc})"
        return "\n".join(text[-lines:])


def max_in_window(times: list[float], window: float) -> int:
    """The largest number of ``times`` inside any closed interval of length ``window``."""
    ordered = sorted(times)
    best, lo = 0, 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


def assert_cap(times: list[float], rate: float, burst: float, what: str) -> None:
    """At most ``rate * T + burst`` executions in any window of T (several T checked)."""
    span = max(times) - min(times)
    for window in (0.25, 0.5, 1.0, 2.0, span):
        most = max_in_window(times, window)
        bound = rate * (window + HANDOFF) + burst
        assert most <= bound, f"{what}: {most} runs within {window:.2f}s > {bound:.1f}"


class _LogsOnFailure:
    """A pytest plugin that attaches the worker logs of a failed test's environment (the
    fixture ``fixture``, an object with ``workers`` and ``logs()``) to its report."""

    def __init__(self, fixture: str, title: str) -> None:
        self.fixture, self.title = fixture, title

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Iterator[Any]:
        report = yield
        env = getattr(item, "funcargs", {}).get(self.fixture)
        if report.failed and getattr(env, "workers", None):
            report.sections.append((self.title, env.logs()))
        return report


def report_logs_on_failure(config: pytest.Config, fixture: str, title: str) -> None:
    """Register (once per session) the plugin that shows ``fixture``'s worker logs when a
    test fails."""
    name = f"queue-ratelimit-logs-{fixture}"
    if not config.pluginmanager.has_plugin(name):
        config.pluginmanager.register(_LogsOnFailure(fixture, title), name)
