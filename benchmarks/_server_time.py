"""Server time per ``acquire`` on a saturated server: the decisions of
``benchmarks._instructions``, pipelined, timed instead of counted.

    python -m benchmarks._server_time [--calls N] [--rounds N]

Not part of ``python -m benchmarks`` (its name starts with ``_``). Needs ``redis-server`` on
PATH: it starts its own on a free loopback port (nothing else runs on it). Each round sends,
for every case in turn, ``--calls`` calls in one pipeline, so the server works back to back
as it does at capacity (``benchmarks decisions`` makes one call at a time, and its server's
caches go cold between them), and reads two figures per call: ``cmd_us``, the command's own
time (``INFO commandstats``: the function or script, with its ``redis.call``s, not the
reading of the request), and ``cpu_us``, the server's whole CPU time (``INFO cpu``: the
request read and parsed too, at the kernel's accounting granularity). Figures are medians
over the rounds; each ratio is the median of the per-round ratios to the peer (``limits``'
sliding window counter ``hit``, issue #14's yardstick). Prints JSON on stdout.

Instructions (``benchmarks._instructions``) stay the measure the targets are held to: the
same on every run. This tool says what the same calls take in time, where a shared
machine's noise moves each figure by a few percent.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from statistics import median
from typing import Any

import redis

from ._instructions import (
    _decision_limiter,
    _free_port,
    peer_evalsha,
    wait_until_up,
    warm_fcall,
)

# (name, buckets, drained) of the allowed decisions timed, as _instructions names them.
CASES = (
    ("1bucket", 1, False),
    ("3bucket", 3, False),
    ("1bucket_drained", 1, True),
    ("3bucket_drained", 3, True),
)
PEER = "limits_sliding_window_counter"


class TimedServer:
    """A private redis-server whose ``count`` is the time the server spent on a run."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        self.client = redis.Redis(port=self.port)
        wait_until_up(self.client, self.process, 30, "redis-server")
        self.cpu_us = 0.0  # the server's CPU time over the last count

    def _cpu(self) -> float:
        info: dict[str, Any] = self.client.info("cpu")  # type: ignore[assignment]
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def count(self, run: Callable[[], object]) -> float:
        """Microseconds of ``fcall`` and ``evalsha`` (the top-level commands) during ``run``;
        the server's CPU microseconds in ``cpu_us``."""
        self.client.config_resetstat()
        before = self._cpu()
        run()
        self.cpu_us = (self._cpu() - before) * 1e6
        stats: dict[str, Any] = self.client.info("commandstats")  # type: ignore[assignment]
        return float(
            sum(stats.get(f"cmdstat_{c}", {}).get("usec", 0) for c in ("fcall", "evalsha"))
        )

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=20000, help="calls per slice (20000)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (7)")
    options = parser.parse_args()
    calls = options.calls
    server = TimedServer()
    samples: dict[str, dict[str, list[float]]] = {}
    try:
        # Each case set up once; then every round times one pipeline of each, in turn.
        commands: dict[str, tuple[Any, ...]] = {}
        for name, buckets, drained in CASES:
            limiter, queue = _decision_limiter(server.client, buckets, False, False, drained)
            commands[name] = warm_fcall(limiter, queue, None)
        sha, keys, args = peer_evalsha(server.port)
        commands[PEER] = ("EVALSHA", sha, len(keys), *keys, *args)
        for _ in range(options.rounds):
            for name, command in commands.items():
                pipe = server.client.pipeline(transaction=False)
                for _ in range(calls):
                    pipe.execute_command(*command)
                cmd_us = server.count(pipe.execute) / calls
                slot = samples.setdefault(name, {"cmd_us": [], "cpu_us": []})
                slot["cmd_us"].append(cmd_us)
                slot["cpu_us"].append(server.cpu_us / calls)
    finally:
        server.close()
    result: dict[str, Any] = {"calls": calls, "rounds": options.rounds}
    for name, figures in samples.items():
        row: dict[str, float] = {}
        for figure, values in figures.items():
            row[figure] = round(median(values), 3)
            per_round = [v / p for v, p in zip(values, samples[PEER][figure], strict=True)]
            row[f"{figure}_vs_peer"] = round(median(per_round), 3)
        result[name] = row
        print(
            f"{name:32s} {row['cmd_us']:7.3f} µs ({row['cmd_us_vs_peer']:.3f} x peer), "
            f"CPU {row['cpu_us']:7.3f} µs ({row['cpu_us_vs_peer']:.3f} x)",
            file=sys.stderr,
        )
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
