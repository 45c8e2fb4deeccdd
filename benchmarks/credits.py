"""Server cost of burst credits and several windows (#13), and of a decision using neither,
against the Lua of an earlier revision, in one run.

Separate runs of ``decisions`` on a shared machine differ by more than the change being
measured (the same code measured 14 and 19 server µs per decision in two runs minutes
apart), so the comparison is made within one run: the Lua library at ``QRL_BENCH_BASE`` (a
git revision, default ``main``: set it to the commit before a change) is loaded as a
Functions library of its own beside the current one, and each case calls both, in
interleaved slices, with the same keys and arguments (raw ``FCALL``: the client side is
the same for both, only the server's work differs). Each figure is the median over rounds
of server µs per decision (``INFO commandstats``); each ratio the median of per-round
ratios, current / base.

Cases: ``1bucket``, ``3bucket`` (as in ``decisions``), allowed and denied, in both versions;
then, current only, ``credit`` (``tenant:*`` with burst credits) and ``2window``
(``tenant:*`` a second and a day), allowed and denied, with their ratio to ``1bucket``.

Settings: ``QRL_BENCH_BASE``, ``QRL_BENCH_SECONDS`` (per slice, default 0.1),
``QRL_BENCH_ROUNDS`` (default 30).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from queue_ratelimit import Limit, Limiter
from queue_ratelimit._scripts import SCRIPTS

from ._common import Sample, env_float, env_int, log, machine_info, median, sig, timed_loop

HIGH = Limit(1_000_000)
TIGHT = Limit(1, per=3600.0)
HIGH_DAILY = Limit(1_000_000 * 86400.0, per=86400.0)
TIGHT_DAILY = Limit(1, per=86400.0)
ROOT = Path(__file__).resolve().parent.parent


def _base_library(rev: str) -> tuple[str, dict[str, str]]:
    """The Functions library of the Lua at ``rev`` (as _scripts.library builds it), under a
    name of its own; returns its source and the function of each script."""

    def read(name: str) -> str:
        return subprocess.run(
            ["git", "show", f"{rev}:lua/{name}"], cwd=ROOT, check=True, capture_output=True,
            text=True,
        ).stdout  # fmt: skip

    bodies = {name: read(name) for name in SCRIPTS}
    shared = read("buckets.lua")
    digest = hashlib.sha1("\0".join([shared, *bodies.values()]).encode()).hexdigest()[:12]
    lib = f"qrlbase_{digest}"
    names = {name: f"{lib}_{name.removesuffix('.lua')}" for name in SCRIPTS}
    parts = [f"#!lua name={lib}", shared]
    for name, body in bodies.items():
        parts.append(f"redis.register_function('{names[name]}', function(KEYS, ARGV)\n{body}\nend)")
    return "\n".join(parts), names


def _setup(limiter: Limiter, case: str) -> tuple[str, str | None]:
    """Configure ``case`` in the limiter's namespace; the (tenant, queue) it decides for."""
    kind, _, denied = case.partition("_")
    if kind == "1bucket":
        limiter.set_limit("tenant:*", TIGHT if denied else HIGH)
        return "acme", None
    if kind == "3bucket":
        limiter.set_limit("global", HIGH)
        limiter.set_limit("tenant:*", HIGH)
        limiter.set_limit("tenant:*:queue:emails", TIGHT if denied else HIGH)
        return "acme", "emails"
    if kind == "credit":
        base = TIGHT if denied else HIGH
        limiter.set_limit("tenant:*", Limit(base.rate, base.per, base.burst, credit=base.burst))
        return "acme", None
    limiter.set_limit("tenant:*", [HIGH, TIGHT_DAILY if denied else HIGH_DAILY])
    return "acme", None


def _caller(client: redis.Redis, limiter: Limiter, function: str, case: str) -> Callable[[], Any]:
    tenant, queue = _setup(limiter, case)
    call = limiter._core.decision_call("acquire", tenant, queue, None, 1)
    command = ("FCALL", function, len(call.keys), *call.keys, *call.args)
    for _ in range(3):  # exhaust a denied case (bucket, then bank)
        client.execute_command(*command)
    return lambda: client.execute_command(*command)


def _allowed(reply: object) -> bool:
    return isinstance(reply, bytes) and reply.startswith(b"1 ")


def beside_base(redis_url: str, rev: str, script: str) -> tuple[redis.Redis, redis.Redis, str, str]:
    """The server flushed, with the Lua at ``rev`` loaded beside the current library: an
    admin client, a client for the calls, and ``script``'s function in the base library and
    in the current one."""
    admin = redis.Redis.from_url(redis_url)
    client = redis.Redis.from_url(redis_url)
    admin.flushdb()
    source, base_names = _base_library(rev)
    admin.function_load(source, replace=True)
    current = Limiter(client, namespace="bench-current")
    current.peek("x")  # loads the current library
    return admin, client, base_names[script], current._scripts.functions[script]


def run(redis_url: str) -> dict[str, Any]:
    rev = os.environ.get("QRL_BENCH_BASE", "main")
    seconds = env_float("QRL_BENCH_SECONDS", 0.1)
    rounds = env_int("QRL_BENCH_ROUNDS", 30)
    admin, client, base_fn, current_fn = beside_base(redis_url, rev, "acquire.lua")
    calls: dict[str, Callable[[], Any]] = {}
    for case in ("1bucket", "1bucket_denied", "3bucket", "3bucket_denied"):
        base = Limiter(client, namespace=f"bench-base-{case}")
        now = Limiter(client, namespace=f"bench-now-{case}")
        calls[f"base_{case}"] = _caller(client, base, base_fn, case)
        calls[f"current_{case}"] = _caller(client, now, current_fn, case)
    for case in ("credit", "credit_denied", "2window", "2window_denied"):
        now = Limiter(client, namespace=f"bench-now-{case}")
        calls[f"current_{case}"] = _caller(client, now, current_fn, case)
    log(f"credits: {len(calls)} cases x {rounds} rounds x {seconds:g} s, base {rev}")
    samples: dict[str, list[Sample]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timed_loop(calls[name], _allowed, seconds, admin, warmup=50))
    admin.flushdb()

    def per_round(name: str) -> list[float]:
        return [s.server_us() for s in samples[name]]

    def ratio(a: str, b: str) -> float:
        return sig(median(x / y for x, y in zip(per_round(a), per_round(b), strict=True)))

    results = {
        name: {
            "server_us_per_decision": sig(median(per_round(name))),
            "allowed": all(s.allowed == s.decisions for s in samples[name]),
            "denied": all(s.allowed == 0 for s in samples[name]),
        }
        for name in names
    }
    ratios = {
        f"current/base {case}": ratio(f"current_{case}", f"base_{case}")
        for case in ("1bucket", "1bucket_denied", "3bucket", "3bucket_denied")
    }
    ratios |= {
        f"{case}/1bucket{tail}": ratio(f"current_{case}{tail}", f"current_1bucket{tail}")
        for case in ("credit", "2window")
        for tail in ("", "_denied")
    }
    for name, result in results.items():
        log(f"  {name:26} server {result['server_us_per_decision']:6.2f} us")
    for label, value in ratios.items():
        log(f"  {label:30} {value}")
    return {
        "settings": {"base": rev, "seconds_per_slice": seconds, "rounds": rounds},
        "machine": {**machine_info(admin), "loadavg_1m": round(os.getloadavg()[0], 2)},
        "cases": results,
        "ratios": ratios,
    }
