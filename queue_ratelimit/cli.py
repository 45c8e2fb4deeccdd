"""The ``queue-ratelimit`` command: the demo, and runtime control of limits in Redis."""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import ipaddress
import json
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import click
import redis

from . import __version__, _bench, _demo
from ._decision import format_limit, limit_fields, readable_config_value
from ._demo import _table
from ._errors import BackendUnavailable, LimitNotFound, RateLimitError
from ._limit import Limit
from ._limiter import Limiter
from ._preview import preview_fields
from ._scheduler import FairScheduler
from ._scopes import _shown
from ._urls import check_redis_url, mask_url

DEFAULT_URL = "redis://localhost:6379/0"
_T = TypeVar("_T")
masked = mask_url  # the name this module exported before the helper moved to _urls


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only.
    Any other name counts as reachable from outside: it may resolve to anything."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _mode(shadow: bool) -> str:
    return "shadow" if shadow else "enforce"


def _actor() -> str:
    """Who the audit trail names for a change made from this command."""
    try:
        return f"cli:{getpass.getuser()}"
    except (OSError, KeyError):  # no login name (some containers): still say it was the CLI
        return "cli"


# For commands that take numbers as arguments: "-5/s" or "-5" is a value to refuse with a
# reason, not an unknown option.
NUMBERS = {"ignore_unknown_options": True}


@dataclass(frozen=True, slots=True)
class Settings:
    """The group's options, shared with every subcommand."""

    url: str | None
    namespace: str

    @property
    def target(self) -> str:
        return masked(self.url or DEFAULT_URL)

    def limiter(self) -> Limiter:
        url = check_redis_url(self.url or DEFAULT_URL)  # a ConfigError: one line, exit 1
        try:
            return Limiter.from_url(url, namespace=self.namespace)
        except RateLimitError:
            raise
        except ValueError as exc:  # redis-py's verdict on a URL the check let through
            raise click.ClickException(f"bad Redis URL {self.target}: {exc}") from exc


@contextmanager
def _clean_errors(ctx: click.Context) -> Iterator[None]:
    """Turn our errors and Redis's into one-line messages and a non-zero exit."""
    try:
        yield
    except click.MissingParameter:
        raise  # a usage mistake: the usage block and exit 2
    except click.BadParameter as exc:
        # A bad value is bad input like an invalid limit: one line and exit 1, as the
        # README promises, not the usage block and exit 2 (kept for a missing argument
        # or an unknown command or option).
        raise click.ClickException(exc.format_message()) from exc
    except BackendUnavailable as exc:
        raise click.ClickException(_unreachable(ctx, exc.__cause__ or exc)) from exc
    except RateLimitError as exc:
        raise click.ClickException(str(exc)) from exc
    except ImportError as exc:  # an optional extra is missing; its message says which
        raise click.ClickException(str(exc)) from exc
    except redis.RedisError as exc:
        # Read only now: the group's callback stores the settings after this began.
        settings = ctx.obj if isinstance(ctx.obj, Settings) else Settings(None, "default")
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            message = _unreachable(ctx, exc)
        else:
            message = f"Redis at {settings.target} answered with an error: {exc}"
        raise click.ClickException(message) from exc


def _unreachable(ctx: click.Context, exc: BaseException) -> str:
    # Read only now: the group's callback stores the settings after the command began.
    settings = ctx.obj if isinstance(ctx.obj, Settings) else Settings(None, "default")
    hint = "" if settings.url else " (set --url or REDIS_URL)"
    return f"cannot reach Redis at {settings.target}{hint}: {exc}"


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        with _clean_errors(ctx):
            return super().invoke(ctx)


@click.group(cls=_Group)
@click.version_option(__version__, prog_name="queue-ratelimit")
@click.option(
    "--url",
    envvar=["QUEUE_RATELIMIT_URL", "REDIS_URL"],
    show_envvar=True,
    metavar="URL",
    help=f"Redis server holding the limits [limits default: {DEFAULT_URL}; demo default: the "
    "embedded engine].",
)
@click.option(
    "--namespace",
    envvar="QUEUE_RATELIMIT_NAMESPACE",
    show_envvar=True,
    default="default",
    show_default=True,
    help="Namespace of the limits (one deployment's keys).",
)
@click.pass_context
def main(ctx: click.Context, url: str | None, namespace: str) -> None:
    """Distributed, Redis-backed rate limits for Celery and RQ."""
    if url is not None and not url.strip():
        # An empty value from the environment counts as unset (click); an empty --url
        # given on purpose is a mistake, not a request for the default server.
        raise click.ClickException(
            f"--url is empty: give a Redis URL such as {DEFAULT_URL}, or leave the option out"
        )
    ctx.obj = Settings(url=url, namespace=namespace)


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


