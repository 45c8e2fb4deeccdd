"""Guards on the public surface: ``__all__``, the exception tree, and light imports."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import queue_ratelimit
import queue_ratelimit._core

# Adding a public name is deliberate: add it here too.
EXPECTED = {
    "AsyncLimiter",
    "AuditEntry",
    "BackendError",
    "BackendUnavailable",
    "BacklogFull",
    "BucketPreview",
    "ConfigError",
    "ConfigSpec",
    "CostExceedsBurst",
    "Decision",
    "Dispatch",
    "DispatchedItem",
    "FairScheduler",
    "GateVerdict",
    "HeldBack",
    "Hint",
    "InvalidCost",
    "InvalidLimit",
    "InvalidName",
    "InvalidScope",
    "InvalidWeight",
    "KeySpace",
    "Limit",
    "LimitNotFound",
    "Limiter",
    "Pause",
    "Preview",
    "RateLimitError",
    "RateLimited",
    "Scope",
    "ScopeLimit",
    "Slot",
    "TooManyPauses",
    "config_from_env",
    "load_config_file",
    "parse_config",
}

# Optional dependencies that `import queue_ratelimit` must never pull in.
HEAVY = ["celery", "kombu", "rq", "textual", "prometheus_client", "fakeredis", "lupa", "fastapi"]


def test_all_is_sorted_and_as_expected() -> None:
    names = queue_ratelimit.__all__
    assert names == sorted(names)
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED


def test_every_public_name_exists_and_is_documented() -> None:
    for name in queue_ratelimit.__all__:
        obj = getattr(queue_ratelimit, name)
        assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


def test_every_exception_shares_one_root() -> None:
    errors = [
        getattr(queue_ratelimit, n)
        for n in queue_ratelimit.__all__
        if isinstance(getattr(queue_ratelimit, n), type)
        and issubclass(getattr(queue_ratelimit, n), BaseException)
    ]
    assert len(errors) >= 10
    for error in errors:
        assert issubclass(error, queue_ratelimit.RateLimitError), error


@pytest.mark.parametrize(
    ("error", "parent"),
    [
        ("ConfigError", ValueError),
        ("InvalidLimit", queue_ratelimit.ConfigError),
        ("InvalidName", queue_ratelimit.ConfigError),
        ("InvalidScope", queue_ratelimit.ConfigError),
        ("InvalidCost", queue_ratelimit.ConfigError),
        ("InvalidWeight", queue_ratelimit.ConfigError),
        ("BackendError", queue_ratelimit.ConfigError),
        ("LimitNotFound", KeyError),
    ],
)
def test_exception_tree(error: str, parent: type[Exception]) -> None:
    assert issubclass(getattr(queue_ratelimit, error), parent)


def test_import_does_not_pull_in_optional_dependencies() -> None:
    code = (
        "import json, sys, queue_ratelimit; "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert json.loads(out.stdout) == []


def test_version_is_a_string() -> None:
    assert isinstance(queue_ratelimit.__version__, str)
    assert queue_ratelimit.__version__.count(".") >= 1


# The I/O-free core sits below the features built on it: they import it, never the reverse.
CORE_MUST_NOT_IMPORT = {"_config", "_preview"}


def test_the_core_does_not_import_feature_modules() -> None:
    tree = ast.parse(Path(queue_ratelimit._core.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            imported.add(node.module or "")
            imported.update(alias.name for alias in node.names if not node.module)
    assert imported & CORE_MUST_NOT_IMPORT == set()
