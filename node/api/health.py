"""Liveness and readiness for load balancers: /debug/health and /debug/ready."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable

from starlette.requests import Request
from starlette.responses import Response

from ..health import HealthChecks
from ..storage import layout
from .request import services

_CHECK_TIMEOUT = 3.0


async def health(request: Request) -> Response:
    """The process serves requests."""
    return Response(b"{}", media_type="application/json")


async def ready(request: Request) -> Response:
    """Storage and coordinator both answer, and every configured health check passes: this node
    can serve registry traffic. With `health.storagedriver` on, storage health is that check's
    (with its threshold) rather than a probe per request."""
    svc = services(request)
    periodic: HealthChecks | None = getattr(request.app.state, "health", None)
    probes: list[tuple[str, Awaitable[object]]] = [("coordinator", svc.kv.ping())]
    if periodic is None or not periodic.storage_checked:
        probes.append(("storage", svc.storage.stat(layout.ROOT + "/ready")))
    checks: dict[str, str] = {}
    for name, probe in probes:
        try:
            await asyncio.wait_for(probe, _CHECK_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"{type(exc).__name__}: {exc}"[:200]
    if periodic is not None:
        checks.update(periodic.states())
    status = 200 if all(v == "ok" for v in checks.values()) else 503
    # Read-only nodes (switched, or out of space) still serve pulls: ready, and saying so.
    body = {
        **checks,
        "readonly": svc.space.readonly() or svc.readonly.describe(),
        "coordinator_space": svc.space.describe(),
    }
    return Response(json.dumps(body).encode(), status_code=status, media_type="application/json")
