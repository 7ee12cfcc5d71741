"""The ASGI application: the route table, error rendering and start-up of storage and coordinator."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp

from coordinator.election import Election
from coordinator.kv import OutOfSpace
from coordinator.metadata import Conflict

from . import routing
from .accesslog import AccessLog
from .api import base, blobs, catalog, health, manifests, referrers, repositories, tagdetails, tags, uploads, usage
from .audit import AuditIntent, AuditLog, AuditMiddleware
from .auth.middleware import AuthMiddleware
from .auth.services import AuthServices
from .config import Config
from .context import RequestContext
from .errors import (
    HandledErrors,
    RegistryError,
    Unsupported,
    error_response,
    handle_contention,
    handle_registry_error,
)
from .forwarded import ForwardedFor
from .headers import ConfiguredHeaders, PathPrefix
from .health import HealthChecks
from .maintenance import Maintenance
from .metrics import MULTIPROC_ENV, Metrics
from .proxy.middleware import MirrorPaths, ProxyMiddleware
from .readonly import ReadOnlyMiddleware
from .routing import Endpoint
from .services import Services
from .space import handle_os_error, handle_out_of_space
from .store import open_kv, open_storage
from .ui.pages import UI

log = logging.getLogger("wharf")

NAME = "/v2/{name:path}"
WHARF = "/wharf/v1"

# The OCI Distribution endpoints, in the spec's order, each with the access it needs and, for a
# decision, what its audit line decides on (a manifest by tag is logged as a "tag", an upload POST
# with ?mount= as a "mount" and with ?digest= as a "blob"; see node/audit.py). Upload routes come
# before blob routes; HEAD before GET, as a GET route also answers HEAD and these HEADs have
# handlers of their own.
ROUTES = [
    Endpoint("/v2/", base.version_check, "GET", access=routing.signed_in),
    Endpoint("/v2/_catalog", catalog.list_repositories, "GET", access=routing.catalog),
    Endpoint(NAME + "/tags/list", tags.list_tags, "GET", access=routing.pull),
    Endpoint(NAME + "/manifests/{reference}", manifests.head_manifest, "HEAD", access=routing.pull),
    Endpoint(NAME + "/manifests/{reference}", manifests.get_manifest, "GET", access=routing.pull, audit="manifest"),
    Endpoint(NAME + "/manifests/{reference}", manifests.put_manifest, "PUT", access=routing.push, audit="manifest"),
    Endpoint(
        NAME + "/manifests/{reference}", manifests.delete_manifest, "DELETE", access=routing.delete, audit="manifest"
    ),
    Endpoint(NAME + "/blobs/uploads/", uploads.start_upload, "POST", access=routing.push_or_mount, audit="upload"),
    Endpoint(NAME + "/blobs/uploads/{uuid}", uploads.upload_status, "GET", access=routing.push),
    Endpoint(NAME + "/blobs/uploads/{uuid}", uploads.patch_upload, "PATCH", access=routing.push),
    Endpoint(NAME + "/blobs/uploads/{uuid}", uploads.finish_upload, "PUT", access=routing.push, audit="blob"),
    Endpoint(NAME + "/blobs/uploads/{uuid}", uploads.cancel_upload, "DELETE", access=routing.push),
    Endpoint(NAME + "/blobs/{digest}", blobs.head_blob, "HEAD", access=routing.pull),
    Endpoint(NAME + "/blobs/{digest}", blobs.get_blob, "GET", access=routing.pull),
    Endpoint(NAME + "/blobs/{digest}", blobs.delete_blob, "DELETE", access=routing.delete, audit="blob"),
    Endpoint(NAME + "/referrers/{digest}", referrers.list_referrers, "GET", access=routing.pull),
    # Wharf's own API: what is stored (tag details, storage figures) and whole-repository deletes. The
    # handlers of a namespace (and of the registry's figures) check the caller's rights on every
    # repository concerned once they know them, as `_catalog` filters by them.
    Endpoint(WHARF + "/repositories/{name:path}/tags", tagdetails.list_tag_details, "GET", access=routing.pull),
    Endpoint(WHARF + "/repositories/{name:path}/usage", usage.repository_usage, "GET", access=routing.pull),
    Endpoint(
        WHARF + "/repositories/{name:path}",
        repositories.delete_repository,
        "DELETE",
        access=routing.push_and_delete,
        audit="repository",
    ),
    Endpoint(WHARF + "/namespaces/{namespace:path}/usage", usage.namespace_usage, "GET", access=routing.catalog),
    Endpoint(
        WHARF + "/namespaces/{namespace:path}",
        repositories.delete_namespace,
        "DELETE",
        access=routing.signed_in,
        audit="namespace",
    ),
    Endpoint(WHARF + "/usage", usage.registry_usage, "GET", access=routing.catalog),
]

# Probes for load balancers and orchestrators; they carry no registry data.
PROBE_ROUTES = [
    Route("/", health.alive, methods=["GET", "HEAD"]),
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


# The collector's first generation is collected after this many new objects (Python's default: 700).
_GC_YOUNG_THRESHOLD = 20_000


def _settle_memory() -> None:
    """Once a server process has started: what start-up made (modules, configuration, clients) is
    collected once and then frozen, so that collections no longer walk it, and the young generation
    is collected less often. A request makes a few hundred objects that nearly all die young; with
    Python's defaults the collector took ~12% of a manifest GET, most of it re-walking start-up's
    objects."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(_GC_YOUNG_THRESHOLD, middle, old)


