"""Liveness and readiness for load balancers: /debug/health and /debug/ready."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os

from starlette.requests import Request
from starlette.responses import Response

from ..config import Config
from ..storage import layout
from .common import services

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


async def health(request: Request) -> Response:
    """The process serves requests; the body names the Wharf version it runs."""
    return Response(json.dumps({"version": _VERSION}).encode(), media_type="application/json")


async def ready(request: Request) -> Response:
    """Storage and coordinator both answer and the node is not draining: it can serve registry traffic."""
    svc = services(request)
    checks: dict[str, str] = {}
    for name, probe in (("coordinator", svc.kv.ping()), ("storage", svc.storage.stat(layout.ROOT + "/ready"))):
        try:
            await asyncio.wait_for(probe, _CHECK_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"{type(exc).__name__}: {exc}"[:200]
    drain = drain_file(svc.config)
    if drain is not None and os.path.exists(drain):  # one stat of a local file
        checks["drain"] = f"draining: {drain} exists"
    status = 200 if all(v == "ok" for v in checks.values()) else 503
    return Response(json.dumps(checks).encode(), status_code=status, media_type="application/json")
