"""Liveness and readiness for load balancers: /debug/health and /debug/ready."""

from __future__ import annotations

import asyncio
import json

from starlette.requests import Request
from starlette.responses import Response

from ..storage import layout
from .common import services

_CHECK_TIMEOUT = 3.0


async def health(request: Request) -> Response:
    """The process serves requests."""
    return Response(b"{}", media_type="application/json")


async def ready(request: Request) -> Response:
    """Storage and coordinator both answer: this node can serve registry traffic."""
    svc = services(request)
    checks: dict[str, str] = {}
    for name, probe in (("coordinator", svc.kv.ping()), ("storage", svc.storage.stat(layout.ROOT + "/ready"))):
        try:
            await asyncio.wait_for(probe, _CHECK_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"{type(exc).__name__}: {exc}"[:200]
    status = 200 if all(v == "ok" for v in checks.values()) else 503
    # Read-only nodes still serve pulls: ready, and saying so.
    body = {**checks, "readonly": svc.readonly.describe()}
    return Response(json.dumps(body).encode(), status_code=status, media_type="application/json")
