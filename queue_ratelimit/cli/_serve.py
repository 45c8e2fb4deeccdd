"""``queue-ratelimit serve``: the admin HTTP API."""

from __future__ import annotations

import ipaddress

import click

from ._app import Settings, main


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is reachable from this machine only.
    Any other name counts as reachable from outside: it may resolve to anything."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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

        from ..admin import create_app
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
