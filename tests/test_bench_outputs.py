"""Benchmarks write outside the repository unless asked to refresh a documented figure."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import fairness

ROOT = Path(__file__).resolve().parent.parent


def test_the_fairness_plot_goes_outside_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    """#12: `python -m benchmarks fairness` rewrote the tracked docs/fairness.png."""
    monkeypatch.delenv("QRL_FAIRNESS_PLOT", raising=False)
    default = fairness._default_plot()
    assert default is not None
    assert not default.resolve().is_relative_to(ROOT)
    monkeypatch.setenv("QRL_FAIRNESS_PLOT", "docs/fairness.png")  # asked for: the figure
    assert fairness._default_plot() == Path("docs/fairness.png")
    monkeypatch.setenv("QRL_FAIRNESS_PLOT", "")
    assert fairness._default_plot() is None
