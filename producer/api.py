"""The HTTP API (FastAPI). It imports no torch: the producer only talks to Redis and storage."""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer.dispatcher import Dispatcher
from producer.schemas import BatchPublic, JobPublic, JobsPage, Submitted
from producer.submit import submit_batch
from shared.celery_app import make_celery
from shared.config import Settings
from shared.errors import InvalidJob, SdfarmError, UnknownId
from shared.jobs import BatchCreate, JobState, is_batch_id, is_job_id
from shared.ledger import Ledger
from shared.registry import live_workers
from shared.storage import Storage, open_storage

__all__ = ["create_app"]

log = logging.getLogger(__name__)


class Farm:
    """What every request needs, built once at startup."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url)
        self.ledger = Ledger(
            self.redis, status_ttl_s=settings.status_ttl_s, lease_s=settings.lease_s
        )
        self.storage: Storage = open_storage(
            settings.storage_url, endpoint_url=settings.s3_endpoint_url
        )
        self.celery = make_celery(settings)
        self.dispatcher = Dispatcher(settings, self.ledger, self.celery)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self.dispatcher.run, args=(self._stop,), name="dispatcher", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.redis.close()


def get_farm(request: Request) -> Farm:
    return request.app.state.farm  # type: ignore[no-any-return]


FarmDep = Annotated[Farm, Depends(get_farm)]


def authorized(f: FarmDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """Every /v1 route needs `Authorization: Bearer KEY` when keys are configured."""
    keys = f.settings.api_keys
    if not keys:
        return
    if not authorization or not authorization.startswith("Bearer "):
        raise _Http(401, "missing API key: send `Authorization: Bearer KEY`")
    given = authorization.removeprefix("Bearer ").strip().encode()
    # Compare with every key, in constant time, so timing reveals nothing.
    if not any(hmac.compare_digest(given, key.encode()) for key in keys):
        raise _Http(401, "wrong API key")


GUARDED = [Depends(authorized)]


def create_app(settings: Settings, *, run_dispatcher: bool = True) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        farm = Farm(settings)
        app.state.farm = farm
        if run_dispatcher:
            farm.start()
        yield
        farm.stop()

    app = FastAPI(
        title="sdfarm",
        version="0.1.0",
        lifespan=lifespan,
        description="A render farm for Stable Diffusion.",
    )
    _install_error_handlers(app)

    @app.get("/healthz")
    def healthz(f: FarmDep) -> dict[str, Any]:
        f.redis.ping()
        return {"ok": True, "dispatcher_active": f.dispatcher.active}

    @app.post("/v1/batches", status_code=201, dependencies=GUARDED, response_model=Submitted)
    def create_batch(body: BatchCreate, f: FarmDep) -> Submitted:
        submitted = submit_batch(f.ledger, f.settings, body.job_dicts())
        return Submitted(batch_id=submitted.batch_id, job_ids=submitted.job_ids)

    @app.get("/v1/batches/{batch_id}", dependencies=GUARDED, response_model=BatchPublic)
    def get_batch(batch_id: str, f: FarmDep) -> BatchPublic:
        _check_batch_id(batch_id)
        record = f.ledger.batch(batch_id)
        return BatchPublic(
            batch_id=batch_id,
            total=record["total"],
            counts=record["counts"],
            created_at=float(record["created_at"]),
            finished_at=float(record["finished_at"]) if "finished_at" in record else None,
        )

    @app.get("/v1/batches/{batch_id}/jobs", dependencies=GUARDED, response_model=JobsPage)
    def list_jobs(
        batch_id: str,
        f: FarmDep,
        cursor: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        state: JobState | None = None,
    ) -> JobsPage:
        _check_batch_id(batch_id)
        f.ledger.batch(batch_id)  # 404 for an unknown batch
        ids = f.ledger.batch_job_ids(batch_id, cursor, cursor + limit - 1)
        jobs = [_job_public(r) for r in f.ledger.jobs(ids) if r is not None]
        if state is not None:
            jobs = [j for j in jobs if j.state == state.value]
        next_cursor = cursor + len(ids) if len(ids) == limit else None
        return JobsPage(jobs=jobs, next_cursor=next_cursor)

    @app.get("/v1/jobs/{job_id}", dependencies=GUARDED, response_model=JobPublic)
    def get_job(job_id: str, f: FarmDep) -> JobPublic:
        _check_job_id(job_id)
        return _job_public(f.ledger.job(job_id))

    @app.get("/v1/jobs/{job_id}/image", dependencies=GUARDED, response_model=None)
    def get_image(job_id: str, f: FarmDep) -> Response:
        _check_job_id(job_id)
        record = f.ledger.job(job_id)
        if record["state"] != JobState.SUCCEEDED.value:
            raise _Http(
                409, f"job {job_id} is {record['state']}; its image exists once it has succeeded"
            )
        key = record["result"]["key"]
        url = f.storage.url(key, f.settings.presign_expiry_s)
        if url is None:
            return Response(f.storage.get(key), media_type="image/png")
        return RedirectResponse(url, status_code=307)

    @app.delete("/v1/jobs/{job_id}", dependencies=GUARDED)
    def cancel_job(job_id: str, f: FarmDep) -> dict[str, str]:
        _check_job_id(job_id)
        previous = f.ledger.request_cancel(job_id)
        return {"job_id": job_id, "state": f.ledger.job(job_id)["state"], "was": previous}

    @app.get("/v1/workers", dependencies=GUARDED)
    def workers(f: FarmDep) -> dict[str, Any]:
        return {"workers": live_workers(f.redis, f.ledger.keys)}

    return app


class _Http(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _check_batch_id(batch_id: str) -> None:
    if not is_batch_id(batch_id):
        raise _Http(
            404, f"no batch {batch_id[:40]!r}: batch ids look like b followed by 20 hex digits"
        )


def _check_job_id(job_id: str) -> None:
    if not is_job_id(job_id):
        raise _Http(404, f"no job {job_id[:40]!r}: job ids look like <batch id>-<number>")


def _job_public(record: dict[str, Any]) -> JobPublic:
    return JobPublic(
        job_id=record["job_id"],
        batch_id=record["batch_id"],
        state=record["state"],
        progress={
            "step": record.get("step", 0),
            "steps": record.get("steps", record["spec"]["steps"]),
        },
        spec=record["spec"],
        attempts=record.get("attempts", 0),
        worker=record.get("worker"),
        result=record.get("result"),
        timings=record.get("timings"),
        model_hash=record.get("model_hash") or None,
        error=record.get("error"),
        last_error=record.get("last_error"),
    )


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(_Http)
    async def http_error(request: Request, exc: _Http) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_default(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404:
            message = f"nothing at {request.url.path[:80]!r}; the routes are listed at /docs"
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(InvalidJob)
    async def invalid(request: Request, exc: InvalidJob) -> JSONResponse:
        return JSONResponse({"error": str(exc), "problems": exc.details}, status_code=422)

    @app.exception_handler(UnknownId)
    async def unknown(request: Request, exc: UnknownId) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(SdfarmError)
    async def other(request: Request, exc: SdfarmError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=503 if exc.retryable else 400)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {
                "field": ".".join(str(p) for p in err["loc"] if p != "body") or None,
                "message": err["msg"],
            }
            for err in exc.errors()
        ]
        first = problems[0] if problems else {"field": None, "message": "invalid request"}
        where = f"`{first['field']}`: " if first["field"] else ""
        return JSONResponse(
            {"error": f"{where}{first['message']}", "problems": problems}, status_code=422
        )

    @app.exception_handler(redis.RedisError)
    async def redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        log.warning("redis error on %s: %s", request.url.path, exc)
        return JSONResponse(
            {"error": "the job ledger (Redis) is unavailable; try again"}, status_code=503
        )
