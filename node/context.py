"""The request context: what every request gets before anything else looks at it.

`RequestContext` is the outermost registry middleware. It gives the request its id (a client's
X-Request-Id, or a new one), adds the API version, request id and configured (`http.headers`)
headers, counts the bytes in and out, closes a connection whose body was left unread, answers a
body cut short with SIZE_INVALID and anything unhandled with the last-chance 500 (both rendered by node/errors.py), and tells its
observers (the access log and the request figures, node/accesslog.py) when the request starts and
ends. `note` lets handlers add facts to the request's audit line.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import InternalError, RegistryError, SizeInvalid, error_response
from .headers import ConfiguredHeaders
from .numbers import whole_number

API_VERSION_HEADER = (b"docker-distribution-api-version", b"registry/2.0")
# Where a request's notes for its audit line are kept in scope["state"] (when the audit log is on).
NOTES_KEY = "wharf.notes"

_DRAIN_SECONDS = 10.0

log = logging.getLogger("wharf.access")


class Notes(dict[str, Any]):
    """Facts handlers add to a request's audit line; `record`: write one whatever happens."""

    record: bool = False


def note(scope: Scope, *, record: bool = False, **facts: Any) -> None:
    """Add facts (a digest, the action) to this request's audit line. Nothing when the audit log is off."""
    notes = (scope.get("state") or {}).get(NOTES_KEY)
    if isinstance(notes, Notes):
        notes.update(facts)
        notes.record = notes.record or record


@dataclass
class Exchange:
    """What one request did, as its observers see it when it ends."""

    request_id: str
    started: float
    status: int = 0  # 0 until a response starts; logged as 499 if none did
    received: int = 0
    sent: int = 0
    declared: int = 0  # the response's Content-Length
    observed: dict[str, Any] = field(default_factory=dict)  # observers' own per-request facts


class Observer(Protocol):
    def started(self, scope: Scope, exchange: Exchange) -> None: ...

    def finished(self, scope: Scope, exchange: Exchange) -> None: ...


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


def _declared_length(headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in headers:
        if name == b"content-length":
            return whole_number(value) or 0
    return 0


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            given = value.decode("latin-1")[:64]
            if given:
                return given
            break
    return _new_request_id()


class _RandomBlocks:
    """os.urandom's bytes, read a block at a time: one system call per 256 request ids, not one each."""

    _BLOCK = 4096

    def __init__(self) -> None:
        self._forget()
        # A forked worker must not hand out the bytes its parent (or a sibling) also holds.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._block = b""
        self._at = 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._at + n > len(self._block):
                self._block, self._at = os.urandom(self._BLOCK), 0
            start = self._at
            self._at += n
            return self._block[start : start + n]


_random = _RandomBlocks()


def _new_request_id() -> str:
    """A random version-4 UUID in hex, as uuid.uuid4().hex gives, without building a UUID object."""
    raw = bytearray(_random.take(16))
    raw[6] = (raw[6] & 0x0F) | 0x40
    raw[8] = (raw[8] & 0x3F) | 0x80
    return raw.hex()


class RequestContext:
    """ASGI middleware: request id, API version and configured headers, byte counts, the last-chance
    error, observers."""

    def __init__(
        self, app: ASGIApp, *, observers: Sequence[Observer] = (), headers: ConfiguredHeaders | None = None
    ) -> None:
        self.app = app
        self.observers = tuple(observers)
        self.headers = headers or ConfiguredHeaders({})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = Exchange(_request_id(scope), time.perf_counter())
        scope.setdefault("state", {})["request_id"] = exchange.request_id
        for observer in self.observers:
            observer.started(scope, exchange)
        body_pending = _has_body(scope)

        async def counting_receive() -> Message:
            nonlocal body_pending
            message = await receive()
            if message["type"] == "http.request":
                exchange.received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    body_pending = False
            return message

        async def tagging_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                headers = list(message.get("headers", []))
                exchange.declared = _declared_length(headers)
                headers.append(API_VERSION_HEADER)
                headers.append((b"x-request-id", exchange.request_id.encode("latin-1")))
                if body_pending:
                    # Answered before the body was read (a refused chunk): the server will drop
                    # the connection, so say so rather than let the client reuse it and fail.
                    headers.append((b"connection", b"close"))
                self.headers.add_to(headers)
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                exchange.sent += len(message.get("body", b""))
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
                exchange.sent += exchange.declared
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        except ClientDisconnect:
            # The body ended before its Content-Length: the client closed its side (and may still
            # read an answer) or went away. Logged as 499 if nobody is left to take the 400.
            if not exchange.status:
                short = SizeInvalid(
                    {"request_id": exchange.request_id}, message="request body is shorter than its Content-Length"
                )
                try:
                    await self._answer(short, scope, receive, tagging_send)
                except Exception:
                    exchange.status = 0
        except Exception:
            # A bug or a storage failure: the client still gets an OCI error body and the
            # request id to quote, and the log gets the traceback in JSON.
            log.exception("unhandled error", extra={"fields": {"request_id": exchange.request_id}})
            if exchange.status:
                raise
            await self._answer(InternalError({"request_id": exchange.request_id}), scope, receive, tagging_send)
        finally:
            for observer in self.observers:
                observer.finished(scope, exchange)

    @staticmethod
    async def _answer(error: RegistryError, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(error, scope["method"])(scope, receive, send)
