"""The admin HTTP API: see and change the limits of a namespace at run time.

    from queue_ratelimit import Limiter
    from queue_ratelimit.admin import create_app

    app = create_app(Limiter.from_url("redis://localhost:6379/0"), token="s3cret")
    # uvicorn.run(app) -- or: QUEUE_RATELIMIT_ADMIN_TOKEN=s3cret queue-ratelimit serve

Every change goes through the same versioned, audited path as ``Limiter.set_limit`` and the
CLI, so it applies to the next decision in every worker. Every route but ``/healthz`` wants
``Authorization: Bearer <token>``: the admin token for everything, or the read-only token
(``read_token``) for the ``GET`` routes alone (dashboards, Prometheus scrapes). The audit
log names the admin token that acted by a fingerprint, ``admin[<8 hex digits>]``, never the
token itself, and an ``X-Actor`` header adds who is changing things
(``admin[1a2b3c4d]:alice``). Errors come back as ``{"error": <kind>, "detail": <what to
fix>}``, with any input they quote cut short: 400 for bad input, 401 without a valid token,
403 for a change asked with the read-only token, 404 for an unknown scope, 413 for a body
over 16 KiB (refused before it is read), 422 for a body of the wrong shape, 503 while Redis
is unreachable (the served client waits at most its timeout: ``Limiter.from_url``), 500 when
Redis answers with an error (``BackendError``). Needs the ``admin`` extra (FastAPI).

Routes: ``/limits[/{scope}]`` (rate limits), ``/concurrency[/{scope}]`` (concurrency caps,
``{"jobs": n}``, with the jobs running under each), ``/exemptions/{tenant}``, ``/shadow``,
``/recording``, ``/weights/{kind}/{name}``, ``/scopes/{scope}``, ``/audit``, ``/snapshot``,
``/metrics``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from ._core import redis_errors
from ._decision import ScopeLimit, limit_fields
from ._errors import BackendError, BackendUnavailable, LimitNotFound, RateLimitError
from ._limit import Limit
from ._limiter import Limiter
from ._preview import preview_fields
from ._scheduler import MAX_WEIGHT, MIN_WEIGHT, FairScheduler
from ._scopes import _shown, check_name, scope_name
from .metrics import RateLimitCollector, bucket_state, snapshot

# Every body this API takes is a few dozen bytes; anything near this is an attack or a
# mistake, refused before it is read (a 40 KB limit text once held the server for 11 s).
MAX_BODY_BYTES = 16 * 1024


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LimitIn(_Body):
    limit: str = Field(description='Rate: "100/s", "6000/m", "10/h", "5/2s".', examples=["100/s"])
    burst: float | None = Field(None, description="Bucket capacity (default: one period).")
    shadow: bool = Field(False, description="Decide and count, but never deny (dry run).")


class LimitOut(BaseModel):
    scope: str
    limit: str = Field(description='As written: "100/s", "6000/m", "5/2s".')
    rate: float
    per: float
    burst: float
    rate_per_second: float
    shadow: bool


class PreviewIn(LimitIn):
    window: float | None = Field(
        None, gt=0, description="Seconds of recorded traffic to replay (default: all kept)."
    )


class RecordingIn(_Body):
    seconds: float = Field(description="Seconds of traffic to keep for previews (60-86400).")


class Version(BaseModel):
    version: int = Field(description="The configuration version after the change.")


class ExemptIn(_Body):
    mode: Literal["tenant", "all"] = Field(
        description='"tenant": skips its tenant caps; "all": the global and queue caps too.'
    )


class ConcurrencyIn(_Body):
    jobs: StrictInt = Field(description="At most this many jobs of the scope at once (1-1e6).")


class ConcurrencyOut(BaseModel):
    scope: str
    cap: int = Field(description="Jobs of the scope allowed to run at once.")
    running: int | None = Field(
        description="Jobs holding a slot now; null for a default (each tenant counts its own)."
    )


class ShadowIn(_Body):
    enabled: bool


class WeightIn(_Body):
    weight: float = Field(
        description=f"Share of a contended budget (relative), {MIN_WEIGHT:g} to {MAX_WEIGHT:g}."
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


def _limit_out(item: ScopeLimit) -> LimitOut:
    return LimitOut.model_validate(
        {"scope": item.scope, "rate_per_second": item.limit.rate_per_second, **limit_fields(item)}
    )


def fingerprint(token: str) -> str:
    """8 hex digits that tell one admin token from another in the audit log.

    Slow to compute (scrypt), and only 32 bits of it: whoever reads the audit log (the
    read-only token suffices) learns nothing that helps guess a token.
    """
    digest = hashlib.scrypt(
        token.encode(), salt=b"queue-ratelimit admin token", n=2**14, r=8, p=1, dklen=16
    )
    return digest.hex()[:8]


@dataclass(frozen=True, slots=True)
class _Tokens:
    """Who may do what: set on the app, read by the dependencies below."""

    admin: str | None
    read: str | None
    open: bool  # served without a token: every request acts as the admin
    admin_label: str  # the admin token's fingerprint, or "no-token"

    def role(self, credentials: HTTPAuthorizationCredentials | None) -> Literal["admin", "read"]:
        if self.open:
            return "admin"
        given = (credentials.credentials if credentials else "").encode()
        # Both compared every time, so the time taken tells nothing of which one matched.
        is_admin = self.admin is not None and hmac.compare_digest(given, self.admin.encode())
        is_read = self.read is not None and hmac.compare_digest(given, self.read.encode())
        if is_admin:
            return "admin"
        if is_read:
            return "read"
        raise _Unauthorized


# Annotations are resolved in this module's namespace (by FastAPI), so what they name lives here.
_bearer = HTTPBearer(auto_error=False)
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
WeightKind = Literal["tenant", "priority"]


def _tokens(request: Request) -> _Tokens:
    tokens: _Tokens = request.app.state.queue_ratelimit_tokens
    return tokens


def _reader(request: Request, credentials: Credentials) -> None:
    """Either token may read."""
    _tokens(request).role(credentials)


def _actor(
    request: Request, credentials: Credentials, x_actor: Annotated[str | None, Header()] = None
) -> str:
    """Only the admin token may change things; the audit log names it by its fingerprint,
    and the ``X-Actor`` header after it: ``admin[1a2b3c4d]:alice``, or ``admin[1a2b3c4d]``."""
    tokens = _tokens(request)
    if tokens.role(credentials) != "admin":
        raise _Forbidden
    who = f"admin[{tokens.admin_label}]"
    return f"{who}:{check_name('actor', x_actor)}" if x_actor else who


Actor = Annotated[str, Depends(_actor)]
Auth = Depends(_reader)


def _error(status: int, kind: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail}, status_code=status)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _validation_detail(exc: RequestValidationError) -> str:
    """FastAPI's validation errors in one short line: where, what, and the input cut short
    (its own reply would echo a 10 MB body back whole)."""
    errors = exc.errors()
    parts = []
    for error in errors[:5]:
        if error.get("type") == "json_invalid":
            reason = _cut(str(error.get("ctx", {}).get("error", "")), 80)
            parts.append(f"the body is not valid JSON: {reason} (at character {error['loc'][-1]})")
            continue
        # A location holds the names of the body's fields, which the client chose too.
        where = ".".join(_cut(str(part), 40) for part in error.get("loc", ()) if part != "body")
        text = f"{where or 'body'}: {_cut(str(error.get('msg', 'invalid')), 200)}"
        if error.get("type") != "missing" and "input" in error:
            text += f" (got {_shown(error['input'], 40)})"
        parts.append(text)
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    return "; ".join(parts) + more


class _BodyLimit:
    """Refuse a request body over ``MAX_BODY_BYTES`` with 413: at once when its
    Content-Length says so, else as soon as the bytes read pass it (a chunked body), before
    it is parsed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            await _too_large()(scope, receive, send)
            return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise _TooLarge()
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if started:
                raise
            await _too_large()(scope, receive, send)


