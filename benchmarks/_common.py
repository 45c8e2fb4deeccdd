"""Helpers shared by the benchmark modules: settings, timing loops, Redis command statistics."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import redis

# Commands that run a server-side script. Commands a script calls are counted by Redis in
# ``INFO commandstats`` as well, and their time is already inside the script's own time, so
# only top-level commands are summed into the server time of a decision.
SCRIPT_COMMANDS = frozenset({"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"})
# Commands the benchmark itself sends around a measurement; never attributed to a library.
HARNESS_COMMANDS = frozenset({"config|resetstat", "config", "info", "flushdb", "ping"})


def log(message: str) -> None:
    """Progress for humans, on stderr (stdout carries only the JSON result)."""
    print(message, file=sys.stderr, flush=True)


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {raw!r}")
    return value


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = int(raw)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {raw!r}")
    return value


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def sig(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (for readable JSON)."""
    return float(f"{value:.{digits}g}")


@dataclass(frozen=True, slots=True)
class CommandStat:
    """Calls and total microseconds of one command name since the last ``CONFIG RESETSTAT``."""

    calls: int
    usec: int


def reset_command_stats(admin: redis.Redis) -> None:
    admin.config_resetstat()


def command_stats(admin: redis.Redis) -> dict[str, CommandStat]:
    """``INFO commandstats`` as ``{command: CommandStat}``, harness commands left out."""
    raw = cast("Mapping[str, Any]", admin.info("commandstats"))
    out = {}
    for key, value in raw.items():
        name = key.removeprefix("cmdstat_")
        if name in HARNESS_COMMANDS or not isinstance(value, Mapping):
            continue
        out[name] = CommandStat(int(value["calls"]), int(value["usec"]))
    return out


@dataclass(frozen=True, slots=True)
class Sample:
    """One timed run of a decision function."""

    decisions: int
    seconds: float
    allowed: int
    stats: dict[str, CommandStat] = field(default_factory=dict)
    cpu_seconds: float = 0.0  # CPU time of the calling process (user + system)

    @property
    def per_second(self) -> float:
        return self.decisions / self.seconds

    @property
    def client_us(self) -> float:
        """Wall-clock microseconds per decision as the calling process sees it."""
        return self.seconds * 1e6 / self.decisions

    @property
    def client_cpu_us(self) -> float:
        """CPU microseconds the calling process spends per decision (Python and syscalls)."""
        return self.cpu_seconds * 1e6 / self.decisions

    def server_us(self, top_level: frozenset[str] = frozenset()) -> float:
        """Server microseconds per decision: scripts plus any other top-level commands."""
        names = SCRIPT_COMMANDS | top_level
        usec = sum(s.usec for name, s in self.stats.items() if name in names)
        return usec / self.decisions

    def round_trips(self, top_level: frozenset[str] = frozenset()) -> float:
        """Top-level commands per decision (1.0 means one round trip per decision)."""
        names = SCRIPT_COMMANDS | top_level
        return sum(s.calls for name, s in self.stats.items() if name in names) / self.decisions

    def per_decision(self, exclude: frozenset[str] = frozenset()) -> dict[str, dict[str, float]]:
        """Every command seen (nested script calls included), per decision."""
        return {
            name: {
                "calls": sig(s.calls / self.decisions),
                "usec": sig(s.usec / self.decisions, 3),
            }
            for name, s in sorted(self.stats.items(), key=lambda kv: -kv[1].usec)
            if name not in exclude
        }


def merge(samples: Iterable[Sample]) -> Sample:
    """Several runs of the same thing as one (totals of decisions, time and commands)."""
    decisions = allowed = 0
    seconds = cpu_seconds = 0.0
    stats: dict[str, CommandStat] = {}
    for sample in samples:
        decisions += sample.decisions
        allowed += sample.allowed
        seconds += sample.seconds
        cpu_seconds += sample.cpu_seconds
        for name, s in sample.stats.items():
            old = stats.get(name, CommandStat(0, 0))
            stats[name] = CommandStat(old.calls + s.calls, old.usec + s.usec)
    return Sample(decisions, seconds, allowed, stats, cpu_seconds)


def timed_loop(
    call: Callable[[], object],
    is_allowed: Callable[[object], bool],
    seconds: float,
    admin: redis.Redis,
    *,
    warmup: int = 200,
    batch: int = 25,
) -> Sample:
    """Call ``call`` back to back for ``seconds``, after ``warmup`` untimed calls.

    Redis command statistics are reset right before the timed part and read right after
    it, so they cover exactly the timed decisions (plus whatever background work the
    library under test does meanwhile, which is part of its cost).
    """
    for _ in range(warmup):
        call()
    reset_command_stats(admin)
    allowed = 0
    count = 0
    clock = time.perf_counter
    cpu_start = time.process_time()
    start = clock()
    deadline = start + seconds
    while True:
        for _ in range(batch):
            if is_allowed(call()):
                allowed += 1
        count += batch
        now = clock()
        if now >= deadline:
            break
    elapsed = now - start
    cpu = time.process_time() - cpu_start
    stats = command_stats(admin)
    return Sample(count, elapsed, allowed, stats, cpu)


def machine_info(admin: redis.Redis) -> dict[str, Any]:
    """Where the figures come from: CPU count, Python, redis-py and Redis server versions."""
    server = cast("Mapping[str, Any]", admin.info("server"))
    try:
        import hiredis  # type: ignore[import-not-found, unused-ignore]  # noqa: F401

        parser = "hiredis"
    except ImportError:
        parser = "python (no hiredis)"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "redis_py_parser": parser,
        "redis_server": server.get("redis_version"),
        "redis_mode": server.get("redis_mode"),
        "redis_transport": "unix" if "path" in admin.connection_pool.connection_kwargs else "tcp",
    }


def broker_url_for(redis_url: str) -> str:
    """The next database of the same Redis server, for a Celery broker beside the limiter."""
    parts = urlsplit(redis_url)
    path = parts.path.strip("/")
    db = int(path) if path.isdigit() else 0
    return urlunsplit(parts._replace(path=f"/{(db + 1) % 16}"))
