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
fix>}``, with any input they quote cut short: 400 for any bad input (a malformed body, a
value out of range, an invalid name or limit), 401 without a valid token, 403 for a change
asked with the read-only token, 404 for something that is not set (a ``GET`` or a
``DELETE`` of it: a delete never answers 200 for nothing), 409 for a preview the namespace's
state refuses (recording off, or a window longer than it keeps) and for a new pause while
the namespace runs the most pauses it may (``TooManyPauses``), 413 for a body over 16 KiB
(refused before it is read), 503 while Redis is unreachable (the served client waits at
most its timeout: ``Limiter.from_url``), 500 when Redis answers with an error
(``BackendError``: broken data, not the request's fault). Names may hold ``/``
(``/limits/tenant:a/b``, or ``%2F``). The OpenAPI document (``/openapi.json``) states each
route's answers and every pattern and range; ``/docs`` (Swagger UI) and ``/redoc`` are served
from the package, so they work offline. Needs the ``admin`` extra (FastAPI).

Routes: ``/limits[/{scope}]`` (rate limits), ``/concurrency[/{scope}]`` (concurrency caps,
``{"jobs": n}``, with the jobs running under each), ``/exemptions/{tenant}``, ``/shadow``,
``/recording``, ``/weights/{kind}/{name}``, ``/scopes/{scope}``, ``/audit``, ``/snapshot``,
``/metrics``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.types import DecoratedCallable
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from ._admin_models import (
    DELETES,
    READ_ONE,
    READS,
    WRITES,
    ActorHeader,
    Answers,
    BucketOut,
    CapScopePath,
    ConcreteScopePath,
    ConcurrencyIn,
    ConcurrencyOut,
    CountQuery,
    ExemptIn,
    LimitOut,
    PauseIn,
    PauseOut,
    PreviewIn,
    PriorityPath,
    RecordingIn,
    ScopePath,
    SetLimitIn,
    ShadowIn,
    TenantPath,
    TenantWeightPath,
    TopQuery,
    Version,
    WeightIn,
    answers,
)
from ._core import redis_errors
from ._decision import Pause, ScopeLimit, limit_fields
from ._errors import (
    BackendError,
    BackendUnavailable,
    LimitNotFound,
    RateLimitError,
    TooManyPauses,
)
from ._limit import Limit
from ._limiter import Limiter
from ._preview import RECORD_FIELD, preview_fields
from ._scheduler import FairScheduler
from ._scopes import _shown, check_name, scope_name
from .metrics import RateLimitCollector, bucket_state, snapshot


class _Name(PathConvertor):
    """A name or scope in a path: anything up to the end, ``/`` and line breaks included
    (Starlette's ``path`` stops at a line break, and the route would be a bare 404), so
    that the library's own check answers a bad one with 400 and a reason."""

    regex = r"[\s\S]*"


register_url_convertor("name", _Name())

# Every body this API takes is a few dozen bytes; anything near this is an attack or a
# mistake, refused before it is read (a 40 KB limit text once held the server for 11 s).
MAX_BODY_BYTES = 16 * 1024


def _set_limit_value(body: SetLimitIn | PreviewIn) -> Limit | list[Limit]:
    """The limit (or windows) a PUT /limits body asks for (InvalidLimit, 400, when not one):
    ``burst`` and ``credit`` are the first window's; a window given twice (the same rate
    and period, however spelt) counts once, so every body the schema admits is taken."""
    texts = [body.limit] if isinstance(body.limit, str) else body.limit
    first = Limit.parse(texts[0], burst=body.burst, credit=body.credit)
    if isinstance(body.limit, str):
        return first
    windows = {(first.rate, first.per): first}
    for text in texts[1:]:
        window = Limit.parse(text)
        windows.setdefault((window.rate, window.per), window)
    return list(windows.values())


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


def _tokens(request: Request) -> _Tokens:
    tokens: _Tokens = request.app.state.queue_ratelimit_tokens
    return tokens


def _reader(request: Request, credentials: Credentials) -> None:
    """Either token may read."""
    _tokens(request).role(credentials)


def _actor(request: Request, credentials: Credentials, x_actor: ActorHeader = None) -> str:
    """Only the admin token may change things; the audit log names it by its fingerprint,
    and the ``X-Actor`` header after it: ``admin[1a2b3c4d]:alice``, or ``admin[1a2b3c4d]``."""
    tokens = _tokens(request)
    if tokens.role(credentials) != "admin":
        raise _Forbidden
    who = f"admin[{tokens.admin_label}]"
    # An empty header is a mistake like any other bad name, not "no actor".
    return who if x_actor is None else f"{who}:{check_name('actor', x_actor)}"


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
    app = _offline_app(
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
    _add_error_handlers(app)
    _document_errors_only_as_sent(app)
    route = _Routes(app)

    @app.get("/healthz", summary="Redis reachable? Does it evict keys?", responses=answers())
    def healthz() -> dict[str, object]:
        with redis_errors():
            limiter.client.ping()
        # {"policy", "maxmemory", "evicting"}: an evicting Redis loses parked jobs and limits.
        eviction = limiter.eviction_status().as_dict()
        return {"status": "ok", "namespace": limiter.namespace, "eviction": eviction}

    # (credit and windows appear only where set: a plain limit reads as it always did.)
    @route.get("/limits", "Every configured limit", READS, response_model_exclude_none=True)
    def list_limits() -> list[LimitOut]:
        with redis_errors():
            return [_limit_out(item) for item in limiter.limits().values()]

    @route.get("/limits/{scope:name}", "One scope's limit", response_model_exclude_none=True)
    def get_limit(scope: ScopePath) -> LimitOut:
        return _limit_out(limiter.get_limit(scope))

    @route.put("/limits/{scope:name}", "Set a scope's limit")
    def set_limit(scope: ScopePath, body: SetLimitIn, who: Actor) -> Version:
        limit = _set_limit_value(body)
        return Version(version=limiter.set_limit(scope, limit, shadow=body.shadow, actor=who))

    @route.post(
        "/preview/{scope:name}",
        "What a proposed limit would have done to recorded traffic (changes nothing)",
        answers(400, 409, 413),
    )
    def preview(scope: ScopePath, body: PreviewIn, top: TopQuery = 20) -> dict[str, Any]:
        name = scope_name(scope)
        limit = _set_limit_value(body)
        _check_recording(limiter, body.window)
        return preview_fields(limiter.preview(name, limit, window=body.window), top)

    @route.get("/recording", "Traffic recording for previews", READS)
    def recording() -> dict[str, float | None]:
        return {"seconds": limiter.recording()}

    @route.put("/recording", "Record traffic for previews")
    def record(body: RecordingIn, who: Actor) -> Version:
        return Version(version=limiter.set_recording(body.seconds, actor=who))

    @route.delete("/recording", "Stop recording traffic")
    def stop_recording(who: Actor) -> Version:
        return _deleted(limiter.set_recording(None, actor=who), RECORD_FIELD)

    @route.delete("/limits/{scope:name}", "Remove a scope's limit")
    def delete_limit(scope: ScopePath, who: Actor) -> Version:
        return Version(version=limiter.delete_limit(scope, actor=who))

    def _cap_out(scope: str, cap: int) -> ConcurrencyOut:
        running = None if "*" in scope else limiter.running(scope)
        return ConcurrencyOut(scope=scope, cap=cap, running=running)

    @route.get("/concurrency", "Every concurrency cap", READS)
    def list_concurrency() -> list[ConcurrencyOut]:
        with redis_errors():
            return [_cap_out(scope, cap) for scope, cap in limiter.concurrency().items()]

    @route.get("/concurrency/{scope:name}", "One scope's concurrency cap")
    def get_concurrency(scope: CapScopePath) -> ConcurrencyOut:
        cap = limiter.get_concurrency(scope)
        if cap is None:
            raise LimitNotFound(f"conc:{scope}")
        return _cap_out(scope_name(scope), cap)

    @route.put("/concurrency/{scope:name}", "Cap a scope's running jobs")
    def set_concurrency(scope: CapScopePath, body: ConcurrencyIn, who: Actor) -> Version:
        return Version(version=limiter.set_concurrency(scope, body.jobs, actor=who))

    @route.delete("/concurrency/{scope:name}", "Remove a concurrency cap")
    def delete_concurrency(scope: CapScopePath, who: Actor) -> Version:
        return Version(version=limiter.set_concurrency(scope, None, actor=who))

    def _pause_out(pause: Pause) -> PauseOut:
        return PauseOut(scope=pause.scope, until_ms=pause.until_ms, remaining_s=pause.remaining)

    @route.get("/pauses", "Paused scopes (nothing admitted until their end)", READS)
    def list_pauses() -> list[PauseOut]:
        with redis_errors():
            return [_pause_out(p) for p in limiter.pauses().values()]

    @route.put(
        "/pauses/{scope:name}",
        "Pause a scope (a downstream's 429): only ever lengthened",
        # 409: a new pause while the namespace runs the most it may (TooManyPauses).
        responses=answers(400, 403, 409, 413),
    )
    def pause(scope: ConcreteScopePath, body: PauseIn, who: Actor) -> PauseOut:
        return _pause_out(limiter.pause(scope, body.seconds, actor=who))

    @route.delete("/pauses/{scope:name}", "End a pause now")
    def resume(scope: ConcreteScopePath, who: Actor) -> dict[str, bool]:
        if not limiter.resume(scope, actor=who):
            raise LimitNotFound(f"pause:{scope}")
        return {"resumed": True}

    @route.get("/scopes/{scope:name}", "A scope's live bucket")
    def scope_state(scope: ConcreteScopePath) -> BucketOut:
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

    @route.get("/exemptions", "Exempt (VIP) tenants", READS)
    def exemptions() -> dict[str, str]:
        with redis_errors():
            return dict(limiter.exemptions())

    @route.put("/exemptions/{tenant:name}", "Exempt a tenant")
    def exempt(tenant: TenantPath, body: ExemptIn, who: Actor) -> Version:
        return Version(version=limiter.set_exempt(tenant, body.mode, actor=who))

    @route.delete("/exemptions/{tenant:name}", "End an exemption")
    def unexempt(tenant: TenantPath, who: Actor) -> Version:
        return _deleted(limiter.set_exempt(tenant, None, actor=who), f"exempt:{tenant}")

    @route.put("/shadow", "Shadow (dry-run) mode for every scope")
    def shadow(body: ShadowIn, who: Actor) -> Version:
        return Version(version=limiter.set_shadow(body.enabled, actor=who))

    @route.get("/weights", "Fair-scheduling weights", READS)
    def weights() -> dict[str, float]:
        with redis_errors():
            return sched.weights()

    _weight_routes(route, "tenant", TenantWeightPath, sched.set_tenant_weight)
    _weight_routes(route, "priority", PriorityPath, sched.set_priority_weight)

    @route.get("/audit", "Recent configuration changes", answers(400))
    def audit(count: CountQuery = 100) -> list[dict[str, Any]]:
        with redis_errors():
            return [dataclasses.asdict(entry) for entry in limiter.audit_log(count=count)]

    @route.get("/snapshot", "Counters, buckets, backlogs", READS)
    def snap() -> dict[str, Any]:
        with redis_errors():
            return snapshot(limiter)

    @route.get("/metrics", "Prometheus text format", READS, response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        registry = CollectorRegistry()
        registry.register(RateLimitCollector(limiter))
        with redis_errors():
            body = generate_latest(registry)
        return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)

    return app


class _Routes:
    """The routes' decorators: every route here wants a token (``Auth``: either one; a
    change also names the admin token through ``Actor``), and each kind of route documents
    the errors it can answer (a read of one thing READ_ONE, a change WRITES, a delete
    DELETES)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def get(
        self, path: str, summary: str, responses: Answers = READ_ONE, **kw: Any
    ) -> Callable[[DecoratedCallable], DecoratedCallable]:
        return self.app.get(path, dependencies=[Auth], summary=summary, responses=responses, **kw)

    def post(
        self, path: str, summary: str, responses: Answers
    ) -> Callable[[DecoratedCallable], DecoratedCallable]:
        return self.app.post(path, dependencies=[Auth], summary=summary, responses=responses)

    def put(
        self, path: str, summary: str, name: str | None = None, responses: Answers = WRITES
    ) -> Callable[[DecoratedCallable], DecoratedCallable]:
        return self.app.put(
            path, dependencies=[Auth], summary=summary, responses=responses, name=name
        )

    def delete(
        self, path: str, summary: str, name: str | None = None
    ) -> Callable[[DecoratedCallable], DecoratedCallable]:
        return self.app.delete(
            path, dependencies=[Auth], summary=summary, responses=DELETES, name=name
        )


def _weight_routes(
    route: _Routes, kind: str, name_type: object, setter: Callable[..., int]
) -> None:
    """PUT and DELETE ``/weights/<kind>/{name}``: a tenant's or a priority's weight, each
    kind with its own name pattern."""

    def set_weight(name: str, body: WeightIn, who: Actor) -> Version:
        return Version(version=setter(name, body.weight, actor=who))

    def delete_weight(name: str, who: Actor) -> Version:
        return Version(version=setter(name, None, actor=who))

    for endpoint in (set_weight, delete_weight):
        endpoint.__annotations__["name"] = name_type  # FastAPI documents and reads it
    path = f"/weights/{kind}/{{name:name}}"
    route.put(path, f"Set a {kind}'s weight", name=f"set_{kind}")(set_weight)
    route.delete(path, f"A {kind}'s weight back to the default", name=f"delete_{kind}")(
        delete_weight
    )


def _offline_app(**kwargs: Any) -> FastAPI:
    """A FastAPI app whose ``/docs`` (Swagger UI) and ``/redoc`` load their scripts and
    styles from this server (the fastapi-offline package ships them), not from a CDN: the
    pages work on a network with no way out."""
    from fastapi_offline import FastAPIOffline

    app: FastAPI = FastAPIOffline(**kwargs)
    return app


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as ``{"error": <kind>, "detail": <what to fix>}``, with one status per
    kind of mistake (bad input is 400, however it is bad)."""

    @app.exception_handler(_Unauthorized)
    async def unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        response = _error(401, "Unauthorized", "send Authorization: Bearer <admin token>")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response

    @app.exception_handler(_Forbidden)
    async def forbidden(request: Request, exc: _Forbidden) -> JSONResponse:
        detail = "the read-only token may only read (GET); changes need the admin token"
        return _error(403, "Forbidden", detail)

    @app.exception_handler(_Conflict)
    async def conflict(request: Request, exc: _Conflict) -> JSONResponse:
        return _error(409, "Conflict", str(exc))

    @app.exception_handler(_TooLarge)
    async def too_large(request: Request, exc: _TooLarge) -> JSONResponse:
        return _too_large()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # FastAPI's and Starlette's own: no route (404), a body it cannot read (400), a
        # method the path does not take (405, with every method the path does take).
        kind = HTTPStatus(exc.status_code).phrase.replace(" ", "")
        response = _error(exc.status_code, kind, str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:
            response.headers["Allow"] = ", ".join(_methods_at(app, request.scope))
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "ValidationError", _validation_detail(exc))

    @app.exception_handler(RateLimitError)
    async def rate_limit_error(request: Request, exc: RateLimitError) -> JSONResponse:
        if isinstance(exc, LimitNotFound):
            return _error(404, type(exc).__name__, str(exc))
        if isinstance(exc, BackendUnavailable):
            return _error(503, type(exc).__name__, str(exc))
        if isinstance(exc, BackendError):  # broken data in Redis, not the request's fault
            return _error(500, type(exc).__name__, str(exc))
        if isinstance(exc, TooManyPauses):  # a sound request the namespace's state refuses
            return _error(409, type(exc).__name__, str(exc))
        return _error(400, type(exc).__name__, str(exc))


def _document_errors_only_as_sent(app: FastAPI) -> None:
    """FastAPI documents a 422 for every route with parameters; this API answers bad input
    with 400 (documented per route), so the 422s and their schemas are left out."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
            for path in schema["paths"].values():
                for operation in path.values():
                    responses = operation.get("responses", {})
                    responses.pop("422", None)
                    for status, response in responses.items():
                        if status.startswith(("4", "5")):  # JSON, whatever the route sends
                            response["content"] = error
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _methods_at(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at the request's path."""
    methods: set[str] = set()
    for route in app.routes:
        if isinstance(route, APIRoute) and route.matches(scope)[0] != Match.NONE:
            methods |= route.methods or set()
    return sorted(methods)


def _check_recording(limiter: Limiter, window: float | None) -> None:
    """A preview needs recording on, keeping at least ``window`` seconds: else 409 (the
    request is sound; the namespace's state refuses it)."""
    kept = limiter.recording()
    if kept is None:
        raise _Conflict(
            "traffic is not being recorded, so there is nothing to preview a change on: "
            'PUT /recording {"seconds": 900} and preview once it has seen the traffic'
        )
    if window is not None and window > kept:
        raise _Conflict(f"recording keeps {kept:g} s; ask for a window of at most that")


def _deleted(version: int, what: str) -> Version:
    """A delete's answer: 404 when there was nothing to delete (the config script changes
    nothing then and answers version 0), as for every other delete."""
    if not version:
        raise LimitNotFound(what)
    return Version(version=version)


class _Unauthorized(Exception):
    """A request without a valid token (answered 401)."""


class _Forbidden(Exception):
    """A change asked with the read-only token (answered 403)."""


class _Conflict(Exception):
    """A sound request that the namespace's state refuses (answered 409)."""


class _TooLarge(HTTPException):
    """A request body read past ``MAX_BODY_BYTES`` (answered 413). An HTTPException, since
    FastAPI turns any other error raised while it reads a body into a 400."""

    def __init__(self) -> None:
        super().__init__(413, f"a request body may hold at most {MAX_BODY_BYTES} bytes")
