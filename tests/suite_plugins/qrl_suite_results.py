"""Pytest plugin: writes each test's outcome to ``$QRL_SUITE_RESULTS`` as it is known.

One JSON object a line (``{"id", "outcome", "detail"}``; outcome ``passed``, ``failed``
or ``skipped``; a failure in setup or teardown, or of a subtest, fails the test), written
as the run goes, so a run that is killed still tells what it got through.

Used by the runs of RQ's and Celery's own suites (tests/rq_suite, tests/celery_suite).
At the very end it leaves with ``os._exit``: a failed test can leave a process or a thread
behind (an RQ worker pool's workers, Celery's in-process worker), which Python's exit would
wait for forever; the runner ends such leftovers.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pytest

_outcomes: dict[str, str] = {}
_exit = {"status": 0}


def _write(nodeid: str, outcome: str, detail: str = "") -> None:
    path = os.environ.get("QRL_SUITE_RESULTS")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps({"id": nodeid, "outcome": outcome, "detail": detail}) + "\n")


def pytest_runtest_logreport(report: Any) -> None:
    seen = _outcomes.get(report.nodeid)
    if report.failed:
        if seen != "failed":
            _outcomes[report.nodeid] = "failed"
            text = str(report.longrepr or "").strip().splitlines()
            _write(report.nodeid, "failed", f"{report.when}: {text[-1] if text else ''}")
    elif report.skipped and seen is None:
        _outcomes[report.nodeid] = "skipped"
        _write(report.nodeid, "skipped")
    elif report.when == "call" and report.passed and seen is None:
        _outcomes[report.nodeid] = "passed"
        _write(report.nodeid, "passed")


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    _exit["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: Any) -> None:
    if os.environ.get("QRL_SUITE_RESULTS"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit["status"])
