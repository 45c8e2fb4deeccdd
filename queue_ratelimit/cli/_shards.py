"""``queue-ratelimit shards``: the shard count a namespace is recorded with."""

from __future__ import annotations

import click

from .._keys import MAX_SHARDS
from .._shard_count import SHARDS_FIELD, record_shards, recorded_count
from ._app import Settings, _actor, main


@main.group(short_help="The shard count the namespace is used with: show it, record another.")
def shards() -> None:
    """The shard count every process of the namespace must use (Limiter's shards, Celery's
    `shards` setting, QUEUE_RATELIMIT_SHARDS), recorded in Redis by the first process
    that used the namespace; a process with another count is refused."""


@shards.command("show")
@click.pass_obj
def shards_show(settings: Settings) -> None:
    """The count recorded for the namespace."""
    with settings.limiter() as limiter:
        count = recorded_count(limiter.client.hget(limiter.keys.config, SHARDS_FIELD))
    if count is None:
        click.echo(f"namespace {settings.namespace!r}: no shard count recorded yet")
    else:
        click.echo(f"namespace {settings.namespace!r}: {count} shard(s)")


@shards.command("set")
@click.argument("count", type=click.IntRange(1, MAX_SHARDS))
@click.option(
    "--force", is_flag=True, help="Replace another count already recorded (see above first)."
)
@click.pass_obj
def shards_set(settings: Settings, count: int, force: bool) -> None:
    """Record COUNT as the namespace's shard count.

    To change the count of a namespace in use: stop the processes using the old count
    and let their fair backlogs drain (this refuses while work waits under it), record
    the new count with --force, then start the processes with the new one. The buckets
    start anew under it (a burst once more).

    \b
    queue-ratelimit --namespace billing shards set 4 --force
    """
    with settings.limiter() as limiter:
        old = record_shards(limiter.client, settings.namespace, count, force=force, actor=_actor())
    was = "none" if old is None else str(old)
    click.echo(f"namespace {settings.namespace!r}: {count} shard(s) recorded (was {was})")
