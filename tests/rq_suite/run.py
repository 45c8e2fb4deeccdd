"""RQ's own test suite, stock and with queue-ratelimit's classes in place of RQ's.

    .venv/bin/python tests/rq_suite/run.py          # or: make rq-suite, tox -e rq-suite

Fetches the sdist of the installed RQ version from PyPI (``pip download``), takes its
``tests/`` and runs them twice, by default side by side: once as they are ("stock") and
once with RQ's ``Queue``, ``Worker`` and ``SimpleWorker`` replaced by
``queue_ratelimit.rq``'s wherever RQ uses them ("swapped", ``plugins/qrl_rq_swap.py``),
with no limit set. It exits 1 when a test that passed stock did not pass swapped, after
one more swapped try of those tests (a test that passes then is reported as flaky), unless
the test is in ``KNOWN`` (a difference we know of, reported as such on every run); 2 when
it could not run the suites. Positional arguments choose RQ test files or ids.

RQ's tests connect to ``localhost:6379`` and flush several databases; no setting points
them elsewhere. So each run happens in Linux namespaces of its own (``unshare``): a network
namespace whose loopback holds nothing but a throwaway ``redis-server`` on 6379, and a
mount namespace with an empty tmpfs on ``/tmp`` (the tests use fixed file names there).
A PID namespace ends whatever the tests leave running. The host's Redis servers, files
and processes are never touched. Needs root or unprivileged user namespaces, ``unshare``
and ``mount`` (util-linux) and ``redis-server``.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
PLUGINS = HERE / "plugins"
sys.path.insert(0, str(HERE.parent))
import suite_compare as shared  # noqa: E402

MODES = ("stock", "swapped")

# Differences we know of and have not fixed yet: reported on every run, not failing it.
# Each says why; delete an entry once the difference is gone.
KNOWN: dict[str, str] = {}


# -- outside the namespaces --------------------------------------------------------------
def fetch_tests(rq_version: str, workdir: Path) -> Path:
    """RQ's ``tests/`` and ``pyproject.toml`` (its pytest settings) from its sdist."""
    return shared.fetch_sdist(
        "rq",
        rq_version,
        workdir,
        lambda name: name.startswith("tests/") or name == "pyproject.toml",
    )


def unshare_prefix() -> list[str]:
    """The ``unshare`` command that gives a private network and mount namespace."""
    if shutil.which("unshare") is None:
        raise SystemExit("rq-suite: needs `unshare` (util-linux)")
    # A PID namespace too: whatever RQ's tests leave running ends with the run.
    spaces = ["--net", "--mount", "--pid", "--fork", "--kill-child", "--mount-proc"]
    tries = [["unshare", *spaces], ["unshare", "--user", "--map-root-user", *spaces]]
    for prefix in tries if os.geteuid() == 0 else tries[1:]:
        if subprocess.run([*prefix, "true"], check=False, capture_output=True).returncode == 0:
            return prefix
    raise SystemExit(
        "rq-suite: cannot create network and mount namespaces here (RQ's tests need a Redis "
        "on localhost:6379 of their own); run as root or enable user namespaces"
    )


def start_run(prefix: list[str], mode: str, suite: Path, results: Path, ids: list[str]) -> Any:
    results.unlink(missing_ok=True)
    log = results.with_suffix(".log").open("w")
    args = [*prefix, sys.executable, str(Path(__file__).resolve()), "--inner", mode]
    args += ["--suite", str(suite), "--results", str(results), *ids]
    # The inner run checks that it is not in this network namespace before it listens on
    # 6379 or mounts over /tmp.
    env = {**os.environ, "QRL_RQ_SUITE_OUTER_NETNS": os.readlink("/proc/self/ns/net")}
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log


def run_modes(
    prefix: list[str], suite: Path, workdir: Path, modes: dict[str, list[str]], parallel: bool,
    timeout: float, suffix: str = "",
) -> dict[str, dict[str, tuple[str, str]]]:  # fmt: skip
    """Run the suite in each mode (given test ids, or all); returns each mode's results."""
    started = []
    for mode, ids in modes.items():
        tag = f"{mode}{suffix}"
        started.append((mode, workdir / f"{tag}.jsonl", *start_run(
            prefix, mode, suite, workdir / f"{tag}.jsonl", ids)))  # fmt: skip
        if not parallel:
            wait(started[-1], timeout)
    if parallel:
        for run in started:
            wait(run, timeout)
    return {mode: shared.read_results(results) for mode, results, _, _ in started}


def wait(run: tuple[str, Path, Any, Any], timeout: float) -> None:
    mode, results, proc, log = run
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        print(f"rq-suite: the {mode} run took over {timeout:.0f} s and was stopped")
    log.close()
    print(f"{results.stem:>14}: {shared.summary_line(results.with_suffix('.log'))}")


