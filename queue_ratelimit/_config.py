"""Static configuration (a dict, a TOML file or environment variables) that seeds Redis.

The accepted shape, in TOML::

    shadow = false                      # whole namespace in dry-run mode
    record = 900                        # keep 15 min of traffic for previews (optional)
    [limits]
    "global" = "1000/s"
    "tenant:*" = { rate = "50/s", burst = 100 }
    "tenant:acme:queue:emails" = { rate = "10/s", shadow = true }
    "tenant:beta" = { rate = "10/s", burst = 10, credit = 50 }   # burst credits
    "tenant:gamma" = ["100/s", "10000/d"]   # several windows: each must admit
    [exempt]
    vip = "tenant"                      # skip tenant caps; "all" also skips queue/global
    [concurrency]                       # at most n jobs of the scope running at once
    "tenant:*" = 4                      # each tenant: 4
    "queue:reports" = 10
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ._concurrency import CONCURRENCY_PREFIX, check_concurrency
from ._core import LimiterCore, ScriptCall
from ._decision import check_window_count, check_windows
from ._errors import ConfigError, InvalidLimit
from ._limit import Limit
from ._preview import RECORD_FIELD, recording_call, recording_value
from ._scopes import _shown, check_name, scope_name

ENV_PREFIX = "QUEUE_RATELIMIT_"


@dataclass(frozen=True, slots=True)
class ConfigSpec:
    """Validated static configuration."""

    # scope -> (its limit, or its windows when several; shadow)
    limits: Mapping[str, tuple[Limit | tuple[Limit, ...], bool]] = field(default_factory=dict)
    exempt: Mapping[str, str] = field(default_factory=dict)
    shadow: bool = False
    record: float | None = None  # seconds of traffic kept for previews
    concurrency: Mapping[str, int] = field(default_factory=dict)  # scope -> jobs at once


def _flag(where: str, value: object) -> bool:
    # bool("false") is True: a string here is a mistake to report, not a truthy value.
    if not isinstance(value, bool):
        raise ConfigError(f"{where}shadow must be true or false, got {_shown(value)}")
    return value


def _window(scope: str, value: object) -> Limit:
    """One window: "100/s", a Limit, or a table of rate, burst and credit."""
    if isinstance(value, str):
        return Limit.parse(value)
    if isinstance(value, Limit):
        return value
    if isinstance(value, Mapping):
        unknown = set(value) - {"rate", "burst", "credit"}
        if unknown or not isinstance(value.get("rate"), str):
            raise InvalidLimit(
                f"a window of {scope!r} must have 'rate' (a string like '100/s') and may have "
                f"'burst' and 'credit'; got {_shown(dict(value))}"
            )
        return Limit.parse(value["rate"], burst=value.get("burst"), credit=value.get("credit"))
    raise InvalidLimit(f"a window of {scope!r} must be a string or a table, got {_shown(value)}")


def _windows(scope: str, value: list[object] | tuple[object, ...]) -> tuple[Limit, ...]:
    check_window_count(scope, len(value))
    return check_windows(scope, tuple(_window(scope, item) for item in value))


def _limit_entry(scope: str, value: object) -> tuple[Limit | tuple[Limit, ...], bool]:
    if isinstance(value, str):
        return Limit.parse(value), False
    if isinstance(value, Limit):
        return value, False
    if isinstance(value, (list, tuple)):
        return _windows(scope, value), False
    if isinstance(value, Mapping):
        unknown = set(value) - {"rate", "burst", "credit", "shadow"}
        if unknown or "rate" not in value:
            raise InvalidLimit(
                f"limit for {scope!r} must have 'rate' and may have 'burst', 'credit' and "
                f"'shadow'; got keys {sorted(value)}"
            )
        burst, credit = value.get("burst"), value.get("credit")
        if burst is not None and not isinstance(burst, (int, float)):
            raise InvalidLimit(f"burst for {scope!r} must be a number, got {_shown(burst)}")
        if credit is not None and not isinstance(credit, (int, float)):
            raise InvalidLimit(f"credit for {scope!r} must be a number, got {_shown(credit)}")
        rate = value["rate"]
        shadow = _flag(f"limit for {scope!r}: ", value.get("shadow", False))
        if isinstance(rate, list) and burst is None and credit is None:
            return _windows(scope, rate), shadow
        if not isinstance(rate, str):
            raise InvalidLimit(
                f"rate for {scope!r} must be a string like '100/s' (or, without burst and "
                f"credit, a list of windows), got {_shown(rate)}"
            )
        return Limit.parse(rate, burst=burst, credit=credit), shadow
    raise InvalidLimit(
        f"limit for {scope!r} must be a string or a table, or a list of windows, "
        f"got {_shown(value)}"
    )


def parse_config(raw: Mapping[str, object]) -> ConfigSpec:
    """Validate a configuration mapping; every problem raises a ``ConfigError`` naming it."""
    unknown = set(raw) - {"limits", "exempt", "shadow", "record", "concurrency"}
    if unknown:
        raise ConfigError(
            f"unknown configuration keys {sorted(unknown)}; expected limits, exempt, shadow, "
            f"record, concurrency"
        )
    limits_raw = raw.get("limits", {})
    exempt_raw = raw.get("exempt", {})
    concurrency_raw = raw.get("concurrency", {})
    if (
        not isinstance(limits_raw, Mapping)
        or not isinstance(exempt_raw, Mapping)
        or not isinstance(concurrency_raw, Mapping)
    ):
        raise ConfigError("'limits', 'exempt' and 'concurrency' must be tables (mappings)")
    limits = {scope_name(s): _limit_entry(s, v) for s, v in limits_raw.items()}
    exempt = {}
    for tenant, mode in exempt_raw.items():
        if mode not in ("tenant", "all"):
            raise ConfigError(
                f"exempt mode for {_shown(tenant)} must be 'tenant' or 'all', got {_shown(mode)}"
            )
        exempt[check_name("tenant", tenant)] = mode
    record = raw.get("record")
    if record is not None:
        recording_value(record)  # validated here, where the file's mistakes are reported
    concurrency = {}
    for scope, n in concurrency_raw.items():
        try:
            concurrency[scope_name(scope)] = check_concurrency(n)
        except ConfigError as exc:
            raise type(exc)(f"concurrency for {_shown(scope)}: {exc}") from None
    return ConfigSpec(
        concurrency=concurrency,
        limits=limits,
        exempt=exempt,
        shadow=_flag("", raw.get("shadow", False)),
        record=None if record is None else float(record),  # type: ignore[arg-type]
    )


def load_config_file(path: str | os.PathLike[str]) -> ConfigSpec:
    """Read and validate a TOML configuration file."""
    with Path(path).open("rb") as fh:
        try:
            return parse_config(tomllib.load(fh))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from exc


def _env_pairs(name: str, text: str, example: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(";"))):
        scope, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{ENV_PREFIX}{name} entry {_shown(item)} must look like {example!r}")
        if scope.strip() in pairs:
            # (The last one silently won: a pasted line left in place changed the limit.)
            raise ConfigError(f"{ENV_PREFIX}{name} gives {_shown(scope.strip())} twice")
        pairs[scope.strip()] = value.strip()
    return pairs


def config_from_env(environ: Mapping[str, str] | None = None) -> ConfigSpec | None:
    """Configuration from ``QUEUE_RATELIMIT_CONFIG`` (a TOML path), or
    ``QUEUE_RATELIMIT_LIMITS`` (``"global=1000/s;tenant:*=50/s"``; several windows of one
    scope separated by commas: ``"tenant:acme=100/s,10000/d"``) and
    ``QUEUE_RATELIMIT_CONCURRENCY`` (``"tenant:*=4;global=100"``); None when none is set."""
    env = os.environ if environ is None else environ
    if path := env.get(f"{ENV_PREFIX}CONFIG"):
        return load_config_file(path)
    text = env.get(f"{ENV_PREFIX}LIMITS")
    caps_text = env.get(f"{ENV_PREFIX}CONCURRENCY")
    if not text and not caps_text:
        return None
    # (Several windows of a scope: "tenant:acme=100/s,10000/d".)
    limits: dict[str, object] = {
        scope: value.split(",") if "," in value else value
        for scope, value in _env_pairs("LIMITS", text or "", "scope=100/s").items()
    }
    caps: dict[str, object] = {}
    for scope, n in _env_pairs("CONCURRENCY", caps_text or "", "scope=4").items():
        try:
            caps[scope] = int(n)
        except ValueError:
            raise InvalidLimit(
                f"{ENV_PREFIX}CONCURRENCY: the cap for {_shown(scope)} must be a whole number, "
                f"got {_shown(n)}"
            ) from None
    return parse_config({"limits": limits, "concurrency": caps})


def seed_calls(
    core: LimiterCore, spec: ConfigSpec, present: set[str], overwrite: bool, actor: str
) -> list[tuple[str, ScriptCall]]:
    """The config writes that seed ``spec`` (fields already ``present`` kept unless
    ``overwrite``): Redis holds the truth, static configuration only fills gaps."""
    calls: list[tuple[str, ScriptCall]] = []
    for scope, (limit, shadow) in spec.limits.items():
        if overwrite or scope not in present:
            calls.append((scope, core.set_limit_call(scope, limit, shadow, actor)))
    for tenant, mode in spec.exempt.items():
        field = f"exempt:{tenant}"
        if overwrite or field not in present:
            calls.append((field, core.set_exempt_call(tenant, mode, actor)))  # type: ignore[arg-type]
    if spec.shadow and (overwrite or "mode:shadow" not in present):
        calls.append(("mode:shadow", core.config_call("set", "mode:shadow", "1", actor)))
    if spec.record is not None and (overwrite or RECORD_FIELD not in present):
        calls.append((RECORD_FIELD, recording_call(core, spec.record, actor)))
    for scope, n in spec.concurrency.items():
        field = CONCURRENCY_PREFIX + scope
        if overwrite or field not in present:
            calls.append((field, core.set_concurrency_call(scope, n, actor)))
    return calls
