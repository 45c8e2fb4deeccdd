"""What the runs of another project's own test suite share (tests/rq_suite, tests/celery_suite):
fetching the tests from the installed version's sdist, reading each run's results (written
by ``suite_plugins/qrl_suite_results.py``), and comparing a run with the stock one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterable
from pathlib import Path

Results = dict[str, tuple[str, str]]  # test id -> (outcome, detail)
PLUGINS = Path(__file__).resolve().parent / "suite_plugins"


def fetch_sdist(project: str, version: str, workdir: Path, wanted: Callable[[str], bool]) -> Path:
    """The files of ``project==version``'s sdist whose path (inside the sdist) ``wanted``
    accepts, in ``workdir/<project>-<version>``; the sdist is downloaded once (``pip
    download``) and kept in ``workdir/sdist``."""
    cache = workdir / "sdist"
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"{project}-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
             "--no-deps", f"{project}=={version}", "-d", str(cache)],
            check=True,
        )  # fmt: skip
    suite = workdir / f"{project}-{version}"
    shutil.rmtree(suite, ignore_errors=True)
    suite.mkdir()
    top = f"{project}-{version}/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(top)]
        for m in members:
            m.name = m.name[len(top) :]
        members = [m for m in members if m.name and wanted(m.name)]
        tar.extractall(suite, members=members, filter="data")
    return suite


def read_results(path: Path) -> Results:
    """Test id -> (outcome, detail); a test that failed anywhere counts as failed."""
    found: Results = {}
    if not path.exists():
        return found
    rank = {"skipped": 0, "passed": 1, "failed": 2}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        seen = found.get(row["id"])
        if seen is None or rank[row["outcome"]] > rank[seen[0]]:
            found[row["id"]] = (row["outcome"], row["detail"])
    return found


def summary_line(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def passed(results: Results) -> set[str]:
    return {i for i, (outcome, _) in results.items() if outcome == "passed"}


def compare(
    name: str,
    stock: Results,
    other: Results,
    known: dict[str, str],
    rerun: Callable[[list[str]], Results] | None,
) -> tuple[list[str], list[str], list[str], list[str]]:
    """Print how a run differs from the stock one; returns the ids that passed stock and
    not in ``other`` (lost), the KNOWN ones among them, the flaky ones (passed when
    ``rerun``), and those that passed only in ``other``."""
    lost = sorted(passed(stock) - passed(other))
    known_lost = [i for i in lost if i in known]
    lost = [i for i in lost if i not in known]
    flaky: list[str] = []
    again: Results = {}
    if (lost or known_lost) and rerun is not None:
        again = rerun(lost + known_lost)
        flaky = sorted(i for i in lost if again.get(i, ("",))[0] == "passed")
        lost = [i for i in lost if i not in flaky]
    gained = sorted(passed(other) - passed(stock))
    sections: Iterable[tuple[str, list[str], Results]] = (
        (f"passed stock, FAILED {name} (a difference)", lost, other),
        (f"passed stock, failed {name} once, passed {name} again (flaky)", flaky, other),
        (f"failed stock, passed {name} (flaky or environmental in the suite)", gained, stock),
    )
    for title, ids, where in sections:
        if ids:
            print(f"\n{title}:")
            for i in ids:
                outcome, detail = where.get(i, ("not run", ""))
                print(f"  {i}: {outcome} {detail}".rstrip())
    if known_lost:
        print(f"\npassed stock, failed {name}, a KNOWN DIFFERENCE (KNOWN in run.py):")
        for i in known_lost:
            alone = {"passed": "; passes run again alone"}.get(again.get(i, ("",))[0], "")
            print(f"  {i}: {other[i][1]}{alone}\n    {known[i]}")
    failed_both = sorted(
        i for i in stock if stock[i][0] == "failed" and other.get(i, ("",))[0] == "failed"
    )
    if failed_both:
        print(f"\nfailed stock and {name} ({len(failed_both)}): " + ", ".join(failed_both))
    return lost, known_lost, flaky, gained


def add_common_arguments(parser: argparse.ArgumentParser, project: str, label: str) -> None:
    """--workdir (default ``.<project>-suite`` in the repository), --<project>-version and
    --no-rerun, for a runner of ``project``'s suite (``label``: its name in prose)."""
    workdir = f".{project}-suite"
    parser.add_argument(
        "--workdir",
        default=str(Path(__file__).resolve().parent.parent / workdir),
        help=f"sdist cache, {label}'s tests, logs and results (default: {workdir})",
    )
    parser.add_argument(f"--{project}-version", help=f"default: the installed {label}'s")
    parser.add_argument(
        "--no-rerun",
        dest="rerun",
        action="store_false",
        help="no second try of the tests that failed only with the plugin",
    )
