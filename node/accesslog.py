"""One structured JSON access line per request, written off the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics

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
        body_pending = _has_body(scope)

        async def counting_receive() -> Message:
            nonlocal received, body_pending
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    body_pending = False
            return message

        async def tagging_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
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
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        except ClientDisconnect:
            pass  # logged as 499: nobody is left to answer
        except Exception:
            # A bug or a storage failure: the client still gets an OCI error body and the
            # request id to quote, and the log gets the traceback in JSON.
            self.log.exception("unhandled error", extra={"fields": {"request_id": request_id}})
            if status:
                raise
            body = json.dumps(
                {
                    "errors": [
                        {"code": "UNKNOWN", "message": "internal server error", "detail": {"request_id": request_id}}
                    ]
                }
            ).encode()
            await tagging_send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await tagging_send({"type": "http.response.body", "body": body})
        finally:
            route_path = getattr(scope.get("route"), "path", None) or "unmatched"
            duration = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.observe_request(scope["method"], route_path, status or 499, received, sent, duration)
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
