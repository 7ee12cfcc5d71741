"""Liveness and readiness for load balancers: /, /debug/health and /debug/ready."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
from collections.abc import Awaitable

from starlette.requests import Request
from starlette.responses import Response

from ..config import Config
from ..health import HealthChecks
from ..storage import layout
from .request import services

_CHECK_TIMEOUT = 3.0


def _installed_version() -> str:
    try:
        return importlib.metadata.version("wharf")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


_VERSION = _installed_version()


def drain_file(config: Config) -> str | None:
    """The file whose presence makes readiness fail, so load balancers stop sending new requests
    while the node finishes those it has: the configuration file's path plus `.drain`."""
    return config.source + ".drain" if config.source else None


async def alive(request: Request) -> Response:
    """`/`: 200 and nothing else, as registry:2 answers it; orchestrators' probes written for it ask here."""
    return Response(b"", headers={"Cache-Control": "no-cache"})


async def health(request: Request) -> Response:
    """The process serves requests; the body names the Wharf version it runs."""
    return Response(json.dumps({"version": _VERSION}).encode(), media_type="application/json")


async def ready(request: Request) -> Response:
    """Storage and coordinator both answer, every configured health check passes and the node is not
    draining: this node can serve registry traffic. With `health.storagedriver` on, storage health
    is that check's (with its threshold) rather than a probe per request."""
    svc = services(request)
    periodic: HealthChecks | None = getattr(request.app.state, "health", None)
    probes: list[tuple[str, Awaitable[object]]] = [("coordinator", svc.kv.ping())]
    if svc.regions is None and (periodic is None or not periodic.storage_checked):
        probes.append(("storage", svc.storage.stat(layout.ROOT + "/ready")))
    checks: dict[str, str] = {}
    if svc.regions is not None:
        # The probes that decide where pulls read from (every node probes every region's storage
        # every few seconds): answered at once, so a load balancer's check never waits on a storage.
        own = svc.regions.own
        checks["storage"] = "ok" if own.up else own.error
    for name, probe in probes:
        try:
            await asyncio.wait_for(probe, _CHECK_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"{type(exc).__name__}: {exc}"[:200]
    if periodic is not None:
        checks.update(periodic.states())
    drain = drain_file(svc.config)
    if drain is not None and os.path.exists(drain):  # one stat of a local file
        checks["drain"] = f"draining: {drain} exists"
    failing = {name for name, state in checks.items() if state != "ok"}
    # Read-only nodes (switched, or out of space) still serve pulls: ready, and saying so.
    body: dict[str, object] = {
        **checks,
        "readonly": svc.space.readonly() or svc.readonly.describe(),
        "coordinator_space": svc.space.describe(),
    }
    if svc.regions is not None:
        body["regions"] = svc.regions.describe()
        fallback = svc.regions.fallback()
        if "storage" in failing and fallback:
            # Pulls are served from the other regions meanwhile (pushes here fail until it is back).
            failing.discard("storage")
            body["fallback"] = (
                f"this region's storage fails ({checks['storage']}): pulls are served from region "
                f"{', '.join(fallback)}; pushes into region {svc.regions.name} fail until it answers"
            )
    status = 503 if failing else 200
    return Response(json.dumps(body).encode(), status_code=status, media_type="application/json")
