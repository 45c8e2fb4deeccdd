"""The ``queue-ratelimit`` group: its options, the settings commands read, one-line errors."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click
import redis

from .. import __version__
from .._errors import BackendUnavailable, RateLimitError
from .._keys import MAX_SHARDS
from .._limiter import Limiter
from .._urls import check_redis_url, mask_url

DEFAULT_URL = "redis://localhost:6379/0"
masked = mask_url  # the name this module exported before the helper moved to _urls


def _default_url() -> str:
    """The server used when no URL is given, read from the package at call time:
    ``queue_ratelimit.cli.DEFAULT_URL`` is the public name (and the one tests patch)."""
    from . import DEFAULT_URL as url

    return url


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
    shards: int = 1

    @property
    def target(self) -> str:
        return masked(self.url or _default_url())

    def limiter(self) -> Limiter:
        url = check_redis_url(self.url or _default_url())  # a ConfigError: one line, exit 1
        try:
            return Limiter.from_url(url, namespace=self.namespace, shards=self.shards)
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
@click.option(
    "--shards",
    envvar="QUEUE_RATELIMIT_SHARDS",
    show_envvar=True,
    default=1,
    show_default=True,
    type=click.IntRange(1, MAX_SHARDS),
    help="Hash slots the namespace is spread over (Limiter's shards; the same in every process).",
)
@click.pass_context
def main(ctx: click.Context, url: str | None, namespace: str, shards: int) -> None:
    """Distributed, Redis-backed rate limits for Celery and RQ."""
    if url is not None and not url.strip():
        # An empty value from the environment counts as unset (click); an empty --url
        # given on purpose is a mistake, not a request for the default server.
        raise click.ClickException(
            f"--url is empty: give a Redis URL such as {DEFAULT_URL}, or leave the option out"
        )
    ctx.obj = Settings(url=url, namespace=namespace, shards=shards)
