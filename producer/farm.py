"""What every API request needs, built once at startup, and the key check in front of /v1
(which tenant is calling: `producer.tenants`).

`Farm` also runs the API process's background threads: the dispatcher (one active across the
farm), the finisher (manifests and webhooks of batches that ended) and the webhook sender, each
under `producer.loop_health.supervise`, whose pulses `/healthz` reports.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Annotated

from anyio import CapacityLimiter
from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from producer.dispatcher import Dispatcher
from producer.eta import QueueView
from producer.finisher import Finisher
from producer.loop_health import LoopPulse, supervise
from producer.tenants import OPEN, Caller, Tenants, load_tenants
from producer.webhooks import WebhookSender
from shared.celery_app import make_celery
from shared.config import Settings
from shared.families import model_facts
from shared.ledger import Ledger
from shared.lora_s3 import open_lora_library
from shared.redis_client import connect
from shared.storage import Storage, open_storage

__all__ = [
    "GUARDED",
    "ApiError",
    "CallerDep",
    "Farm",
    "FarmDep",
    "authorized",
    "get_farm",
    "known_query_only",
]

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An HTTP refusal with its status; the handler turns it into `{"error": message}`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class Farm:
    """The ledger, storage, Celery and background threads of one API process."""

    def __init__(self, settings: Settings, tenants: Tenants | None = None) -> None:
        self.settings = settings
        # Who may call, as which tenant (parsed once; create_app parses before it serves).
        self.tenants = tenants if tenants is not None else load_tenants(settings)
        self.redis = connect(settings)
        self.ledger = Ledger(
            self.redis,
            status_ttl_s=settings.status_ttl_s,
            lease_s=settings.lease_s,
            wait_replicas=settings.redis_wait_replicas,  # WAIT after each submit (0: never)
            wait_timeout_ms=settings.redis_wait_timeout_ms,
        )
        self.storage: Storage = open_storage(
            settings.storage_url,
            endpoint_url=settings.s3_endpoint_url,
            public_endpoint_url=settings.s3_public_endpoint_url,
        )
        self.celery = make_celery(settings)
        # Each model's native size, where its folder can be read here: a job's default size;
        # and its family, which says what may be its refiner.
        facts = model_facts(settings.models)
        self.native_sizes = {name: f.native_px for name, f in facts.items()}
        self.model_families = {name: f.family for name, f in facts.items()}
        # The LoRA library, listed now and again at a submit after its folder changed (an S3
        # library: after lora_list_interval_s).
        self.loras = open_lora_library(
            settings.lora_dir,
            endpoint_url=settings.s3_endpoint_url,
            list_interval_s=settings.lora_list_interval_s,
        )
        if self.loras is not None:
            self.loras.refresh()
        self.dispatcher = Dispatcher(
            settings, self.ledger, self.celery, weights=self.tenants.weights()
        )
        self.queue = QueueView(self.ledger, settings)
        self.finisher = Finisher(self.ledger, self.storage, settings)
        self.webhooks = WebhookSender(self.ledger, settings)
        # Submissions validate and write in these threads, never in the pool of the other
        # routes (anyio's default 40), which a burst of big submits would otherwise fill.
        self.ingest_limiter = CapacityLimiter(settings.ingest_threads)
        self.dashboard_csp: str | None = None  # built at the first page view (producer.api)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.loops: dict[str, LoopPulse] = {}  # the background loops running, by name

    def start(self, *, dispatcher: bool = True, background: bool = True) -> None:
        loops: list[tuple[str, Callable[[threading.Event], None]]] = []
        if dispatcher:
            loops.append(("dispatcher", self.dispatcher.run))
        if background:
            loops += [("finisher", self.finisher.run), ("webhooks", self.webhooks.run)]
        for name, loop in loops:  # each under `supervise`, beating its pulse (`/healthz`)
            pulse = self.loops[name] = LoopPulse(name, self.settings.loop_stall_s)
            pulse.thread = threading.Thread(
                target=supervise, args=(loop, pulse), name=name, daemon=True
            )
            pulse.thread.start()
            self._threads.append(pulse.thread)

    def stop(self) -> None:
        self._stop.set()
        for pulse in self.loops.values():
            pulse.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.ledger.close()

    def models_by_hash(self) -> dict[str, str]:
        """A1111 short hash -> model name, from the live workers' heartbeats: an infotext's
        `Model hash` finds its model here (`shared.infotext`)."""
        return {
            digest: name
            for record in self.ledger.workers.live()
            for name, digest in (record.get("model_hashes") or {}).items()
        }


# The dependencies below do no I/O, so they are `async def`: FastAPI runs a plain `def`
# dependency in its thread pool, a hand-off that cost more than the rest of a status request.


async def get_farm(request: Request) -> Farm:
    return request.app.state.farm  # type: ignore[no-any-return]


FarmDep = Annotated[Farm, Depends(get_farm)]

# Declared as a security scheme, so /openapi.json says how to authenticate.
_bearer = HTTPBearer(
    auto_error=False,
    description="An API key from SDFARM_API_KEYS, SDFARM_ADMIN_KEYS or the tenants file.",
)


async def authorized(
    f: FarmDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None,
) -> Caller:
    """Every /v1 route needs `Authorization: Bearer KEY` when keys are configured.

    Returns the caller: its tenant and role (what it may see, `producer.ownership`) and a short,
    stable scope for its key (idempotency keys are kept per key). A farm without keys is open:
    every caller is `tenants.OPEN`, an admin of tenant `default`.
    """
    if f.tenants.open:
        return OPEN
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise ApiError(
            401,
            "missing API key: send `Authorization: Bearer KEY`",
            {"WWW-Authenticate": "Bearer"},
        )
    caller = f.tenants.identify(credentials.credentials.strip())
    if caller is None:
        raise ApiError(401, "wrong API key", {"WWW-Authenticate": "Bearer"})
    return caller


CallerDep = Annotated[Caller, Depends(authorized)]
GUARDED = [Depends(authorized)]

_QUERY_NAMES: dict[tuple[str, str], frozenset[str]] = {}  # (path, methods) -> parameter names


async def known_query_only(request: Request) -> None:
    """Refuse query parameters a route does not take: a misspelt `limt=` is not ignored."""
    route = request.scope.get("route")
    if not request.query_params or not isinstance(route, APIRoute):
        return
    key = (route.path, ",".join(sorted(route.methods or ())))
    if key not in _QUERY_NAMES:
        _QUERY_NAMES[key] = frozenset(_query_names(route.dependant))
    unknown = sorted(set(request.query_params) - _QUERY_NAMES[key])
    if unknown:
        takes = ", ".join(sorted(_QUERY_NAMES[key])) or "none"
        raise ApiError(
            422, f"unknown query parameter {unknown[0][:40]!r}; {route.path} takes: {takes}"
        )


def _query_names(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names