class _RegistryApp(Starlette):
    """Starlette with fewer layers per request. The request context (node/context.py), the outermost
    registry middleware, already answers anything unhandled with the last-chance 500 and logs it,
    so Starlette's ServerErrorMiddleware (another send wrapper and handler on every request) is left
    out; the exception handlers sit around the router in HandledErrors, where Starlette's
    ExceptionMiddleware would."""

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = HandledErrors(self.router, self.exception_handlers)
        for cls, args, kwargs in reversed(self.user_middleware):
            app = cls(app, *args, **kwargs)
        return app


def create_app(config: Config, *, services: Services | None = None, serving: bool = False) -> Starlette:
    """The registry app. With `services`, use them (tests); otherwise open them at start-up.

    `serving`: the app is a server process's only app (`wharf serve`): once started, the objects
    made so far are kept out of the garbage collector's scans (see `_settle_memory`).
    """

    metrics = services.metrics if services is not None else Metrics()
    audit = AuditLog.open(config.audit, shared=config.http.workers > 1)
    auth = AuthServices.build(config)
    token_routes = auth.routes()
    ui_routes = UI(config, auth).routes()

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
        # Upload URLs are signed with a key the coordinator keeps for every node: made before the
        # first request, so that a refused one never writes it (an unreachable coordinator: later).
        with contextlib.suppress(Exception):
            await svc.uploader.states.ready()
        health = app.state.health = HealthChecks.from_config(
            config.health, svc.storage, publish=os.environ.get(MULTIPROC_ENV) or None
        )
        maintenance = Maintenance(svc)
        background = [
            loop.create_task(svc.readonly.switch.run()),
            loop.create_task(health.run()),
            loop.create_task(svc.pulls.run()),
            loop.create_task(svc.space.run()),
            loop.create_task(maintenance.work()),
        ]
        if svc.proxy.enabled:
            background.append(loop.create_task(svc.proxy.run()))
        campaign = loop.create_task(election.run(maintenance.lead))
        if serving:
            _settle_memory()
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
            else:
                with contextlib.suppress(Exception):
                    await svc.pulls.flush()
            auth.close()
            if audit is not None:
                audit.close()

    app = _RegistryApp(
        lifespan=lifespan,
        exception_handlers={
            RegistryError: handle_registry_error,
            HTTPException: _http_error,
            Conflict: handle_contention,
            OutOfSpace: handle_out_of_space,
            OSError: handle_os_error,
        },
    )
    # A request's route is found through an index of the table rather than by trying each in turn.
    app.router = routing.IndexedRouter(ROUTES + PROBE_ROUTES + token_routes + ui_routes, lifespan=lifespan)
    if services is not None:
        app.state.services = services
    app.state.metrics = metrics
    # Outermost last: access log, the audit line of each decision (authentication and read-only
    # mode refuse some), authentication, read-only refusals, the pull-through cache's refusal of
    # writes to cached repositories, then the `started` line of a change just before its handler.
    if audit is not None:
        app.add_middleware(AuditIntent, audit=audit, routes=app.router.routes)
    if config.proxy.enabled:
        app.add_middleware(ProxyMiddleware, routes=app.router.routes)
    app.add_middleware(ReadOnlyMiddleware)
    if auth.enabled:
        # The web pages sign people in themselves (node/ui/session.py), by the same access rules.
        public = PROBE_ROUTES + token_routes + ui_routes
        app.add_middleware(AuthMiddleware, auth=auth, routes=app.router.routes, public=public)
    if audit is not None:
        app.add_middleware(AuditMiddleware, audit=audit, routes=app.router.routes)
    app.add_middleware(
        RequestContext,
        observers=[AccessLog(enabled=not config.log.accesslog.disabled, metrics=metrics)],
        headers=ConfiguredHeaders(config.http.headers),
    )
    if config.proxy.upstreams:
        app.add_middleware(MirrorPaths, prefixes=[u.prefix for u in config.proxy.caches])
    if config.http.prefix:
        app.add_middleware(PathPrefix, prefix=config.http.prefix)
    if config.http.proxies:
        app.add_middleware(ForwardedFor, proxies=config.http.proxies)
    return app
