"""``queue-ratelimit limits record / preview / audit``: the recorded traffic and the change log."""

from __future__ import annotations

import dataclasses
import datetime
import json

import click

from .._decision import readable_config_value
from .._preview import preview_fields
from .._scopes import _shown
from ._app import NUMBERS, Settings, _actor
from ._format import _jobs, _table
from ._limits import limit_spec, limits


@limits.command(context_settings=NUMBERS)
@click.argument("seconds")
@click.pass_obj
def record(settings: Settings, seconds: str) -> None:
    """Record traffic for previews, keeping the last SECONDS (60-86400), or "off".

    While on, each decision also counts its cost per second and (tenant, queue): one more
    Redis command per decision. `limits preview` replays the record.
    """
    keep = None if seconds == "off" else _seconds(seconds)
    with settings.limiter() as limiter:
        version = limiter.set_recording(keep, actor=_actor())
    done = "off" if keep is None else f"on, keeping the last {keep:g} s"
    click.echo(f"namespace {settings.namespace!r}: recording {done}; config version {version}")


def _seconds(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(
            f"expected seconds or 'off', got {_shown(text)}", param_hint="SECONDS"
        ) from None


@limits.command(context_settings=NUMBERS)
@click.argument("scope")
@click.argument("limit", nargs=-1, required=True)
@click.option("--burst", type=float, help="Bucket size in tokens [default: one period's tokens].")
@click.option(
    "--credit",
    type=float,
    help="Burst credits: tokens banked while the bucket is full, spent after it [default: none].",
)
@click.option("--window", type=float, help="Seconds to replay [default: all that is recorded].")
@click.option("--top", type=click.IntRange(0, 1000), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def preview(
    settings: Settings,
    scope: str,
    limit: tuple[str, ...],
    burst: float | None,
    credit: float | None,
    window: float | None,
    top: int,
    as_json: bool,
) -> None:
    """What LIMIT on SCOPE would have done to the recorded traffic; changes nothing.

    The work that ran in the window is replayed, per second, through a bucket with the
    proposed limit (one per tenant for tenant:* defaults): how much of it would have waited,
    and how long. Several LIMITs (100/s 10000/d) are windows as for `limits set` (--burst
    and --credit are the first one's). Needs `limits record` on for a while first.
    """
    parsed = limit_spec(limit, burst, credit)
    with settings.limiter() as limiter:
        result = limiter.preview(scope, parsed, window=window)
    fields = preview_fields(result, top)
    if as_json:
        click.echo(json.dumps(fields, indent=2))
        return
    click.echo(
        f"{result.scope} at {fields['limit']}, over the last {result.window_s:g} s recorded:"
    )
    if not result.buckets:
        click.echo("  no recorded traffic goes through this scope's buckets")
        return
    click.echo(
        f"  {_jobs(result.work)} admitted in {len(result.buckets)} bucket(s); "
        f"{_jobs(result.delayed)} ({result.delayed_fraction:.1%}) would have waited, "
        f"up to {result.max_delay_s:.1f} s; {_jobs(result.backlog_at_end)} still waiting now"
    )
    if result.current is not None and result.current_delayed is not None:
        click.echo(
            f"  under the current {fields['current']}: "
            f"{_jobs(result.current_delayed)} would have waited (the model's check)"
        )
    if result.denied:
        click.echo(f"  {result.denied} denials recorded for this traffic (demand turned away)")
    rows = [
        [
            b.scope,
            _jobs(b.work),
            _jobs(b.delayed),
            f"{b.delayed_fraction:.1%}",
            f"{b.max_delay_s:.1f}",
        ]
        for b in result.buckets[:top]
        if b.delayed > 0
    ]
    if rows:
        headers = ["bucket", "admitted", "would wait", "share", "max wait s"]
        for line in _table(headers, rows, "lrrrr"):
            click.echo(line)


@limits.command()
@click.option("-n", "count", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def audit(settings: Settings, count: int, as_json: bool) -> None:
    """The latest configuration changes, newest first."""
    with settings.limiter() as limiter:
        entries = limiter.audit_log(count)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(e) for e in entries], indent=2))
        return
    if not entries:
        click.echo(f"no changes recorded in namespace {settings.namespace!r}")
        return
    rows = [
        [
            datetime.datetime.fromtimestamp(e.at_ms / 1000, datetime.UTC).strftime(
                "%Y-%m-%d %H:%M:%S"
            ),
            str(e.version),
            e.actor,
            e.op,
            e.field,
            f"{readable_config_value(e.field, e.old)} -> {readable_config_value(e.field, e.new)}",
        ]
        for e in entries
    ]
    for line in _table(["time (UTC)", "version", "actor", "op", "field", "change"], rows, "lrllll"):
        click.echo(line)
