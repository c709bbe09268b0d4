"""The HTTP API (FastAPI). It imports no torch: the producer only talks to Redis and storage.

Routes live in `routes_batches`, `routes_jobs`, `routes_uploads` and `routes_stats`; this module
builds the app: the farm built once at startup (`producer.farm.Farm`), the error shapes, the
dashboard's static page, /metrics, /healthz, and the refusal of API keys in query strings (URLs
end up in logs and histories).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from producer import routes_batches, routes_jobs, routes_stats, routes_uploads
from producer.farm import ApiError, CallerDep, Farm, FarmDep, known_query_only
from producer.metrics import render_metrics
from producer.schemas import Health, LoopHealth, errors
from producer.tenants import load_tenants
from shared.config import Settings
from shared.errors import BatchTooLarge, InvalidJob, LedgerFull, RateLimited, SdfarmError, UnknownId
from shared.problems import problems_from, summary

__all__ = ["create_app"]

log = logging.getLogger(__name__)

# Query parameters that look like credentials; a key there would be logged by every proxy.
_KEY_PARAMS = frozenset({"api_key", "apikey", "api-key", "key", "token", "access_token"})
_STATIC = {
    "app.js": "text/javascript",
    "chart.js": "text/javascript",
    "gallery.js": "text/javascript",
    "style.css": "text/css",
}


def create_app(
    settings: Settings, *, run_dispatcher: bool = True, run_background: bool = True
) -> FastAPI:
    """The API; `run_dispatcher` and `run_background` (finisher, webhooks) are for tests.

    Raises ConfigError at once for keys or a tenants file that cannot work, before anything
    serves.
    """
    tenants = load_tenants(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        farm = Farm(settings, tenants)
        app.state.farm = farm
        farm.start(dispatcher=run_dispatcher, background=run_background)
        yield
        farm.stop()

    app = FastAPI(
        title="sdfarm",
        version="0.1.0",
        lifespan=lifespan,
        description="A render farm for Stable Diffusion. Every /v1 route and /metrics need "
        "`Authorization: Bearer KEY` when the farm has keys (SDFARM_API_KEYS, SDFARM_ADMIN_KEYS, "
        "SDFARM_TENANTS_FILE). Each key belongs to a tenant, which sees only its own batches and "
        "jobs (another tenant's id is a 404, like a missing one); admin keys see all.",
        dependencies=[Depends(known_query_only)],
        responses=errors(422),
    )
    app.add_middleware(_RefuseKeysInQuery)
    _install_error_handlers(app)
    app.include_router(routes_batches.router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_uploads.router)
    app.include_router(routes_stats.router)
    dashboard = resources.files("producer") / "dashboard"
    page = (dashboard / "index.html").read_text(encoding="utf-8")
    static = {name: (dashboard / name).read_bytes() for name in _STATIC}

    @app.get("/", response_class=HTMLResponse, tags=["dashboard"])
    def index(f: FarmDep) -> HTMLResponse:
        """The dashboard: batches, a gallery of finished images, failures, workers."""
        return HTMLResponse(page, headers=_dashboard_headers(f))

    @app.get(
        "/dashboard/{name}",
        response_class=Response,
        tags=["dashboard"],
        responses={200: {"content": {"text/javascript": {}, "text/css": {}}}, **errors(404)},
    )
    def dashboard_file(name: str, f: FarmDep) -> Response:
        """The dashboard's script and style sheet."""
        if name not in static:
            raise ApiError(404, f"no dashboard file {name[:40]!r}")
        return Response(static[name], media_type=_STATIC[name], headers=_dashboard_headers(f))

    @app.get("/healthz", response_model=Health, responses={503: {"model": Health}})
    def healthz(f: FarmDep) -> Response:
        """Liveness: Redis answers and every background loop runs (503 when one stalled);
        needs no key."""
        f.ledger.stats.ping()
        loops = {name: LoopHealth(**vars(p.state())) for name, p in f.loops.items()}
        ok = all(loop.alive for loop in loops.values())
        health = Health(ok=ok, dispatcher_active=f.dispatcher.active, loops=loops)
        return JSONResponse(health.model_dump(), status_code=200 if ok else 503)

    @app.get(
        "/metrics",
        response_class=Response,
        tags=["metrics"],
        responses={
            200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
            **errors(400, 401, 503),
        },
    )
    def metrics(f: FarmDep, caller: CallerDep) -> Response:
        """Jobs by state, queue depth per model, render seconds, images/s per worker, failures;
        per-tenant series only for the caller's own tenant unless it is an admin."""
        body, content_type = render_metrics(f, caller)
        return Response(body, media_type=content_type)

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _dashboard_headers(farm: Farm) -> dict[str, str]:
    """The dashboard's own script, style and API only; images also from the store's presigned
    URLs (their origin, read off a URL presigned here) and `blob:` (file:// storage); never in a
    frame (clickjacking a cancel button), never content-sniffed."""
    if farm.dashboard_csp is None:
        probe = farm.storage.url("dashboard-csp-probe", 60)  # presigning is local, no request
        origin = urlsplit(probe) if probe else None
        images = f" {origin.scheme}://{origin.netloc}" if origin and origin.netloc else ""
        farm.dashboard_csp = (
            "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
            f"img-src 'self' blob:{images}; object-src 'none'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'"
        )
    return {
        "Content-Security-Policy": farm.dashboard_csp,
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
    }


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(routes_batches.submit_schemas())
        app.openapi_schema = schema
    return app.openapi_schema


class _RefuseKeysInQuery:
    """400 for any request with an API key in its query string: keys go in the header only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = scope.get("query_string", b"") if scope["type"] == "http" else b""
        if query:
            pairs = parse_qsl(query.decode("latin-1"), True)
            found = sorted({k.lower() for k, _ in pairs} & _KEY_PARAMS)
            if found:
                # The server's access log prints this scope's query: the key must not reach it.
                redacted = [(k, "REDACTED" if k.lower() in _KEY_PARAMS else v) for k, v in pairs]
                scope["query_string"] = urlencode(redacted).encode()
                message = (
                    f"refused: `{found[0]}` in the URL; send the key in the header "
                    "`Authorization: Bearer KEY`, never in a query string"
                )
                await JSONResponse({"error": message}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_default(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404:
            message = f"nothing at {request.url.path[:80]!r}; the routes are listed at /docs"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(InvalidJob)
    async def invalid(request: Request, exc: InvalidJob) -> JSONResponse:
        status = 413 if isinstance(exc, BatchTooLarge) else 422  # 413: over the ledger's budget
        return JSONResponse({"error": str(exc), "problems": exc.details}, status_code=status)

    @app.exception_handler(UnknownId)
    async def unknown(request: Request, exc: UnknownId) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(RateLimited)
    async def rate_limited(request: Request, exc: RateLimited) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after_s)}
        return JSONResponse({"error": str(exc)}, status_code=429, headers=headers)

    @app.exception_handler(LedgerFull)
    async def ledger_full(request: Request, exc: LedgerFull) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=507)  # nothing of the batch written

    @app.exception_handler(SdfarmError)
    async def other(request: Request, exc: SdfarmError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503 if exc.retryable else 400)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = problems_from(exc.errors(), skip=("body",))
        return JSONResponse({"error": summary(problems), "problems": problems}, status_code=422)

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis error on %s: %s", request.url.path, exc)
        return JSONResponse(
            {"error": "the job ledger (Redis) is unavailable; try again"}, status_code=503
        )
