"""``queue-ratelimit rq``: RQ workers that dequeue fairly, and what their queues hold."""

from __future__ import annotations

import json
import os

import click

from ._app import Settings, main
from ._format import _cell, _table


@main.group("rq", short_help="Run RQ workers that fetch jobs fairly within the budgets.")
def rq_group() -> None:
    """RQ integration: fair workers, and what waits and runs per tenant (needs the rq
    extra: pip install 'queue-ratelimit[rq]')."""


@rq_group.command(
    "worker",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    short_help="rq worker, fetching in fair order within the budgets.",
)
@click.option(
    "--simple",
    is_flag=True,
    help="Run jobs in the worker process (SimpleWorker) instead of forking for each job.",
)
@click.option(
    "--lease",
    type=click.FloatRange(min=1, max=7 * 86400),
    default=None,
    help="Seconds a job's concurrency slots are held between renewals: how long a killed "
    "worker's slots take to come back [env QUEUE_RATELIMIT_LEASE; default 60].",
)
@click.argument("rq_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def rq_worker(
    settings: Settings, simple: bool, lease: float | None, rq_args: tuple[str, ...]
) -> None:
    """Start an RQ worker on QUEUES that dequeues through the fair scheduler.

    Takes every option of `rq worker` (QUEUES..., --url, --burst, --with-scheduler, --name,
    --max-jobs, --logging_level, ... see `rq worker --help`); the Redis URL is the one RQ
    uses (--url, else REDIS_URL), and the limits live in the namespace given by the
    group's --namespace (QUEUE_RATELIMIT_NAMESPACE). Extra options: --simple, --lease.

    \b
    queue-ratelimit --namespace prod rq worker emails reports --with-scheduler
    """
    try:
        from rq.cli.cli import main as rq_main
    except ImportError as exc:
        raise click.ClickException("install queue-ratelimit[rq] to run RQ workers") from exc
    os.environ["QUEUE_RATELIMIT_NAMESPACE"] = settings.namespace
    os.environ["QUEUE_RATELIMIT_SHARDS"] = str(settings.shards)
    if lease is not None:
        os.environ["QUEUE_RATELIMIT_LEASE"] = repr(lease)
    args = list(rq_args)
    if settings.url and not any(a in ("--url", "-u") or a.startswith("--url=") for a in args):
        args = ["--url", settings.url, *args]
    worker_class = "SimpleWorker" if simple else "Worker"
    rq_main.main(
        args=[
            "worker",
            "--worker-class",
            f"queue_ratelimit.rq.{worker_class}",
            "--queue-class",
            "queue_ratelimit.rq.Queue",
            *args,
        ],
        prog_name="queue-ratelimit rq",
    )


@rq_group.command("info", short_help="Jobs waiting, parked and running per queue and tenant.")
@click.argument("queues", nargs=-1)
@click.option(
    "--serializer",
    "-S",
    default=None,
    help="The jobs' serializer, as for `rq info` (a dotted path) [default: RQ's pickle].",
)
@click.option(
    "--max-read",
    type=click.IntRange(0, 1_000_000),
    default=10_000,
    show_default=True,
    help="Jobs on each RQ list whose tenant is read (the rest count as unread).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def rq_info(
    settings: Settings,
    queues: tuple[str, ...],
    serializer: str | None,
    max_read: int,
    as_json: bool,
) -> None:
    """Jobs of each RQ queue (QUEUES, default: every queue RQ knows) and of each tenant in
    it: waiting on RQ's list, parked in the fair backlog, running (RQ's started registry),
    what holds back each tenant's parked jobs (the scope, and the window that binds when
    it has several), and the concurrency slots held against each cap that applies. RQ's
    own `rq info` shows a queue's waiting and parked jobs together (with --queue-class
    queue_ratelimit.rq.Queue), not per tenant. Reads only.

    The limits' Redis (--url) is taken to be RQ's, as the integration requires.
    """
    try:
        from rq.serializers import resolve_serializer

        from ..rq._info import queue_info, queue_names, slots_held
    except ImportError as exc:
        raise click.ClickException("install queue-ratelimit[rq] to read RQ queues") from exc
    with settings.limiter() as limiter:
        names = list(queues) or queue_names(limiter.client)
        infos = queue_info(
            limiter, names, serializer=resolve_serializer(serializer), max_read=max_read
        )
        slots = slots_held(limiter, infos)
    if as_json:
        payload = {
            "namespace": settings.namespace,
            "queues": [q.as_dict() for q in infos],
            "slots": {s: {"cap": cap, "held": held} for s, (cap, held) in slots.items()},
        }
        click.echo(json.dumps(payload, indent=2))
        return
    click.echo(f"namespace {settings.namespace!r} on {settings.target}:")
    if not infos:
        click.echo("no RQ queues")
        return
    rows: list[list[str]] = []
    for q in infos:
        t = q.total
        rows.append([_cell(q.name), "(all)", str(t.waiting), str(t.parked), str(t.running), ""])
        for tenant, c in sorted(q.tenants.items()):
            held = q.held_back_by.get(tenant, "")
            rows.append(["", tenant, str(c.waiting), str(c.parked), str(c.running), held])
        u = q.unread
        if u.waiting or u.running:
            rows.append(["", "(unread)", str(u.waiting), "", str(u.running), ""])
    headers = ["queue", "tenant", "waiting", "parked", "running", "held back by"]
    for line in _table(headers, rows, "llrrrl"):
        click.echo(line)
    if slots:
        held = ", ".join(f"{s} {n}/{cap}" for s, (cap, n) in slots.items())
        click.echo(f"concurrency slots held: {held}")