def outer(options: argparse.Namespace) -> int:
    rq_version = options.rq_version or version("rq")
    workdir = Path(options.workdir).resolve()
    if workdir == Path("/tmp"):
        raise SystemExit("rq-suite: --workdir must not be /tmp itself (each run mounts its own)")
    workdir.mkdir(parents=True, exist_ok=True)
    if shutil.which("redis-server") is None:
        raise SystemExit("rq-suite: needs redis-server on the PATH")
    prefix = unshare_prefix()
    began = time.monotonic()
    suite = fetch_tests(rq_version, workdir)
    print(f"rq-suite: RQ {rq_version}'s tests in {suite}, logs and results in {workdir}")
    modes = dict.fromkeys(MODES, options.ids)
    found = run_modes(prefix, suite, workdir, modes, options.parallel, options.timeout)
    stock, swapped = found["stock"], found["swapped"]
    if not stock or not swapped:
        print("rq-suite: a run reported no test; see the logs above")
        return 2

    def rerun(ids: list[str]) -> shared.Results:
        again = run_modes(
            prefix, suite, workdir, {"swapped": ids}, False, options.timeout, "-rerun"
        )
        return again["swapped"]

    lost, known, flaky, gained = shared.compare(
        "swapped", stock, swapped, KNOWN, rerun if options.rerun else None
    )
    print(
        f"\nrq-suite: RQ {rq_version}: stock {len(shared.passed(stock))} passed, swapped "
        f"{len(shared.passed(swapped))} passed; {len(lost)} passing stock fail swapped, "
        f"{len(known)} known, {len(flaky)} flaky, {len(gained)} pass only swapped; "
        f"{time.monotonic() - began:.0f} s"
    )
    return 1 if lost else 0


# -- inside the namespaces ---------------------------------------------------------------
def loopback_up() -> None:
    """``ip link set lo up`` without iproute2: a new network namespace starts with it down."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock.fileno(), siocgifflags, request))[1]
        fcntl.ioctl(sock.fileno(), siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))


def start_redis() -> subprocess.Popen[bytes]:
    """A redis-server with default settings on the namespace's own localhost:6379."""
    data = Path(tempfile.mkdtemp(prefix="rq-suite-redis-"))
    server = subprocess.Popen(
        ["redis-server", "--port", "6379", "--bind", "127.0.0.1", "--dir", str(data),
         "--logfile", str(data / "redis.log")],
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", 6379), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return server
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"rq-suite: redis-server did not start ({data / 'redis.log'})")
        time.sleep(0.05)  # polling a condition with a deadline, not a synchronisation


def private_tmp(keep: list[Path]) -> bool:
    """An empty tmpfs on ``/tmp`` (RQ's tests use fixed file names there), keeping visible
    the paths under ``/tmp`` that the run needs (a clone of this repository, its ``.venv``
    and work folder may live there): the old ``/tmp`` is bound elsewhere first, and each of
    them bound back in place. Mounts made here stay in this mount namespace."""
    tmp = Path("/tmp")
    found = sorted({p.resolve() for p in keep if tmp in p.resolve().parents})
    # Outermost only: a folder inside another one kept comes along with it.
    inside = [str(p) for p in found if not any(q in p.parents for q in found)]
    staging = Path(f"/var/tmp/qrl-rq-suite-{os.getpid()}")
    steps: list[list[str]] = []
    if inside:
        staging.mkdir(parents=True, exist_ok=True)
        steps.append(["mount", "--bind", "/tmp", str(staging)])
    steps.append(["mount", "-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/tmp"])
    for path in inside:
        steps.append(["mkdir", "-p", path])
        steps.append(["mount", "--bind", str(staging / Path(path).relative_to(tmp)), path])
    return all(subprocess.run(step, check=False).returncode == 0 for step in steps)


def inner(options: argparse.Namespace) -> int:
    outer_netns = os.environ.pop("QRL_RQ_SUITE_OUTER_NETNS", None)
    if outer_netns in (None, os.readlink("/proc/self/ns/net")):
        print("rq-suite: --inner runs only in the namespaces run.py makes for it")
        return 2
    needed = [REPO, Path(options.suite), Path(options.results).parent, Path(sys.prefix)]
    if not private_tmp(needed):
        return 2
    loopback_up()
    server = start_redis()
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["QRL_SUITE_RESULTS"] = options.results
    paths = [str(PLUGINS), str(shared.PLUGINS)]
    args = [sys.executable, "-m", "pytest", "-c", "pyproject.toml", "--rootdir", "."]
    args += ["-p", "no:cacheprovider", "-p", "no:timeout", "-p", "qrl_suite_results", "-q"]
    if options.inner == "swapped":
        paths.insert(0, str(PLUGINS / "site"))
        env["QRL_RQ_SWAP"] = "1"
        args += ["-p", "qrl_rq_swap"]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    args += options.ids or ["tests"]
    try:
        pytest = subprocess.Popen(args, cwd=options.suite, env=env)
        # This process is the PID namespace's init: it reaps every orphan while it waits.
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == pytest.pid:
                pytest.returncode = os.waitstatus_to_exitcode(status)
                return pytest.returncode
    finally:
        server.terminate()
        server.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shared.add_common_arguments(parser, "rq", "RQ")
    parser.add_argument(
        "--sequential",
        dest="parallel",
        action="store_false",
        help="run stock, then swapped (default: side by side)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run")
    parser.add_argument("--inner", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--suite", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("ids", nargs="*", help="RQ test files or ids (default: all of tests/)")
    options = parser.parse_args()
    return inner(options) if options.inner else outer(options)


if __name__ == "__main__":
    sys.exit(main())
