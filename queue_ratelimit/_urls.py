"""Redis URLs: checked before use, and shown only with their credentials masked."""

from __future__ import annotations

import math
import re
from urllib.parse import urlsplit

from ._errors import ConfigError

REDIS_SCHEMES = ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
# A URL of these schemes names one node of a Redis Cluster (any: the client learns the rest
# from it); the client is a ``RedisCluster``, and the URL is otherwise read as its plain
# scheme's (``redis+cluster://`` as ``redis://``).
CLUSTER_SUFFIX = "+cluster"
# Query options redis-py reads as socket timeouts: each must be a finite number of seconds
# > 0 (socket.settimeout raises deep inside a connect on a negative one, and 0 would make
# every socket non-blocking).
_SECONDS_OPTIONS = ("socket_timeout", "socket_connect_timeout")
MASK = "***"

# Written as regular expressions rather than with urlsplit, so that a URL too malformed to
# parse ("redis://:pw@[::1/0") is masked all the same: the text is the same either way.
# The userinfo is everything between "//" and the last "@" before the query (a password may
# hold an unescaped "@" or "/": better mask a path than show a secret), and a URL may be a
# kombu list ("sentinel://...;sentinel://...").
_USERINFO = re.compile(r"(?P<head>//)(?P<info>[^?#;]*)@")
# Query options naming a secret: password=, sentinel_password=, ssl_password=, token=...
_SECRET_OPTION = re.compile(
    r"(?P<head>[?&;](?:[^=&#;]*(?:pass|secret|token|auth|credential)[^=&#;]*)=)[^&#;]*",
    re.IGNORECASE,
)


def _userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["info"].partition(":")
    # "redis://secret@host" is read by some clients as a password: mask a lone name too.
    return f"{match['head']}{user}:{MASK}@" if colon else f"{match['head']}{MASK}@"


def mask_url(url: str) -> str:
    """``url`` with every credential replaced by ``***``: the userinfo's password (or a lone
    userinfo, which some clients read as one) and any secret query option such as
    ``?password=``. Never raises, whatever the text; fit for messages, logs and reprs.

    >>> mask_url("redis://app:s3cret@cache:6379/0?password=other&db=1")
    'redis://app:***@cache:6379/0?password=***&db=1'
    """
    return _SECRET_OPTION.sub(rf"\g<head>{MASK}", _USERINFO.sub(_userinfo, url))


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    scheme, sep, _ = url.partition("://")
    return bool(sep) and scheme.lower().endswith(CLUSTER_SUFFIX)


def node_url(url: str) -> str:
    """``url`` with its plain scheme, as redis-py reads it (``redis+cluster://h:7000`` is
    ``redis://h:7000``); any other URL as it is."""
    if not is_cluster_url(url):
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme[: -len(CLUSTER_SUFFIX)]}://{rest}"


def check_redis_url(url: object) -> str:
    """Return ``url`` if redis-py can connect with it as given, else raise ``ConfigError``
    with a one-line reason (the URL shown masked).

    Checks what redis-py would otherwise report late or as a traceback: an empty URL, an
    unknown scheme or query option, an unparsable host or port, a database that is not a
    number, and timeouts that are not a positive number of seconds. A cluster URL
    (``redis+cluster://``) is checked as its plain scheme's, and its database must be 0
    (a Redis Cluster has no other).
    """
    if not isinstance(url, str):
        raise ConfigError(f"a Redis URL must be a string, got {type(url).__name__}")
    if not url.strip():
        raise ConfigError("the Redis URL is empty: give one such as redis://localhost:6379/0")
    from redis.connection import ConnectionPool  # redis-py's own reading of the URL

    shown = mask_url(url)
    try:
        parts = urlsplit(url)
        if parts.scheme not in REDIS_SCHEMES:
            raise ValueError(f"the scheme must be one of {', '.join(REDIS_SCHEMES)}")
        _ = parts.port  # raises for a port that is not a number in 0-65535
        pool = ConnectionPool.from_url(node_url(url))
        options = pool.connection_kwargs
        # Building a connection opens no socket, but rejects what redis-py would only
        # reject at the first command: an option it does not know (?sentinel_password=).
        pool.connection_class(**options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad Redis URL {shown}: {exc}") from None
    if parts.scheme != "unix" and parts.path.strip("/") and "db" not in options:
        raise ConfigError(f"bad Redis URL {shown}: the database must be a number, as in /0")
    if options.get("db", 0) < 0:
        raise ConfigError(f"bad Redis URL {shown}: the database must be a number >= 0")
    if is_cluster_url(url) and options.get("db", 0) != 0:
        raise ConfigError(f"bad Redis URL {shown}: a Redis Cluster has database 0 only")
    for name in _SECONDS_OPTIONS:
        seconds = options.get(name)
        if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
            raise ConfigError(
                f"bad Redis URL {shown}: {name} must be a number of seconds > 0, got {seconds:g}"
            )
    return url
