"""``queue-ratelimit limits``: read and change limits, caps, exemptions, weights and dry-run."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TypeVar

import click

from .._decision import describe_window, limit_fields, pause_fields, pause_text
from .._errors import LimitNotFound
from .._limit import Limit
from .._scheduler import FairScheduler
from .._scopes import _shown
from ._app import NUMBERS, Settings, _actor, main
from ._format import _mode, _table, format_limit

_T = TypeVar("_T")


@main.group(short_help="Read and change limits, caps, exemptions, weights and dry-run.")
def limits() -> None:
    """Read and change limits, concurrency caps, exemptions, fair-scheduling weights and
    dry-run mode (effective on the next decision).

    SCOPE is global, queue:<q>, tenant:<t>, tenant:<t>:queue:<q>, priority:<p> (all work
    of one priority), or a default for every tenant: tenant:* and tenant:*:queue:<q>.
    """


@limits.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_(settings: Settings, as_json: bool) -> None:
    """Every limit and concurrency cap (with the jobs running under it), the pauses, the
    exempt tenants and the dry-run mode."""
    with settings.limiter() as limiter:
        items = limiter.limits()
        pauses = limiter.pauses()
        caps = limiter.concurrency()
        # A default (tenant:*) caps each tenant on its own: no one running count.
        running = {s: None if "*" in s else limiter.running(s) for s in caps}
        exempt = limiter.exemptions()
        weights = FairScheduler(limiter).weights()
        version = limiter.config_version()
        # The namespace-wide switch has no getter on Limiter; it is this field of the config.
        dry_run = limiter.client.hget(limiter.keys.config, "mode:shadow") is not None
        recording = limiter.recording()
    if as_json:
        payload = {
            "namespace": settings.namespace,
            "version": version,
            "dry_run": dry_run,
            "recording_s": recording,
            "limits": {scope: limit_fields(item) for scope, item in items.items()},
            "concurrency": {s: {"cap": n, "running": running[s]} for s, n in caps.items()},
            "exempt": exempt,
            "weights": weights,
            "pauses": {s: pause_fields(p) for s, p in pauses.items()},
        }
        click.echo(json.dumps(payload, indent=2))
        return
    click.echo(
        f"namespace {settings.namespace!r}: config version {version}, "
        f"dry-run {'ON (nothing is denied)' if dry_run else 'off'}, "
        f"recording {'off' if recording is None else f'the last {recording:g} s'}"
    )
    if not items:
        click.echo("no limits set")
    else:
        # (A scope with several windows shows each, joined by "+"; credit beside the burst.)
        rows = [
            [
                scope,
                " + ".join(format_limit(w) for w in item.windows),
                " + ".join(f"{w.rate_per_second:.15g}" for w in item.windows),
                " + ".join(_burst_text(w) for w in item.windows),
                _mode(item.shadow),
            ]
            for scope, item in items.items()
        ]
        headers = ["scope", "limit", "per second", "burst", "mode"]
        for line in _table(headers, rows, "lrrrl"):
            click.echo(line)
    if caps:
        click.echo("concurrency caps (jobs at once):")
        cap_rows = [
            [s, str(n), "per tenant" if running[s] is None else str(running[s])]
            for s, n in caps.items()
        ]
        for line in _table(["scope", "cap", "running"], cap_rows, "lrr"):
            click.echo(line)
    if pauses:
        click.echo("paused (nothing admitted until then):")
        pause_rows = [
            [s, pause_text(str(p.until_ms)).removeprefix("until "), f"{p.remaining:.1f}"]
            for s, p in pauses.items()
        ]
        for line in _table(["scope", "until (UTC)", "seconds left"], pause_rows, "llr"):
            click.echo(line)
    if exempt:
        what = {"tenant": "its tenant caps", "all": "every cap"}
        listed = ", ".join(f"{t} ({what.get(m, m)})" for t, m in exempt.items())
        click.echo(f"exempt: {listed}")
    if weights:
        shown = ", ".join(f"{f.removeprefix('weight:')} {w:g}" for f, w in weights.items())
        click.echo(f"weights: {shown}")


@limits.command()
@click.argument("scope")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def get(settings: Settings, scope: str, as_json: bool) -> None:
    """The limit set for exactly SCOPE."""
    with settings.limiter() as limiter:
        item = limiter.get_limit(scope)
    if as_json:
        click.echo(json.dumps({"scope": item.scope, **limit_fields(item)}, indent=2))
        return
    windows = "  +  ".join(f"{format_limit(w)}  burst {_burst_text(w)}" for w in item.windows)
    click.echo(f"{item.scope}  {windows}  {_mode(item.shadow)}")


def limit_spec(
    texts: tuple[str, ...], burst: float | None, credit: float | None
) -> Limit | list[Limit]:
    """The limit of LIMIT arguments: one, or windows (--burst and --credit are the first
    LIMIT's; the others' burst is their period's tokens)."""
    windows = [Limit.parse(texts[0], burst=burst, credit=credit)]
    windows += [Limit.parse(text) for text in texts[1:]]
    return windows[0] if len(windows) == 1 else windows


def _burst_text(limit: Limit) -> str:
    credit = "" if limit.credit is None else f" (+{limit.credit:.15g} credit)"
    return f"{limit.capacity:.15g}{credit}"


@limits.command("set", context_settings=NUMBERS)
@click.argument("scope")
@click.argument("limit", nargs=-1, required=True)
@click.option("--burst", type=float, help="Bucket size in tokens [default: one period's tokens].")
@click.option(
    "--credit",
    type=float,
    help="Burst credits: tokens banked while the bucket is full, spent after it [default: none].",
)
@click.option(
    "--shadow",
    "shadow_flag",
    is_flag=True,
    help="Dry run: decide and count, never deny [default: keep the scope's mode; enforce "
    "for a new scope].",
)
@click.option("--enforce", is_flag=True, help="Deny what the limit does not admit.")
@click.pass_obj
def set_(
    settings: Settings,
    scope: str,
    limit: tuple[str, ...],
    burst: float | None,
    credit: float | None,
    shadow_flag: bool,
    enforce: bool,
) -> None:
    """Set SCOPE's LIMIT, such as 100/s, 6000/m, 10/h or 5/2s; several LIMITs (100/s
    10000/d) are windows that must every one admit a job (at most 4; --burst and --credit
    are the first one's)."""
    if shadow_flag and enforce:
        raise click.ClickException("--shadow and --enforce exclude each other: give one")
    shadow = True if shadow_flag else False if enforce else None
    parsed = limit_spec(limit, burst, credit)
    windows = (parsed,) if isinstance(parsed, Limit) else tuple(parsed)
    with settings.limiter() as limiter:
        if shadow is None:
            try:
                shadow = limiter.get_limit(scope).shadow
            except LimitNotFound:
                shadow = False
        version = limiter.set_limit(scope, parsed, shadow=shadow, actor=_actor())
    shown = " + ".join(describe_window(w) for w in windows)
    click.echo(f"{scope}: {shown} ({_mode(shadow)}); config version {version}")


@limits.command()
@click.argument("scope")
@click.pass_obj
def delete(settings: Settings, scope: str) -> None:
    """Remove SCOPE's limit (and its bucket)."""
    with settings.limiter() as limiter:
        version = limiter.delete_limit(scope, actor=_actor())
    click.echo(f"{scope}: deleted; config version {version}")


@limits.command(context_settings=NUMBERS)
@click.argument("scope")
@click.argument("seconds", type=float)
@click.pass_obj
def pause(settings: Settings, scope: str, seconds: float) -> None:
    """Admit nothing of SCOPE for SECONDS (on Redis's clock, across every worker), as for
    a downstream's 429 Retry-After. A running pause is only ever lengthened."""
    with settings.limiter() as limiter:
        held = limiter.pause(scope, seconds, actor=_actor())
    click.echo(f"{held.scope}: paused {pause_text(str(held.until_ms))} ({held.remaining:.1f} s)")


@limits.command()
@click.argument("scope")
@click.pass_obj
def resume(settings: Settings, scope: str) -> None:
    """End SCOPE's pause now."""
    with settings.limiter() as limiter:
        resumed = limiter.resume(scope, actor=_actor())
    click.echo(f"{scope}: {'resumed' if resumed else 'was not paused'}")


def _or_none(text: str, convert: Callable[[str], _T], what: str, hint: str) -> _T | None:
    """An argument that is a number or "none"."""
    if text == "none":
        return None
    try:
        return convert(text)
    except ValueError:
        raise click.BadParameter(
            f"expected {what} or 'none', got {_shown(text)}", param_hint=hint
        ) from None


@limits.command(context_settings=NUMBERS)
@click.argument("scope")
@click.argument("jobs")
@click.pass_obj
def concurrency(settings: Settings, scope: str, jobs: str) -> None:
    """At most JOBS of SCOPE running at once (across every worker), or "none" to remove
    the cap. tenant:* gives every tenant a cap of its own."""
    n = _or_none(jobs, int, "a whole number of jobs", "JOBS")
    with settings.limiter() as limiter:
        version = limiter.set_concurrency(scope, n, actor=_actor())
    done = "no concurrency cap" if n is None else f"at most {n} running at once"
    click.echo(f"{scope}: {done}; config version {version}")


@limits.command()
@click.argument("tenant")
@click.option(
    "--mode",
    type=click.Choice(["tenant", "all", "none"]),
    default="tenant",
    show_default=True,
    help="Skip the tenant's own caps, every cap (queue and global too), or end the exemption.",
)
@click.pass_obj
def exempt(settings: Settings, tenant: str, mode: str) -> None:
    """Exempt a VIP TENANT from rate limits, or end its exemption."""
    with settings.limiter() as limiter:
        if mode == "none":
            version = limiter.set_exempt(tenant, None, actor=_actor())
        else:
            version = limiter.set_exempt(
                tenant, "all" if mode == "all" else "tenant", actor=_actor()
            )
    if mode == "none":
        done = "no longer exempt" if version else "was not exempt; nothing changed"
    elif mode == "all":
        done = "exempt from every cap"
    else:
        done = "exempt from its tenant caps (queue and global caps still apply)"
    click.echo(f"{tenant}: {done}; config version {version}")


@limits.command(context_settings=NUMBERS)
@click.argument("kind", type=click.Choice(["tenant", "priority"]))
@click.argument("name")
@click.argument("weight")
@click.pass_obj
def weight(settings: Settings, kind: str, name: str, weight: str) -> None:
    """Set the fair-scheduling WEIGHT (0.001 to 1e6) of a tenant or a priority NAME, or
    "none" for the default (tenant 1, or tenant * for every tenant's; high 3, normal 2,
    low 1). Weights share a contended budget: a weight-5 tenant gets five times a weight-1
    tenant's share."""
    value = _or_none(weight, float, "a number", "WEIGHT")
    with settings.limiter() as limiter:
        scheduler = FairScheduler(limiter)
        setter = scheduler.set_tenant_weight if kind == "tenant" else scheduler.set_priority_weight
        version = setter(name, value, actor=_actor())
    done = "back to the default weight" if value is None else f"weight {value:g}"
    click.echo(f"{kind} {name}: {done}; config version {version}")


@limits.command("dry-run")
@click.argument("state", type=click.Choice(["on", "off"]))
@click.pass_obj
def dry_run(settings: Settings, state: str) -> None:
    """Put the whole namespace in dry-run (shadow) mode, or take it out.

    In dry-run every scope decides and counts would-deny, but nothing is denied.
    """
    with settings.limiter() as limiter:
        version = limiter.set_shadow(state == "on", actor=_actor())
    what = "ON: decisions are counted, nothing is denied" if state == "on" else "off: enforcing"
    click.echo(f"namespace {settings.namespace!r}: dry-run {what}; config version {version}")