@main.command(short_help="Serve the admin HTTP API (the admin extra).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option(
    "--token",
    envvar="QUEUE_RATELIMIT_ADMIN_TOKEN",
    show_envvar=True,
    help="Bearer token every request must carry (better set in the environment).",
)
@click.option(
    "--read-token",
    envvar="QUEUE_RATELIMIT_READ_TOKEN",
    show_envvar=True,
    help="A second bearer token that may only read (the GET routes, /metrics): for "
    "Prometheus and dashboards.",
)
@click.option(
    "--no-auth",
    is_flag=True,
    help="Serve without a token: trusted local use only (refused on a non-loopback --host).",
)
@click.pass_obj
def serve(
    settings: Settings,
    host: str,
    port: int,
    token: str | None,
    read_token: str | None,
    no_auth: bool,
) -> None:
    """Serve the admin API: limits, exemptions, dry-run mode, weights, the audit log, live
    bucket state and Prometheus metrics of the namespace. Changes apply to the next
    decision in every worker. Interactive documentation at /docs."""
    if not token and not no_auth:
        raise click.UsageError(
            "set QUEUE_RATELIMIT_ADMIN_TOKEN (the bearer token clients must send), "
            "or pass --no-auth for a trusted, local setup"
        )
    if not token and not is_loopback(host):
        # Anyone who can reach the port could change every limit: never on a network.
        raise click.UsageError(
            f"--no-auth serves on loopback only ({host} is not): set "
            f"QUEUE_RATELIMIT_ADMIN_TOKEN, or listen on --host 127.0.0.1"
        )
    try:
        import uvicorn

        from .admin import create_app
    except ImportError as exc:
        raise click.ClickException(
            f"the admin API needs the admin extra (pip install 'queue-ratelimit[admin]'): {exc}"
        ) from exc
    try:
        app = create_app(
            settings.limiter(), token=token or None, read_token=read_token, allow_anonymous=no_auth
        )
    except ValueError as exc:  # the two tokens are the same
        raise click.UsageError(str(exc)) from exc
    click.echo(
        f"admin API for namespace {settings.namespace!r} on {settings.target}: "
        f"http://{host}:{port}/docs",
        err=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")


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
        from .tui import TopApp
    except ImportError as exc:
        raise click.ClickException(
            f"the dashboard needs the tui extra (pip install 'queue-ratelimit[tui]'): {exc}"
        ) from exc
    TopApp(settings.limiter(), interval=interval).run()


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


@main.group(short_help="Read and change limits, caps, exemptions, weights and dry-run.")
def limits() -> None:
    """Read and change limits, concurrency caps, exemptions, fair-scheduling weights and
    dry-run mode (effective on the next decision).

    SCOPE is global, queue:<q>, tenant:<t>, tenant:<t>:queue:<q>, or a default for every
    tenant: tenant:* and tenant:*:queue:<q>.
    """


@limits.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_(settings: Settings, as_json: bool) -> None:
    """Every limit and concurrency cap (with the jobs running under it), the exempt tenants
    and the dry-run mode."""
    with settings.limiter() as limiter:
        items = limiter.limits()
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
        rows = [
            [
                scope,
                format_limit(item.limit),
                f"{item.limit.rate_per_second:.15g}",
                f"{item.limit.capacity:.15g}",
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
    lim = item.limit
    click.echo(
        f"{item.scope}  {format_limit(lim)}  burst {lim.capacity:.15g}  {_mode(item.shadow)}"
    )


@limits.command("set", context_settings=NUMBERS)
@click.argument("scope")
@click.argument("limit")
@click.option("--burst", type=float, help="Bucket size in tokens [default: one period's tokens].")
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
    limit: str,
    burst: float | None,
    shadow_flag: bool,
    enforce: bool,
) -> None:
    """Set SCOPE's LIMIT, such as 100/s, 6000/m, 10/h or 5/2s."""
    if shadow_flag and enforce:
        raise click.ClickException("--shadow and --enforce exclude each other: give one")
    shadow = True if shadow_flag else False if enforce else None
    parsed = Limit.parse(limit, burst=burst)
    with settings.limiter() as limiter:
        if shadow is None:
            try:
                shadow = limiter.get_limit(scope).shadow
            except LimitNotFound:
                shadow = False
        version = limiter.set_limit(scope, parsed, shadow=shadow, actor=_actor())
    click.echo(
        f"{scope}: {format_limit(parsed)} burst {parsed.capacity:.15g} ({_mode(shadow)}); "
        f"config version {version}"
    )


@limits.command()
@click.argument("scope")
@click.pass_obj
def delete(settings: Settings, scope: str) -> None:
    """Remove SCOPE's limit (and its bucket)."""
    with settings.limiter() as limiter:
        version = limiter.delete_limit(scope, actor=_actor())
    click.echo(f"{scope}: deleted; config version {version}")


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
@click.argument("limit")
@click.option("--burst", type=float, help="Bucket size in tokens [default: one period's tokens].")
@click.option("--window", type=float, help="Seconds to replay [default: all that is recorded].")
@click.option("--top", type=click.IntRange(0, 1000), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def preview(
    settings: Settings,
    scope: str,
    limit: str,
    burst: float | None,
    window: float | None,
    top: int,
    as_json: bool,
) -> None:
    """What LIMIT on SCOPE would have done to the recorded traffic; changes nothing.

    The work that ran in the window is replayed, per second, through a bucket with the
    proposed limit (one per tenant for tenant:* defaults): how much of it would have waited,
    and how long. Needs `limits record` on for a while first.
    """
    parsed = Limit.parse(limit, burst=burst)
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


def _jobs(amount: float) -> str:
    """Work in whole jobs: the replay is a fluid model, and a job that has waited at all,
    or is partly served, counts whole (424.821 still waiting is 425 jobs)."""
    return f"{math.ceil(round(amount, 6)):,}"


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
