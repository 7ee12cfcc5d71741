"""One structured JSON access line per request, written off the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics, distribution_handler

API_VERSION_HEADER = (b"docker-distribution-api-version", b"registry/2.0")


_DRAIN_SECONDS = 10.0


async def _discard_body(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _finish_drain(drain: asyncio.Future[None]) -> None:
    try:
        await asyncio.wait_for(drain, _DRAIN_SECONDS)
    except Exception:  # timed out, or the receive channel broke
        drain.cancel()


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return value.strip() not in (b"0", b"")
        if name == b"transfer-encoding":
            return True
    return False


def _request_size(scope: Scope) -> int:
    """Distribution's approximate request size: URL, method, protocol, headers and declared body."""
    size = len(scope["method"]) + len(scope.get("raw_path") or scope["path"]) + len(scope.get("query_string", b"")) + 8
    for name, value in scope["headers"]:
        size += len(name) + len(value)
        if name == b"content-length" and value.isdigit():
            size += int(value)
    return size


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


async def _send_error(send: Send, status: int, code: str, message: str, request_id: str) -> None:
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": {"request_id": request_id}}]}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class AccessLog:
    """ASGI middleware: request id, API version header, and the access line."""

    def __init__(self, app: ASGIApp, *, enabled: bool = True, metrics: Metrics | None = None) -> None:
        self.app = app
        self.enabled = enabled
        self.metrics = metrics
        self.log = logging.getLogger("wharf.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                request_id = value.decode("latin-1")[:64]
                break
        if not request_id:
            request_id = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0
        sent = 0
        received = 0
        declared = 0
        body_pending = _has_body(scope)
        handler = distribution_handler(scope["path"]) if self.metrics is not None else None
        if self.metrics is not None:
            self.metrics.request_started(handler)

        async def counting_receive() -> Message:
            nonlocal received, body_pending
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    body_pending = False
            return message

        async def tagging_send(message: Message) -> None:
            nonlocal status, sent, declared
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                declared = _declared_length(headers)
                headers.append(API_VERSION_HEADER)
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                if body_pending:
                    # Answered before the body was read (a refused chunk): the server will drop
                    # the connection, so say so rather than let the client reuse it and fail.
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                if body_pending and not message.get("more_body", False):
                    # The server may still be queueing the unread body; with its queue full it
                    # would block this last send for ever and leak the connection. Reading on
                    # until it says the client is gone lets it finish and close.
                    drain = asyncio.ensure_future(_discard_body(receive))
                    try:
                        await send(message)
                    finally:
                        await _finish_drain(drain)
                    return
            elif message["type"] == "http.response.pathsend":
                # The server sends the file itself (zero copy): all of it, as the headers declared.
                sent += declared
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        except ClientDisconnect:
            # The body ended before its Content-Length: the client closed its side (and may still
            # read an answer) or went away. Logged as 499 if nobody is left to take the 400.
            if not status:
                try:
                    await _send_error(
                        tagging_send, 400, "SIZE_INVALID", "request body is shorter than its Content-Length", request_id
                    )
                except Exception:
                    status = 0
        except Exception:
            # A bug or a storage failure: the client still gets an OCI error body and the
            # request id to quote, and the log gets the traceback in JSON.
            self.log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            if status:
                raise
            await _send_error(tagging_send, 500, "UNKNOWN", "internal server error", request_id)
        finally:
            route_path = getattr(scope.get("route"), "path", None) or "unmatched"
            duration = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.observe_request(
                    scope["method"],
                    route_path,
                    status or 499,
                    received,
                    sent,
                    duration,
                    handler=handler,
                    request_size=_request_size(scope) if handler is not None else 0,
                )
                self.metrics.request_finished(handler)
            if self.enabled:
                client = scope.get("client")
                self.log.info(
                    "request",
                    extra={
                        "fields": {
                            "method": scope["method"],
                            "route": route_path,
                            "status": status or 499,
                            "bytes_in": received,
                            "bytes_out": sent,
                            "duration_ms": round(duration * 1000, 3),
                            "request_id": request_id,
                            "remote": client[0] if client else None,
                            "repository": scope.get("path_params", {}).get("name"),
                            "user": scope.get("state", {}).get("user"),
                        }
                    },
                )
