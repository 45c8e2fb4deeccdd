"""The admin API's bodies, path parameters and error answers, as its OpenAPI document shows them.

Numbers carry their ranges as constraints that FastAPI enforces, so the document and the
check cannot drift. Names, scopes and limit texts carry their patterns for the document only
(``json_schema_extra``): the library's own checks enforce them, with messages that say what
to fix, and ``tests/test_admin.py`` holds each pattern to the check it documents.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Header, Path, Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ._concurrency import MAX_CONCURRENCY
from ._core import MAX_PAUSE
from ._limit import LIMIT_PATTERN, MAX_BURST, MAX_LIMIT_TEXT, MAX_WINDOWS
from ._preview import MAX_RECORDING, MIN_RECORDING
from ._scheduler import MAX_WEIGHT, MIN_WEIGHT
from ._scopes import (
    CAP_SCOPE_PATTERN,
    CONCRETE_SCOPE_PATTERN,
    NAME_PATTERN,
    PRIORITY_PATTERN,
    SCOPE_PATTERN,
)

# The longest scope: "tenant:" + a name + ":queue:" + a name.
MAX_SCOPE = 7 + 128 + 7 + 128


def _documented(pattern: str, longest: int, description: str, example: str) -> dict[str, Any]:
    return {
        "description": description,
        "json_schema_extra": {"pattern": pattern, "maxLength": longest},
        "examples": [example],
    }


ScopePath = Annotated[
    str,
    Path(
        **_documented(
            SCOPE_PATTERN,
            MAX_SCOPE,
            "global, queue:<q>, tenant:<t>, tenant:<t>:queue:<q>, priority:<p>, or a default "
            "for every tenant: tenant:* or tenant:*:queue:<q>. Names may hold '/' (send it as "
            "is or as %2F).",
            "tenant:acme",
        )
    ),
]
CapScopePath = Annotated[
    str,
    Path(
        **_documented(
            CAP_SCOPE_PATTERN,
            MAX_SCOPE,
            "global, queue:<q>, tenant:<t>, tenant:<t>:queue:<q>, or a default for every "
            "tenant: tenant:* or tenant:*:queue:<q> (a priority takes no concurrency cap).",
            "tenant:acme",
        )
    ),
]
ConcreteScopePath = Annotated[
    str,
    Path(
        **_documented(
            CONCRETE_SCOPE_PATTERN,
            MAX_SCOPE,
            "A scope with a bucket of its own: global, queue:<q>, tenant:<t>, "
            "tenant:<t>:queue:<q> or priority:<p> (not a tenant:* default).",
            "tenant:acme",
        )
    ),
]
TenantPath = Annotated[str, Path(**_documented(f"^{NAME_PATTERN}$", 128, "A tenant name.", "acme"))]
TenantWeightPath = Annotated[
    str,
    Path(
        **_documented(
            rf"^(\*|{NAME_PATTERN})$",
            128,
            "A tenant name, or * for the default weight of every tenant.",
            "bigco",
        )
    ),
]
PriorityPath = Annotated[
    str,
    Path(
        description="A priority name (high, normal, low, or one of your own).",
        json_schema_extra={"pattern": f"^{PRIORITY_PATTERN}$", "maxLength": 32},
        examples=["high"],
    ),
]
ActorHeader = Annotated[
    str | None,
    Header(
        description="Who is making the change, added to the audit log after the token's "
        "fingerprint.",
        json_schema_extra={"pattern": f"^{NAME_PATTERN}$", "maxLength": 128},
    ),
]
TopQuery = Annotated[int, Query(ge=0, le=1000, description="Buckets listed, most delayed first.")]
CountQuery = Annotated[int, Query(ge=1, le=10_000, description="Changes listed, newest first.")]


class _Body(BaseModel):
    # Strict: a JSON value of another type than documented ("5" for 5, 1 for true) is
    # refused, as the document says, not coerced.
    model_config = ConfigDict(extra="forbid", strict=True)


def _whole_number(value: object) -> object:
    """JSON Schema's integer is any number with no fraction (4.0 too), never a string."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a whole number")
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number), Field(strict=False)]


LIMIT_DESCRIPTION = (
    'Rate per period: "100/s", "6000/m", "10/h", "5/2s", "1/d" (units ms, s, m, h, d, or '
    "spelt out). The pattern is the portable form, within bounds whatever its numbers; the "
    'server also reads other spellings ("0.5/s", "1e3/m", "100/second") between 1e-7 and '
    "1e9 per second over a period of 1 ms to 366 days, and refuses the rest with 400."
)


LimitText = Annotated[
    str, Field(json_schema_extra={"pattern": LIMIT_PATTERN, "maxLength": MAX_LIMIT_TEXT})
]