def _too_large() -> JSONResponse:
    return _error(413, "ContentTooLarge", _TooLarge().detail)


def create_app(
    limiter: Limiter,
    *,
    token: str | None,
    read_token: str | None = None,
    allow_anonymous: bool = False,
    scheduler: FairScheduler | None = None,
) -> FastAPI:
    """The admin API over ``limiter``'s namespace.

    Args:
        token: the admin bearer token: every route but ``/healthz`` accepts it.
        read_token: a second token that only the ``GET`` routes accept (``/metrics``,
            ``/snapshot``, ``/limits``...): for Prometheus and dashboards, which then hold
            no power to change anything.
        allow_anonymous: serve without a token (only for a trusted, local setup); without
            it, a missing token is refused here rather than served open by accident.
        scheduler: the fair scheduler whose weights ``/weights`` changes (default: one on
            ``limiter``).
    """
    if not token and not allow_anonymous:
        raise ValueError("the admin API needs a token (or allow_anonymous=True, local only)")
    if token and read_token and hmac.compare_digest(token.encode(), read_token.encode()):
        raise ValueError("the read-only token must differ from the admin token")
    sched = scheduler or FairScheduler(limiter)
    app = FastAPI(
        title="queue-ratelimit admin",
        version=__version__,
        description=f"Limits of namespace {limiter.namespace!r}, changed at run time.",
    )
    app.state.queue_ratelimit_tokens = _Tokens(
        admin=token or None,
        read=read_token or None,
        open=not token,
        admin_label=fingerprint(token) if token else "no-token",
    )
    app.add_middleware(_BodyLimit)

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        response = _error(401, "Unauthorized", "send Authorization: Bearer <admin token>")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(_Forbidden)
    async def forbidden(request: Request, exc: _Forbidden) -> JSONResponse:
        detail = "the read-only token may only read (GET); changes need the admin token"
        return _error(403, "Forbidden", detail)

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, exc: _TooLarge) -> JSONResponse:
        return _too_large()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "ValidationError", _validation_detail(exc))

    @app.exception_handler(RateLimitError)
    async def rate_limit_error(request: Request, exc: RateLimitError) -> JSONResponse:
        if isinstance(exc, LimitNotFound):
            return _error(404, type(exc).__name__, str(exc).strip("'\""))
        if isinstance(exc, BackendUnavailable):
            return _error(503, type(exc).__name__, str(exc))
        if isinstance(exc, BackendError):  # broken data in Redis, not the request's fault
            return _error(500, type(exc).__name__, str(exc))
        return _error(400, type(exc).__name__, str(exc))

    @app.get("/healthz", summary="Redis reachable? Does it evict keys?")
    def healthz() -> dict[str, object]:
        with redis_errors():
            limiter.client.ping()
        # {"policy", "maxmemory", "evicting"}: an evicting Redis loses parked jobs and limits.
        eviction = limiter.eviction_status().as_dict()
        return {"status": "ok", "namespace": limiter.namespace, "eviction": eviction}

    @app.get("/limits", dependencies=[Auth], summary="Every configured limit")
    def list_limits() -> list[LimitOut]:
        with redis_errors():
            return [_limit_out(item) for item in limiter.limits().values()]

    @app.get("/limits/{scope}", dependencies=[Auth], summary="One scope's limit")
    def get_limit(scope: str) -> LimitOut:
        return _limit_out(limiter.get_limit(scope))

    @app.put("/limits/{scope}", dependencies=[Auth], summary="Set a scope's limit")
    def set_limit(scope: str, body: LimitIn, who: Actor) -> Version:
        limit = Limit.parse(body.limit, burst=body.burst)
        return Version(version=limiter.set_limit(scope, limit, shadow=body.shadow, actor=who))

    @app.post(
        "/limits/{scope}/preview",
        dependencies=[Auth],
        summary="What a proposed limit would have done to recorded traffic (changes nothing)",
    )
    def preview(
        scope: str, body: PreviewIn, top: Annotated[int, Query(ge=0, le=1000)] = 20
    ) -> dict[str, Any]:
        limit = Limit.parse(body.limit, burst=body.burst)
        return preview_fields(limiter.preview(scope, limit, window=body.window), top)

    @app.get("/recording", dependencies=[Auth], summary="Traffic recording for previews")
    def recording() -> dict[str, float | None]:
        return {"seconds": limiter.recording()}

    @app.put("/recording", dependencies=[Auth], summary="Record traffic for previews")
    def record(body: RecordingIn, who: Actor) -> Version:
        return Version(version=limiter.set_recording(body.seconds, actor=who))

    @app.delete("/recording", dependencies=[Auth], summary="Stop recording traffic")
    def stop_recording(who: Actor) -> Version:
        return Version(version=limiter.set_recording(None, actor=who))

    @app.delete("/limits/{scope}", dependencies=[Auth], summary="Remove a scope's limit")
    def delete_limit(scope: str, who: Actor) -> Version:
        return Version(version=limiter.delete_limit(scope, actor=who))

    def _cap_out(scope: str, cap: int) -> ConcurrencyOut:
        running = None if "*" in scope else limiter.running(scope)
        return ConcurrencyOut(scope=scope, cap=cap, running=running)

    @app.get("/concurrency", dependencies=[Auth], summary="Every concurrency cap")
    def list_concurrency() -> list[ConcurrencyOut]:
        with redis_errors():
            return [_cap_out(scope, cap) for scope, cap in limiter.concurrency().items()]

    @app.get("/concurrency/{scope}", dependencies=[Auth], summary="One scope's concurrency cap")
    def get_concurrency(scope: str) -> ConcurrencyOut:
        cap = limiter.get_concurrency(scope)
        if cap is None:
            raise LimitNotFound(f"conc:{scope}")
        return _cap_out(scope_name(scope), cap)

    @app.put("/concurrency/{scope}", dependencies=[Auth], summary="Cap a scope's running jobs")
    def set_concurrency(scope: str, body: ConcurrencyIn, who: Actor) -> Version:
        return Version(version=limiter.set_concurrency(scope, body.jobs, actor=who))

    @app.delete("/concurrency/{scope}", dependencies=[Auth], summary="Remove a concurrency cap")
    def delete_concurrency(scope: str, who: Actor) -> Version:
        return Version(version=limiter.set_concurrency(scope, None, actor=who))

    @app.get("/scopes/{scope}", dependencies=[Auth], summary="A scope's live bucket")
    def scope_state(scope: str) -> BucketOut:
        state = bucket_state(limiter, scope)
        return BucketOut(
            scope=state["scope"],
            limit_scope=state["limit"].scope,
            limit=_limit_out(state["limit"]),
            tokens=state["tokens"],
            burst=state["burst"],
            fill=state["fill"],
            wait_ms_for_one=state["wait_ms_for_one"],
            updated_at_ms=state["updated_at_ms"],
        )

    @app.get("/exemptions", dependencies=[Auth], summary="Exempt (VIP) tenants")
    def exemptions() -> dict[str, str]:
        with redis_errors():
            return dict(limiter.exemptions())

    @app.put("/exemptions/{tenant}", dependencies=[Auth], summary="Exempt a tenant")
    def exempt(tenant: str, body: ExemptIn, who: Actor) -> Version:
        return Version(version=limiter.set_exempt(tenant, body.mode, actor=who))

    @app.delete("/exemptions/{tenant}", dependencies=[Auth], summary="End an exemption")
    def unexempt(tenant: str, who: Actor) -> Version:
        return Version(version=limiter.set_exempt(tenant, None, actor=who))

    @app.put("/shadow", dependencies=[Auth], summary="Shadow (dry-run) mode for every scope")
    def shadow(body: ShadowIn, who: Actor) -> Version:
        return Version(version=limiter.set_shadow(body.enabled, actor=who))

    @app.get("/weights", dependencies=[Auth], summary="Fair-scheduling weights")
    def weights() -> dict[str, float]:
        with redis_errors():
            return sched.weights()

    def change_weight(kind: WeightKind, name: str, weight: float | None, who: str) -> Version:
        setter = sched.set_tenant_weight if kind == "tenant" else sched.set_priority_weight
        return Version(version=setter(name, weight, actor=who))

    @app.put("/weights/{kind}/{name}", dependencies=[Auth], summary="Set a weight")
    def set_weight(kind: WeightKind, name: str, body: WeightIn, who: Actor) -> Version:
        return change_weight(kind, name, body.weight, who)

    @app.delete("/weights/{kind}/{name}", dependencies=[Auth], summary="Back to the default")
    def delete_weight(kind: WeightKind, name: str, who: Actor) -> Version:
        return change_weight(kind, name, None, who)

    @app.get("/audit", dependencies=[Auth], summary="Recent configuration changes")
    def audit(count: Annotated[int, Query(ge=1, le=10_000)] = 100) -> list[dict[str, Any]]:
        with redis_errors():
            return [dataclasses.asdict(entry) for entry in limiter.audit_log(count=count)]

    @app.get("/snapshot", dependencies=[Auth], summary="Counters, buckets, backlogs")
    def snap() -> dict[str, Any]:
        with redis_errors():
            return snapshot(limiter)

    @app.get("/metrics", dependencies=[Auth], summary="Prometheus text format")
    def metrics() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(RateLimitCollector(limiter))
        with redis_errors():
            body = generate_latest(registry)
        return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)

    return app


class _Unauthorized(Exception):
    """A request without a valid token (answered 401)."""


class _Forbidden(Exception):
    """A change asked with the read-only token (answered 403)."""


class _TooLarge(HTTPException):
    """A request body read past ``MAX_BODY_BYTES`` (answered 413). An HTTPException, since
    FastAPI turns any other error raised while it reads a body into a 400."""

    def __init__(self) -> None:
        super().__init__(413, f"a request body may hold at most {MAX_BODY_BYTES} bytes")
