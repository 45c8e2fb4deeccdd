"""The README's examples run, unchanged but for the server URL and namespace.

Every ```python block runs as written: the only edits are the Redis URL
(``redis://localhost:6379/0`` becomes this run's server) and the namespace ``"readme"``
(a fresh one per block). A block may use no name it does not define or import: nothing is
provided to it. Every ```toml block is a configuration file that loads and seeds Redis.
The layout table names every module of the package.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import drop_namespace

from queue_ratelimit import Decision, Limit, Limiter, ScopeLimit, load_config_file

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
URL = "redis://localhost:6379/0"


Run = Callable[[str], dict[str, Any]]


def blocks(language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [str(b) for b in re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)]


def python_blocks() -> list[str]:
    return blocks("python")


@pytest.fixture
def run_block(redis_url: str, redis_client: redis.Redis) -> Iterator[Run]:
    """Runs a block as written, against this run's server, in a namespace of its own; the
    namespace's keys (and a Celery broker's queue) are deleted afterwards."""
    namespaces: list[str] = []

    def run(code: str) -> dict[str, object]:
        assert URL in code, "a block names its Redis as redis://localhost:6379/0"
        assert "Redis()" not in code, "a block names its Redis by URL, so it can be pointed"
        namespace = f"readme-{uuid.uuid4().hex[:8]}"
        namespaces.append(namespace)
        code = code.replace(URL, redis_url).replace('"readme"', f'"{namespace}"')
        scope: dict[str, object] = {"__name__": f"readme_block_{len(namespaces)}"}
        exec(compile(code, str(README), "exec"), scope)
        return scope

    yield run
    for namespace in namespaces:
        drop_namespace(redis_client, namespace)
    redis_client.delete("celery", "_kombu.binding.celery")


def test_the_readme_has_the_blocks_it_should() -> None:
    kinds = [
        next(n for n in ("FairScheduler", "Celery(", "rq import", "Limiter.from_url") if n in b)
        for b in python_blocks()
    ]
    assert sorted(kinds) == sorted(["Limiter.from_url", "FairScheduler", "Celery(", "rq import"])
    assert len(blocks("toml")) == 1


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_every_python_block_runs_as_written(run_block: Run, index: int) -> None:
    """#12: the RQ block failed with NameError: send_email."""
    scope = run_block(python_blocks()[index])
    for limiter in (v for v in scope.values() if isinstance(v, Limiter)):
        limiter.close()


def test_the_python_api_block_does_what_it_says(run_block: Run) -> None:
    code = next(b for b in python_blocks() if "Limiter.from_url" in b and "acquire" in b)
    scope = run_block(code)
    limiter = scope["limiter"]
    decision = scope["decision"]
    assert isinstance(limiter, Limiter)
    assert isinstance(decision, Decision)
    try:
        # What the example promises: an admitted job under four limits, one of them shadow.
        assert decision.allowed
        assert set(decision.remaining) == {"tenant:acme:queue:emails", "tenant:acme", "global"}
        assert limiter.limits() == {
            "global": ScopeLimit("global", Limit(1000)),
            "tenant:*": ScopeLimit("tenant:*", Limit(50, burst=100)),
            "tenant:acme": ScopeLimit("tenant:acme", Limit(6000, per=60)),
            "tenant:acme:queue:emails": ScopeLimit(
                "tenant:acme:queue:emails", Limit(5), shadow=True
            ),
        }
        # The refund at the end gave the token back.
        remaining = limiter.peek("acme", queue="emails").remaining["tenant:acme"]
        assert remaining == pytest.approx(6000, abs=1)
    finally:
        limiter.close()


def test_the_rq_block_enqueues_with_its_options(run_block: Run) -> None:
    scope = run_block(next(b for b in python_blocks() if "rq import" in b))
    job = scope["job"]
    assert job.func_name == "tasks.send_email"
    assert job.meta == {"rate_tenant": "acme", "rate_priority": "high"}


def test_the_configuration_file_loads_and_seeds(tmp_path: Path, limiter: Limiter) -> None:
    """#12: the README showed no configuration file."""
    path = tmp_path / "limits.toml"
    path.write_text(blocks("toml")[0], encoding="utf-8")
    spec = load_config_file(path)
    assert spec.limits["tenant:*"] == (Limit(50, burst=100), False)
    assert spec.limits["tenant:acme:queue:emails"] == (Limit(5), True)
    assert spec.limits["tenant:quiet"] == (Limit(10, burst=10, credit=50), False)
    assert spec.limits["tenant:trial"] == ((Limit(100), Limit(10000, per=86400)), False)
    assert spec.record == 900
    written = limiter.apply_config(spec)
    assert "global" in written
    assert limiter.exemptions() == {"ops": "all", "vip": "tenant"}
    assert limiter.concurrency() == {"queue:reports": 10, "tenant:*": 4}
    assert limiter.recording() == 900


def test_the_layout_names_every_module() -> None:
    """#12: the layout table missed modules."""
    text = README.read_text(encoding="utf-8")
    layout = text[text.index("## Layout") :]
    package = ROOT / "queue_ratelimit"
    for path in sorted(package.rglob("*.py")):
        module = path.relative_to(package).with_suffix("").as_posix()
        if module.endswith("/__init__"):
            continue  # the package rows name them
        assert f"| `{module}` |" in layout, f"{module} is missing from the README's layout"


def test_the_examples_share_a_namespace_and_say_how_to_watch_it() -> None:
    """#12: the examples used "example", "default" and "demo": a plain `top` showed nothing
    for the Celery one."""
    for path in ("examples/celery_app/proj.py", "examples/rq_app/enqueue.py"):
        text = (ROOT / path).read_text(encoding="utf-8")
        assert 'os.environ.get("QUEUE_RATELIMIT_NAMESPACE", "example")' in text, path
        assert "queue-ratelimit --namespace example top" in text, path


def test_the_rq_example_runs_in_its_namespace(redis_url: str, redis_client: redis.Redis) -> None:
    folder = ROOT / "examples" / "rq_app"
    env = {**os.environ, "REDIS_URL": redis_url}
    env.pop("QUEUE_RATELIMIT_NAMESPACE", None)
    run = subprocess.run(
        [sys.executable, "enqueue.py"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    try:
        assert "watch it: queue-ratelimit --namespace example top" in run.stdout
        assert "run them: queue-ratelimit --namespace example rq worker emails" in run.stdout
        example = Limiter.from_url(redis_url, namespace="example")
        assert example.get_limit("tenant:bigco").limit == Limit(25)
        example.close()
    finally:
        keys = [*redis_client.scan_iter(match="qrl:{example}:*"), *redis_client.scan_iter("rq:*")]
        if keys:
            redis_client.delete(*keys)
