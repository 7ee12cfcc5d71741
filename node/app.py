"""The ASGI application: the route table, error rendering and start-up of storage and coordinator."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route

from coordinator.election import Election
from coordinator.kv import OutOfSpace
from coordinator.metadata import Conflict

from .accesslog import AccessLog
from .api import base, blobs, catalog, health, manifests, referrers, tags, uploads
from .audit import AuditIntent, AuditLog, AuditMiddleware
from .auth.middleware import AuthMiddleware
from .auth.services import AuthServices
from .config import Config
from .errors import RegistryError, Unsupported, error_response, handle_contention, handle_registry_error
from .headers import ConfiguredHeaders, PathPrefix
from .health import HealthChecks
from .maintenance import Maintenance
from .metrics import Metrics
from .readonly import ReadOnlyMiddleware
from .services import Services
from .space import handle_os_error, handle_out_of_space
from .store import open_kv, open_storage

log = logging.getLogger("wharf")

NAME = "/v2/{name:path}"

# The OCI Distribution endpoints, in the spec's order. Upload routes come before blob routes.
ROUTES = [
    Route("/v2/", base.version_check, methods=["GET"]),
    Route("/v2/_catalog", catalog.list_repositories, methods=["GET"]),
    Route(NAME + "/tags/list", tags.list_tags, methods=["GET"]),
    # HEAD before GET: a GET route also answers HEAD, and these HEADs have handlers of their own.
    Route(NAME + "/manifests/{reference}", manifests.head_manifest, methods=["HEAD"]),
    Route(NAME + "/manifests/{reference}", manifests.get_manifest, methods=["GET"]),
    Route(NAME + "/manifests/{reference}", manifests.put_manifest, methods=["PUT"]),
    Route(NAME + "/manifests/{reference}", manifests.delete_manifest, methods=["DELETE"]),
    Route(NAME + "/blobs/uploads/", uploads.start_upload, methods=["POST"]),
    Route(NAME + "/blobs/uploads/{uuid}", uploads.upload_status, methods=["GET"]),
    Route(NAME + "/blobs/uploads/{uuid}", uploads.patch_upload, methods=["PATCH"]),
    Route(NAME + "/blobs/uploads/{uuid}", uploads.finish_upload, methods=["PUT"]),
    Route(NAME + "/blobs/uploads/{uuid}", uploads.cancel_upload, methods=["DELETE"]),
    Route(NAME + "/blobs/{digest}", blobs.head_blob, methods=["HEAD"]),
    Route(NAME + "/blobs/{digest}", blobs.get_blob, methods=["GET"]),
    Route(NAME + "/blobs/{digest}", blobs.delete_blob, methods=["DELETE"]),
    Route(NAME + "/referrers/{digest}", referrers.list_referrers, methods=["GET"]),
]

# The requests that are decisions for the audit log, and what each decides on (its line's `object`:
# a manifest by tag is a "tag", an upload POST with ?mount= a "mount" and with ?digest= a "blob").
# Any other request gets an audit line only when a check refuses it (node/audit.py).
AUDITED = {
    manifests.get_manifest: "manifest",
    manifests.put_manifest: "manifest",
    manifests.delete_manifest: "manifest",
    uploads.start_upload: "upload",
    uploads.finish_upload: "blob",
    blobs.delete_blob: "blob",
}

# Probes for load balancers and orchestrators; they carry no registry data.
PROBE_ROUTES = [
    Route("/debug/health", health.health, methods=["GET", "HEAD"]),
    Route("/debug/ready", health.ready, methods=["GET", "HEAD"]),
]


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        # Each method has its own Route, so the allowed set is every route matching the path.
        allowed = sorted(
            {m for r in ROUTES + PROBE_ROUTES if r.matches(request.scope)[0] != Match.NONE for m in r.methods or ()}
        )
        error: RegistryError = Unsupported(
            {"method": request.method},
            message="method not allowed on this endpoint",
            headers={"Allow": ", ".join(allowed)},
        )
    else:
        error = Unsupported({"path": request.url.path[:200]}, message="unknown endpoint")
        error.status = exc.status_code
    return error_response(error, request.method)


def create_app(config: Config, *, services: Services | None = None) -> Starlette:
    """The registry app. With `services`, use them (tests); otherwise open them at start-up."""

    metrics = services.metrics if services is not None else Metrics()
    audit = AuditLog.open(config.audit, shared=config.http.workers > 1)
    auth = AuthServices.build(config)
    token_routes = auth.routes()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        owned = services is None
        svc = services or Services.build(config, await open_kv(config), open_storage(config), metrics)
        app.state.services = svc
        if audit is not None:
            await audit.attach(svc.kv, config.cluster.node or socket.gethostname())
        election = Election(svc.kv, "maintenance", svc.node_id, ttl=config.cluster.leasettl)
        election.on_change = lambda leading: metrics.leader.labels("maintenance").set(1 if leading else 0)
        app.state.election = election
        loop = asyncio.get_running_loop()
        # The read-only switch is read before serving, then followed by a watch.
        with contextlib.suppress(Exception):
            await svc.readonly.switch.refresh()
        health = app.state.health = HealthChecks.from_config(config.health, svc.storage)
        background = [
            loop.create_task(svc.readonly.switch.run()),
            loop.create_task(health.run()),
            loop.create_task(svc.space.run()),
        ]
        campaign = loop.create_task(election.run(Maintenance(svc).lead))
        try:
            yield
        finally:
            election.stop()
            for task in (campaign, *background):
                task.cancel()
            for task in (campaign, *background):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if audit is not None:
                await audit.detach()
            if owned:
                await svc.close()
            auth.close()
            if audit is not None:
                audit.close()

    app = Starlette(
        routes=ROUTES + PROBE_ROUTES + token_routes,
        lifespan=lifespan,
        exception_handlers={
            RegistryError: handle_registry_error,
            HTTPException: _http_error,
            Conflict: handle_contention,
            OutOfSpace: handle_out_of_space,
            OSError: handle_os_error,
        },
    )
    if services is not None:
        app.state.services = services
    app.state.metrics = metrics
    # Outermost last: access log, the audit line of each decision (authentication and read-only
    # mode refuse some), authentication, read-only refusals, then the `started` line of a change
    # just before its handler.
    if audit is not None:
        app.add_middleware(AuditIntent, audit=audit, routes=app.router.routes, decisions=AUDITED)
    app.add_middleware(ReadOnlyMiddleware)
    if auth.enabled:
        public = PROBE_ROUTES + token_routes
        app.add_middleware(AuthMiddleware, auth=auth, routes=app.router.routes, public=public)
    if audit is not None:
        app.add_middleware(AuditMiddleware, audit=audit, routes=app.router.routes, decisions=AUDITED)
    app.add_middleware(AccessLog, enabled=not config.log.accesslog.disabled, metrics=metrics)
    app.add_middleware(ConfiguredHeaders, headers=config.http.headers)
    if config.http.prefix:
        app.add_middleware(PathPrefix, prefix=config.http.prefix)
    return app
