"""``queue-ratelimit bench``: decisions per second and server cost on this Redis."""

from __future__ import annotations

import json

import click

from .. import _bench
from ._app import Settings, main


@main.command(short_help="Decisions/s and server cost of a decision on this Redis.")
@click.option(
    "--seconds",
    type=click.FloatRange(0.2, 600),
    default=5.0,
    show_default=True,
    help="Measuring time (the limiter and the floor alternate).",
)
@click.option(
    "--buckets",
    type=click.Choice(["1", "3"]),
    default="1",
    show_default=True,
    help="1: a tenant bucket; 3: tenant-queue, tenant and global buckets.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.pass_obj
def bench(settings: Settings, seconds: float, buckets: str, as_json: bool) -> None:
    """How many decisions one process gets from this Redis, next to a bare round trip, and
    how many one Redis core sustains. Uses a namespace of its own, deleted afterwards."""
    result = _bench.run(settings.limiter().client, seconds=seconds, buckets=int(buckets))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"Redis at {settings.target}, {buckets} bucket(s), via {result['transport']}:")
    click.echo(
        f"  acquire     {result['acquire_per_s']:>9,}/s from this process "
        f"({result['acquire_vs_floor']:.0%} of a bare round trip: "
        f"{result['floor_per_s']:,}/s)"
    )
    per_core = result["decisions_per_s_per_redis_core"]
    click.echo(
        f"  server time {result['server_us_per_decision']:>9.1f} us per decision "
        f"(one Redis core: about {per_core:,}/s for all clients together)"
    )
