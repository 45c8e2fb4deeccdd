"""The fairness benchmark's plot: admitted rate per class over time, one panel per scenario."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .fairness import BIN_S, WARMUP_S, ScenarioRun, _series


def plot_runs(runs: dict[str, ScenarioRun], scale: dict[str, Any], path: Path) -> None:
    """Admitted rate per class over time, one panel per scenario, and the scale bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(13, 12), constrained_layout=True)
    panels = list(axes.flat)

    def x_axis(values: Sequence[float], bin_s: float = BIN_S) -> list[float]:
        return [(i + 0.5) * bin_s for i in range(len(values))]

    def draw(ax: Any, run: ScenarioRun, key: Callable[[str, str], str | None]) -> None:
        for name, values in sorted(_series(run, key).items()):
            ax.plot(x_axis(values), values, label=name)
        frame(ax, run)

    def frame(ax: Any, run: ScenarioRun) -> None:
        ax.axvspan(WARMUP_S, WARMUP_S + run.scenario.seconds, color="0.93", zorder=0)
        ax.set_title(run.scenario.title, fontsize=10)
        ax.set_xlabel("seconds (grey: measured window)")
        ax.set_ylabel("admitted per second (cost)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)

    if "priority" in runs:
        ax = panels[0]
        draw(ax, runs["priority"], lambda t, p: p)
        g = runs["priority"].scenario.limits["global"][0]
        ax.axhline(g * 3 / 4, ls="--", c="C0", lw=0.8)
        ax.axhline(g / 4, ls="--", c="C1", lw=0.8)
        ax.legend(loc="center right", fontsize=8)
    if "work_conserving" in runs:
        ax = panels[1]
        draw(ax, runs["work_conserving"], lambda t, p: p)
        cap = runs["work_conserving"].scenario.limits["global"][0]
        ax.axhline(cap, ls="--", c="k", lw=0.8, label="global cap")
        ax.legend(loc="center right", fontsize=8)
    if "tenants" in runs:
        ax = panels[2]
        run = runs["tenants"]
        quiet = run.scenario.quiet_tenants
        # ~20 items per tenant per second: 1 s bins keep +/- 1 item from looking like noise.
        series = _series(run, lambda t, p: t, bin_s=1.0)
        xs = x_axis(next(iter(series.values())), bin_s=1.0)
        others = [v for k, v in series.items() if k not in quiet and k != "t00"]
        for values in others:
            ax.plot(xs, values, c="0.6", lw=0.5)
        ax.plot([], [], c="0.6", lw=0.5, label="t01..t49 (each)")
        if "t00" in series:
            ax.plot(xs, series["t00"], c="C3", lw=1.5, label="t00 (offers 10x)")
        for i, name in enumerate(sorted(quiet)):
            if name in series:
                ax.plot(xs, series[name], c=f"C{i}", lw=0.8, ls=":", label=f"{name} (quiet)")
        frame(ax, run)
        ax.legend(loc="upper right", fontsize=7, ncol=2)
    if "premium" in runs:
        ax = panels[3]
        draw(ax, runs["premium"], lambda t, p: t)
        g = runs["premium"].scenario.limits["global"][0]
        ax.axhline(g * 5 / 9, ls="--", c="k", lw=0.8)
        ax.axhline(g / 9, ls="--", c="k", lw=0.8)
        ax.legend(loc="center right", fontsize=8)
    if "utilization" in runs:
        ax = panels[4]
        run = runs["utilization"]
        draw(ax, run, lambda t, p: t)
        for name, values in sorted(
            _series(run, lambda t, p: f"{t}/{p}" if t == "u-a" else None).items()
        ):
            ax.plot(x_axis(values), values, lw=0.8, ls=":", label=name)
        for scope, (rate, _) in run.scenario.limits.items():
            if rate < 1000:
                ax.axhline(rate, ls="--", c="k", lw=0.6)
                ax.annotate(scope, (0.1, rate), fontsize=7, va="bottom")
        ax.legend(loc="center right", fontsize=7, ncol=2)
    ax = panels[5]
    labels = list(scale["dispatch_ops_per_s"])
    values = [scale["dispatch_ops_per_s"][k] for k in labels]
    bars = ax.bar([f"{int(k):,}" for k in labels], values, color="C2")
    server = scale["server_us_per_call"]
    for bar, k in zip(bars, labels, strict=True):
        ax.annotate(
            f"{bar.get_height():,.0f}/s\nserver {server[k]['dispatch_us']:g} us",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_title(
        f"7. dispatch+ack per second, one process (acquire: {server['acquire_us']:g} us server)",
        fontsize=10,
    )
    ax.set_xlabel("backlogged tenants")
    ax.set_ylabel("ops per second")
    ax.set_ylim(0, max(values) * 1.25)
    ax.grid(alpha=0.3, axis="y")
    fig.suptitle("FairScheduler: admitted rate per class, 8 worker processes, one Redis")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
