"""``queue-ratelimit demo``: the multi-tenant workload that shows the caps hold."""

from __future__ import annotations

import click

from .. import _demo
from ._app import Settings, main


@main.command(short_help="Run a multi-tenant workload and show that the caps hold.")
@click.option(
    "--duration",
    type=click.FloatRange(1, 3600),
    default=20.0,
    show_default=True,
    help="Seconds of load.",
)
@click.pass_obj
def demo(settings: Settings, duration: float) -> None:
    """Drive a multi-tenant workload through the limiter and show the caps hold.

    Runs the package's Lua scripts in process (no Redis server needed) unless --url or
    REDIS_URL names a server; there it uses the namespace "demo", cleared first.
    """
    code = _demo.run(duration, url=settings.url)
    if code:
        raise click.exceptions.Exit(code)