class _WindowsIn(_Body):
    """A scope's limit: one window, or several that must every one admit a job."""

    limit: LimitText | Annotated[list[LimitText], Field(min_length=1, max_length=MAX_WINDOWS)] = (
        Field(
            description=LIMIT_DESCRIPTION + " A list gives several windows of different periods "
            f'(at most {MAX_WINDOWS}), e.g. ["100/s", "10000/d"]: a job needs the tokens of each '
            "(a window given twice counts once).",
            examples=["100/s", ["100/s", "10000/d"]],
        )
    )
    burst: float | None = Field(
        None,
        ge=1,
        le=MAX_BURST,
        description="Bucket capacity (default: one period's tokens); of the first window.",
    )
    credit: float | None = Field(
        None,
        ge=0,
        le=MAX_BURST,
        description="Burst credits: tokens banked while the bucket is full, spent once it is "
        "empty (default: none); of the first window.",
    )


class SetLimitIn(_WindowsIn):
    """A scope's limit: one window, or several that must every one admit a job."""

    shadow: bool = Field(False, description="Decide and count, but never deny (dry run).")


class WindowOut(BaseModel):
    limit: str = Field(description='As written: "100/s", "10000/d".')
    rate: float
    per: float
    burst: float
    credit: float | None = None


class LimitOut(BaseModel):
    scope: str
    limit: str = Field(description='As written: "100/s", "6000/m", "5/2s" (the first window).')
    rate: float
    per: float
    burst: float
    rate_per_second: float
    shadow: bool
    credit: float | None = Field(None, description="Burst credits of the (first) window, if any.")
    windows: list[WindowOut] | None = Field(
        None, description="Every window, when the scope has several."
    )


class PreviewIn(_WindowsIn):
    """A proposed limit (as for PUT /limits: one window or several, burst, credit)."""

    window: float | None = Field(
        None,
        gt=0,
        le=MAX_RECORDING,
        description="Seconds of recorded traffic to replay (default: all kept; at most what "
        "recording keeps, else 409).",
    )


class RecordingIn(_Body):
    seconds: float = Field(
        ge=MIN_RECORDING, le=MAX_RECORDING, description="Seconds of traffic to keep for previews."
    )


class Version(BaseModel):
    version: int = Field(description="The configuration version after the change.")


class ExemptIn(_Body):
    mode: Literal["tenant", "all"] = Field(
        description='"tenant": skips its tenant caps; "all": the global and queue caps too.'
    )


class ConcurrencyIn(_Body):
    jobs: WholeNumber = Field(
        ge=1, le=MAX_CONCURRENCY, description="At most this many jobs of the scope at once."
    )


class ConcurrencyOut(BaseModel):
    scope: str
    cap: int = Field(description="Jobs of the scope allowed to run at once.")
    running: int | None = Field(
        description="Jobs holding a slot now; null for a default (each tenant counts its own)."
    )


class PauseIn(_Body):
    seconds: float = Field(
        gt=0, le=MAX_PAUSE, description="Admit nothing of the scope for this long (Redis clock)."
    )


class PauseOut(BaseModel):
    scope: str
    until_ms: int = Field(description="When the pause ends: ms since the epoch, Redis's clock.")
    remaining_s: float = Field(description="Seconds it still had to run when read.")


class ShadowIn(_Body):
    enabled: bool


class WeightIn(_Body):
    weight: float = Field(
        ge=MIN_WEIGHT, le=MAX_WEIGHT, description="Share of a contended budget (relative)."
    )


class BucketOut(BaseModel):
    scope: str
    limit_scope: str = Field(description="Where its limit comes from (e.g. tenant:*).")
    limit: LimitOut
    tokens: float
    burst: float
    fill: float
    wait_ms_for_one: float = Field(description="How long until one token is there.")
    updated_at_ms: float | None = Field(description="Last change of its state (Redis clock).")


class ErrorOut(BaseModel):
    """Every error this API answers with."""

    error: str = Field(
        description="The kind: ValidationError, InvalidLimit, InvalidName, InvalidScope, "
        "InvalidWeight, ConfigError, Unauthorized, Forbidden, LimitNotFound, Conflict, "
        "ContentTooLarge, BackendUnavailable.",
        examples=["InvalidLimit"],
    )
    detail: str = Field(description="What was wrong, and what to do about it.")


_ANSWERS = {
    400: "Bad input: a malformed body, a value out of range, an invalid name or limit.",
    401: "No valid bearer token.",
    403: "A change asked with the read-only token.",
    404: "Nothing is set there.",
    409: (
        "The namespace's state refuses it (recording is off, or keeps less than asked; "
        "a new pause while the most it may run already)."
    ),
    413: "A request body over 16 KiB, refused before it is read.",
    503: "Redis is unreachable.",
}
Answers = dict[int | str, dict[str, Any]]


def answers(*codes: int) -> Answers:
    """The error answers of a route: ``codes`` and, for every route, 401 and 503."""
    return {
        code: {"model": ErrorOut, "description": _ANSWERS[code]}
        for code in sorted({*codes, 401, 503})
    }


# What each kind of route can answer besides its success.
READS = answers()
READ_ONE = answers(400, 404)
WRITES = answers(400, 403, 413)
DELETES = answers(400, 403, 404)
