"""``queue-ratelimit rq``: RQ workers that dequeue fairly within the budgets."""

from __future__ import annotations

import os

import click

from ._app import Settings, main


@main.group("rq", short_help="Run RQ workers that fetch jobs fairly within the budgets.")
def rq_group() -> None:
    """RQ integration (needs the rq extra: pip install 'queue-ratelimit[rq]')."""


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
