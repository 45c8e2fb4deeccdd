"""The short form of the soak (``make soak`` runs the long one; benchmarks/soak.py): patterned
load through real Celery and RQ workers for 45 s, then the checks that must hold at any
length. Smoothness and latency are reported by the soak, not checked here (timing)."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.soak import SoakSettings, run_soak

pytestmark = [
    pytest.mark.slow,
    pytest.mark.soak,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]

# The plan cache's budget is 8 MiB of estimated plans; the VM holds up to about twice that
# before Lua's incremental collector catches up (docs/tuning.md, "Redis").
VM_BOUND = 18 * 2**20
# What the data may differ by once every expiring key has gone: counters in hashes that
# never expire may have grown a field (the shared hash's per-queue counts).
DATASET_SLACK = 256 * 1024


def test_a_short_soak_loses_nothing_holds_every_cap_and_gives_memory_back(redis_url: str) -> None:
    report = run_soak(
        SoakSettings(seconds=45, oneoff=3_000, retention=3, drain_timeout=120, settle_timeout=60),
        redis_url,
    )
    assert report["lost"] == 0, report["lost_examples"]
    assert report["ran_twice"] == 0, report["twice_examples"]
    assert report["runs_of_unknown_jobs"] == 0
    assert report["cap_violations"] == 0, report["caps"]
    assert report["worker_log_lines"]["lines"] == 0, report["worker_log_lines"]
    memory = report["memory"]
    assert memory["peak"]["vm_functions_mib"] * 2**20 <= VM_BOUND
    start, after = memory["start"], memory["after_expiry"]
    assert (after["dataset_mib"] - start["dataset_mib"]) * 2**20 <= DATASET_SLACK, memory
    # Nothing the load made stays for good (RQ workers' receipts expire after a day).
    assert [k for k, ttl in report["new_keys"].items() if ttl is None] == [], report["new_keys"]
