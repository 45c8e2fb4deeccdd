"""``queue-ratelimit backlog``: the work workers parked in the fair backlog."""

from __future__ import annotations

import click

from .._scheduler import FairScheduler
from ._app import Settings, main


@main.group(short_help="Work waiting in the fair backlog: purge it.")
def backlog() -> None:
    """The fair backlog: the work workers parked, waiting for its turn within the budgets."""


@backlog.command("purge")
@click.option("--queue", "-Q", "queues", multiple=True, required=True, help="Queue (repeatable).")
@click.option("--tenant", help="Only this tenant's work.")
@click.option("--yes", "-f", "yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def backlog_purge(
    settings: Settings, queues: tuple[str, ...], tenant: str | None, yes: bool
) -> None:
    """Drop the work waiting in the fair backlog of each --queue (of one --tenant, or all).

    `celery purge` empties the broker's queues only: tasks a worker parked in the backlog
    were acknowledged to the broker and would still run. Work already handed to a worker
    is left alone. RQ jobs: use `rq empty --queue-class queue_ratelimit.rq.Queue`, which
    also deletes the jobs' records (this command leaves them).

    \b
    queue-ratelimit backlog purge --queue emails --tenant acme
    """
    with settings.limiter() as limiter:
        scheduler = FairScheduler(limiter)
        waiting = {q: scheduler.backlog(q, tenant) for q in queues}
        whose = f" of tenant {tenant}" if tenant else ""
        if not yes:
            listed = ", ".join(f"{q} ({n})" for q, n in waiting.items())
            click.confirm(
                f"Drop {sum(waiting.values())} item(s){whose} waiting in the backlog of {listed}?",
                abort=True,
            )
        for q in queues:
            dropped = scheduler.purge(q, tenant=tenant)
            click.echo(f"{q}: purged {len(dropped)} item(s){whose} from the backlog")
