"""``queue-ratelimit top``: the live terminal dashboard."""

from __future__ import annotations

import click

from ._app import Settings, main


@main.command(short_help="A live terminal dashboard of the namespace (the tui extra).")
@click.option(
    "--interval",
    type=click.FloatRange(0.2, 60),
    default=1.0,
    show_default=True,
    help="Seconds between polls of Redis.",
)
@click.pass_obj
def top(settings: Settings, interval: float) -> None:
    """Budgets and their fill, decisions per second, who is throttled and by which scope,
    the waits given, parked and in-flight work. Keys: q quits, p pauses."""
    try:
        from ..tui import TopApp
    except ImportError as exc:
        raise click.ClickException(
            f"the dashboard needs the tui extra (pip install 'queue-ratelimit[tui]'): {exc}"
        ) from exc
    TopApp(settings.limiter(), interval=interval).run()
