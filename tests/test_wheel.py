"""The wheel ships the Lua scripts: built, installed in a fresh venv, it decides on Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["acquire.lua", "buckets.lua", "config.lua", "hint.lua"]

PROBE = """
import json, os, sys
from importlib import resources
from pathlib import Path
import queue_ratelimit
from queue_ratelimit import Limit, Limiter

package = Path(queue_ratelimit.__file__).resolve().parent
lim = Limiter.from_url(os.environ["REDIS_URL"], namespace=sys.argv[1])
lim.set_limit("tenant:acme", Limit(1, per=3600, burst=2))
decisions = [lim.acquire("acme", queue="q") for _ in range(3)]
keys = list(lim.client.scan_iter(match=f"qrl:{{{sys.argv[1]}}}:*"))
lim.client.delete(*keys)
print(json.dumps({
    "file": str(package),
    "packaged_lua": resources.files("queue_ratelimit").joinpath("lua", "acquire.lua").is_file(),
    "checkout_lua": (package.parent / "lua").exists(),
    "allowed": [d.allowed for d in decisions],
    "denied_by": decisions[-1].denied_by,
}))
"""


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        args, capture_output=True, text=True, timeout=300, env=env, check=False, **kwargs
    )
    assert result.returncode == 0, f"{args[:4]} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.slow
def test_wheel_ships_the_scripts_and_decides(tmp_path: Path, redis_url: str) -> None:
    dist = tmp_path / "dist"
    run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)],
        cwd=ROOT,
    )
    (wheel,) = dist.glob("queue_ratelimit-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for script in SCRIPTS:
            assert f"queue_ratelimit/lua/{script}" in names
        acquire = archive.read("queue_ratelimit/lua/acquire.lua").decode()
    assert acquire.startswith("-- acquire.lua")
    assert "queue_ratelimit/py.typed" in names
    assert not any(n.startswith(("lua/", "tests/")) for n in names)

    venv = tmp_path / "venv"
    # A venv without pip of its own (installing pip into it is most of this test's time);
    # this interpreter's pip installs the wheel and its dependencies into it.
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    run([*pip, "install", "--quiet", str(wheel)])
    assert (venv / "bin" / "queue-ratelimit").exists(), "the console script is installed"

    work = tmp_path / "elsewhere"  # not the checkout: its lua/ cannot be found from here
    work.mkdir()
    namespace = f"w{uuid.uuid4().hex[:10]}"
    out = run([str(python), "-c", PROBE, namespace], cwd=work)
    report = json.loads(out.stdout)
    assert Path(report["file"]).is_relative_to(venv.resolve())
    assert report["packaged_lua"] is True
    assert report["checkout_lua"] is False
    assert report["allowed"] == [True, True, False]
    assert report["denied_by"] == "tenant:acme"
