"""The access line and the request figures of each request: an observer of node/context.py's
RequestContext, told when a request starts and when it ends."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from starlette.types import Scope

from .context import Exchange
from .metrics import Metrics, distribution_handler
from .routing import route_path


def _request_size(scope: Scope) -> int:
    """Distribution's approximate request size: URL, method, protocol, headers and declared body."""
    size = len(scope["method"]) + len(scope.get("raw_path") or scope["path"]) + len(scope.get("query_string", b"")) + 8
    for name, value in scope["headers"]:
        size += len(name) + len(value)
        if name == b"content-length" and value.isdigit():
            size += int(value)
    return size


class _AccessRecord(logging.LogRecord):
    """An access line's record: what `log.info("request", extra=...)` makes, without looking up on
    every line what is the same on every line (level, source, thread and process, which no format
    here reads: node/logs.py switches their look-ups off). Those are taken from one record made the
    usual way, again whenever the process or logging's switches for them change."""

    _same: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})

    def __init__(self, name: str, fields: dict[str, Any]) -> None:
        made_by = (os.getpid(), logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
        if _AccessRecord._same[0] != made_by:
            usual = logging.LogRecord(name, logging.INFO, "(unknown file)", 0, "request", None, None)
            _AccessRecord._same = (made_by, usual.__dict__)
        self.__dict__.update(_AccessRecord._same[1])
        self.name = name
        now = time.time_ns()
        self.created = now / 1e9
        self.msecs = (now % 1_000_000_000) // 1_000_000 + 0.0
        start = logging._startTime  # type: ignore[attr-defined]
        # In milliseconds since logging started, which it noted in nanoseconds or (Python < 3.12) seconds.
        self.relativeCreated = (now - start) / 1e6 if isinstance(start, int) else (now / 1e9 - start) * 1000
        self.fields = fields


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
            self.log.handle(_AccessRecord(self.log.name, fields))
