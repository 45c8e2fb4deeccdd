"""Celery's own integration tests, stock and with queue-ratelimit installed on the worker.

    .venv/bin/python tests/celery_suite/run.py          # or: make celery-suite

Fetches the sdist of the installed Celery version from PyPI (``pip download``), takes its
``t/`` folder and runs Celery's canvas and task integration tests (``t/integration/
test_canvas.py`` and ``test_tasks.py``; positional arguments choose others) once per mode,
side by side:

- ``stock``: as they are;
- ``limited``: ``queue_ratelimit.celery.install`` on the worker's app, ``tenant:*`` at
  ``--rate`` per second (burst ``--burst``): every task is in one tenant, so the limit
  binds throughout and work is parked in the fair backlog and re-admitted from it
  (``Task.replace`` reusing task ids, chords, 1,000-task groups);
- ``unlimited``: installed with no limit set (the worker still parks work while its pool
  is busy: ``fair_capacity``); it must behave as stock Celery.

It exits 1 when a test that passed stock did not pass in another mode (after one more try
of those tests: a test that passes then is reported as flaky) unless the test is in
``KNOWN``, or when a run's gate dropped a message as a duplicate (none of these tests
publishes a message twice) or the limited run parked nothing (its limit did not bind); 2
when it could not run the suites.

How Celery's tests are run: their session worker lives in the pytest process (prefork,
one child). Each run has a throwaway ``redis-server`` on a free loopback port: database 0
is the broker, 1 the result backend, 2 the limiter (``TEST_BROKER``, ``TEST_BACKEND``,
``REDIS_HOST`` and ``REDIS_PORT`` are how Celery's suite is pointed at its services).
``plugins/qrl_celery_suite.py`` installs the plugin on the worker's app, records the gate's
counters, and makes control commands (ping, inspect) return after the one worker's reply
(stock Celery waits out a 1-3 s timeout on each, twice per test) in every mode. The copied
tests are left as they are, unless ``--timeout-scale`` multiplies their fixed ``TIMEOUT``
(60 s in test_canvas.py, 10 s in test_tasks.py) in every mode: the 1,000-task groups need
1000 / rate seconds under the limit (20 s at the default 50/s; at 5/s use a scale of 4).
A larger scale also lengthens the tests that wait out a ``TIMEOUT`` on purpose. Needs
``redis-server``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
import suite_compare as shared  # noqa: E402

MODES = ("stock", "limited", "unlimited")
DEFAULT_TESTS = ["t/integration/test_canvas.py", "t/integration/test_tasks.py"]
# The fixed waits of the copied tests, scaled by --timeout-scale (file -> its line).
TIMEOUT_LINE = re.compile(r"^TIMEOUT = (\d+)$", re.MULTILINE)

# Differences we know of and have not fixed yet: reported on every run, not failing it.
# Each says why; delete an entry once the difference is gone.
# (The five test_tasks.py tests that failed after test_revoked_by_headers_complex_canvas
# left its tasks parked, where Celery's purge did not reach, were deleted once a full run
# agreed: since #11 the harness's purge reaches the backlog too.)
KNOWN: dict[str, str] = {}
KNOWN["t/integration/test_tasks.py::test_task_replacement::test_replaced_task_nesting_level_0"] = (
    "a race in the test: it sets assertion_result = False after publishing, so when the "
    "worker's task_received handler (which sets it True) runs first, the test fails. It "
    "fails stock too (1 of 3 full stock runs; under parallel load about 1 in 3); the "
    "plugin's timing makes it more frequent. Instrumented, the handler was seen to run "
    "before the assignment in the stock and the plugin runs alike."
)


@dataclass
class Run:
    mode: str
    results: Path
    stats: Path
    proc: subprocess.Popen[bytes]
    log: Any
    redis: subprocess.Popen[bytes]
    redis_dir: Path


def fetch_tests(celery_version: str, workdir: Path, timeout_scale: float) -> Path:
    """Celery's ``t/`` (its tests and their helpers) and ``pyproject.toml`` (its pytest
    settings) from its sdist, the fixed ``TIMEOUT`` of each integration test module scaled."""
    suite = shared.fetch_sdist(
        "celery",
        celery_version,
        workdir,
        lambda name: name.startswith("t/") or name == "pyproject.toml",
    )
    for module in (suite / "t" / "integration").glob("test_*.py") if timeout_scale != 1 else ():
        text = module.read_text(encoding="utf-8")
        scaled = TIMEOUT_LINE.sub(
            lambda m: f"TIMEOUT = {int(m.group(1)) * timeout_scale:g}  # scaled by celery-suite",
            text,
        )
        if scaled != text:
            module.write_text(scaled, encoding="utf-8")
    return suite


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_redis(workdir: Path, mode: str) -> tuple[subprocess.Popen[bytes], Path, int]:
    """A throwaway redis-server on a free loopback port, nothing kept on disk."""
    data = Path(tempfile.mkdtemp(prefix=f"celery-suite-{mode}-", dir=workdir))
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(data), "--logfile", str(data / "redis.log")],
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return server, data, port
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"celery-suite: redis-server did not start ({data / 'redis.log'})")
        time.sleep(0.05)  # polling a condition with a deadline, not a synchronisation


def start_run(
    mode: str, suite: Path, workdir: Path, ids: list[str], options: argparse.Namespace, tag: str
) -> Run:
    results, stats = workdir / f"{tag}.jsonl", workdir / f"{tag}.stats.json"
    results.unlink(missing_ok=True)
    stats.unlink(missing_ok=True)
    server, data, port = start_redis(workdir, tag)
    env = dict(os.environ)
    url = f"redis://127.0.0.1:{port}"
    env.update(
        TEST_BROKER=f"{url}/0",
        TEST_BACKEND=f"{url}/1",
        REDIS_HOST="127.0.0.1",
        REDIS_PORT=str(port),
        QRL_SUITE_RESULTS=str(results),
        QRL_CELERY_SUITE_STATS=str(stats),
        QRL_CELERY_SUITE_REDIS=f"{url}/2",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(HERE / "plugins"), str(shared.PLUGINS), env.get("PYTHONPATH")) if p
        ),
    )
    if mode != "stock":
        limit = {"rate": f"{options.rate:g}/s", "burst": options.burst}
        env["QRL_CELERY_SUITE_INSTALL"] = "1"
        env["QRL_CELERY_SUITE_LIMITS"] = json.dumps(
            {"tenant:*": limit} if mode == "limited" else {}
        )
    args = [sys.executable, "-m", "pytest", "-c", "pyproject.toml", "--rootdir", "."]
    args += ["-p", "no:cacheprovider", "-p", "celery.contrib.pytest", "-p", "qrl_celery_suite"]
    args += ["-p", "qrl_suite_results", "-q", "--timeout", "600"]
    args += ids or DEFAULT_TESTS
    log = (workdir / f"{tag}.log").open("w")
    proc = subprocess.Popen(
        args, cwd=suite, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return Run(mode, results, stats, proc, log, server, data)


def finish(run: Run, deadline: float) -> None:
    try:
        run.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        print(f"celery-suite: the {run.mode} run took too long and was stopped")
    stop(run)
    print(f"{run.results.stem:>18}: {shared.summary_line(run.results.with_suffix('.log'))}")


def stop(run: Run) -> None:
    """End a run: its session's process group (pytest, the worker's pool child, anything
    left behind) and its Redis."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(run.proc.pid, signal.SIGKILL)
    run.proc.wait()
    run.log.close()
    run.redis.terminate()
    run.redis.wait()
    shutil.rmtree(run.redis_dir, ignore_errors=True)


