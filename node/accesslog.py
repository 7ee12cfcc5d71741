"""The access line and the request figures of each request: an observer of node/context.py's
RequestContext, told when a request starts and when it ends."""

from __future__ import annotations

import logging
import time

from starlette.types import Scope

from .context import Exchange
from .metrics import Metrics, distribution_handler
from .numbers import whole_number
from .routing import route_path


def _request_size(scope: Scope) -> int:
    """Distribution's approximate request size: URL, method, protocol, headers and declared body."""
    size = len(scope["method"]) + len(scope.get("raw_path") or scope["path"]) + len(scope.get("query_string", b"")) + 8
    for name, value in scope["headers"]:
        size += len(name) + len(value)
        if name == b"content-length":
            size += whole_number(value) or 0
    return size


class AccessLog:
    """One structured JSON access line per request (unless disabled), and its figures."""

    def __init__(self, *, enabled: bool = True, metrics: Metrics | None = None) -> None:
        self.enabled = enabled
        self.metrics = metrics
        self.log = logging.getLogger("wharf.access")

    def started(self, scope: Scope, exchange: Exchange) -> None:
        if self.metrics is not None:
            handler = exchange.observed["handler"] = distribution_handler(route_path(scope))
            self.metrics.request_started(handler)

    def finished(self, scope: Scope, exchange: Exchange) -> None:
        route = getattr(scope.get("route"), "path", None) or "unmatched"
        status = exchange.status or 499
        duration = time.perf_counter() - exchange.started
        if self.metrics is not None:
            handler = exchange.observed.get("handler")
            self.metrics.observe_request(
                scope["method"],
                route,
                status,
                exchange.received,
                exchange.sent,
                duration,
                handler=handler,
                request_size=_request_size(scope) if handler is not None else 0,
            )
            self.metrics.request_finished(handler)
        if self.enabled and self.log.isEnabledFor(logging.INFO):
            client = scope.get("client")
            fields = {
                "method": scope["method"],
                "route": route,
                "status": status,
                "bytes_in": exchange.received,
                "bytes_out": exchange.sent,
                "duration_ms": round(duration * 1000, 3),
                "request_id": exchange.request_id,
                "remote": client[0] if client else None,
                "repository": scope.get("path_params", {}).get("name"),
                "user": scope.get("state", {}).get("user"),
            }
            # What log.info("request", extra=...) makes and hands on, without its per-call look-ups.
            record = self.log.makeRecord(
                self.log.name,
                logging.INFO,
                "(unknown file)",
                0,
                "request",
                (),
                None,
                "(unknown function)",
                {"fields": fields},
            )
            self.log.handle(record)