def run_modes(
    suite: Path, workdir: Path, modes: dict[str, list[str]], options: argparse.Namespace,
    suffix: str = "",
) -> dict[str, tuple[shared.Results, dict[str, Any] | None]]:  # fmt: skip
    """Run the tests in each mode side by side; each mode's results and gate counters."""
    runs: list[Run] = []
    try:
        for mode, ids in modes.items():
            runs.append(start_run(mode, suite, workdir, ids, options, f"{mode}{suffix}"))
        deadline = time.monotonic() + options.timeout
        for run in runs:
            finish(run, deadline)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM): leave nothing running
        for run in runs:
            stop(run)
        raise
    found = {}
    for run in runs:
        stats = json.loads(run.stats.read_text()) if run.stats.exists() else None
        found[run.mode] = (shared.read_results(run.results), stats)
    return found


def outer(options: argparse.Namespace) -> int:
    celery_version = options.celery_version or version("celery")
    workdir = Path(options.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if shutil.which("redis-server") is None:
        raise SystemExit("celery-suite: needs redis-server on the PATH")
    modes = [m.strip() for m in options.modes.split(",") if m.strip()]
    if "stock" not in modes or not set(modes) <= set(MODES) or len(modes) < 2:
        raise SystemExit(f"celery-suite: --modes takes stock and one or more of {MODES[1:]}")
    began = time.monotonic()
    suite = fetch_tests(celery_version, workdir, options.timeout_scale)
    print(
        f"celery-suite: Celery {celery_version}'s tests in {suite}, logs and results in "
        f"{workdir}; limited: tenant:* {options.rate:g}/s, burst {options.burst:g}"
    )
    found = run_modes(suite, workdir, dict.fromkeys(modes, options.ids), options)
    stock = found["stock"][0]
    if not stock or not all(found[m][0] for m in modes):
        print("celery-suite: a run reported no test; see the logs above")
        return 2
    failed = False
    lines = [f"stock {len(shared.passed(stock))} passed"]
    for mode in modes[1:]:
        results, stats = found[mode]

        def rerun(ids: list[str], mode: str = mode) -> shared.Results:
            return run_modes(suite, workdir, {mode: ids}, options, "-rerun")[mode][0]

        lost, known, flaky, gained = shared.compare(
            mode, stock, results, KNOWN, rerun if options.rerun else None
        )
        print(f"\n{mode}: the gate's counters: {json.dumps(stats)}")
        if stats is None or stats.get("duplicates") or (mode == "limited" and not stats["parked"]):
            print(f"{mode}: the gate dropped duplicates, parked nothing or left no counters")
            failed = True
        failed = failed or bool(lost)
        lines.append(
            f"{mode} {len(shared.passed(results))} passed ({len(lost)} passing stock fail, "
            f"{len(known)} known, {len(flaky)} flaky, {len(gained)} pass only here)"
        )
    print(
        f"\ncelery-suite: Celery {celery_version}: " + "; ".join(lines)
        + f"; {time.monotonic() - began:.0f} s"
    )  # fmt: skip
    return 1 if failed else 0


def main() -> int:
    # SIGTERM as Ctrl-C: run_modes ends the runs either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared.add_common_arguments(parser, "celery", "Celery")
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"comma-separated, stock first (default: {','.join(MODES)})",
    )
    parser.add_argument("--rate", type=float, default=50, help="tenant:* per second (limited)")
    parser.add_argument("--burst", type=float, default=5, help="its burst (limited)")
    parser.add_argument(
        "--timeout-scale",
        type=float,
        default=1,
        help="multiplies the tests' fixed TIMEOUT (raise it with a lower --rate)",
    )
    parser.add_argument("--timeout", type=float, default=2400, help="seconds for all runs")
    parser.add_argument(
        "ids", nargs="*", help=f"Celery test files or ids (default: {DEFAULT_TESTS})"
    )
    return outer(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
