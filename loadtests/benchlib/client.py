"""A small HTTP/1.1 keep-alive client on an asyncio Protocol: far less work per request than httpx.

Bodies it does not need are counted and dropped as they arrive; request bodies are sent from the
caller's buffers. `Redirects` follows a registry's 307 to storage on a connection of its own.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MIB = 1 << 20


class ProtocolError(Exception):
    pass


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    size: int  # body bytes received (also when the body was discarded)


class _Wire(asyncio.Protocol):
    """The receiving side of one connection: a buffer, and a counter for bodies that are discarded."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._can_write: asyncio.Future[None] | None = None
        self._skip = 0  # body bytes still to be thrown away as they arrive

    # -- asyncio callbacks ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            if taken == len(data):
                if not self._skip:
                    self._wake()
                return
            data = data[taken:]
        self.buf += data
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._wake()
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    def pause_writing(self) -> None:
        self._can_write = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)
        self._can_write = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- for the client -------------------------------------------------------------------------
    async def _wait(self) -> None:
        if self.closed:
            raise ConnectionResetError(f"connection closed by the server ({self.error or 'EOF'})")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def drain(self) -> None:
        if self.closed:
            raise ConnectionResetError(f"connection closed by the server ({self.error or 'EOF'})")
        if self._can_write is not None:
            await self._can_write

    async def read_until(self, sep: bytes, limit: int = 1 << 16) -> bytes:
        while True:
            at = self.buf.find(sep)
            if at >= 0:
                end = at + len(sep)
                data = bytes(self.buf[:end])
                del self.buf[:end]
                return data
            if len(self.buf) > limit:
                raise ProtocolError("response head too long")
            await self._wait()

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._wait()
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def skip(self, n: int) -> None:
        taken = min(n, len(self.buf))
        del self.buf[:taken]
        self._skip = n - taken
        while self._skip:
            await self._wait()

    async def read_to_eof(self) -> bytes:
        while not self.closed:
            await self._wait()
        data = bytes(self.buf)
        self.buf.clear()
        return data


class Conn:
    """One keep-alive HTTP/1.1 connection (no pipelining); reconnects after an error or close."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.wire: _Wire | None = None

    async def _connect(self) -> _Wire:
        _transport, wire = await asyncio.get_running_loop().create_connection(_Wire, self.host, self.port)
        sock = _transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _transport.set_write_buffer_limits(high=4 * MIB)
        return wire

    def close(self) -> None:
        if self.wire is not None and self.wire.transport is not None:
            self.wire.transport.close()
        self.wire = None

    async def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str] | None = None,
        body: bytes | bytearray | memoryview | list[Any] | None = None,
        *,
        discard: bool = False,
    ) -> Reply:
        try:
            return await self._request(method, target, headers, body, discard)
        except BaseException:
            self.close()
            raise

    async def _request(
        self, method: str, target: str, headers: dict[str, str] | None, body: Any, discard: bool
    ) -> Reply:
        if self.wire is None or self.wire.closed:
            self.wire = await self._connect()
        wire = self.wire
        transport = wire.transport
        assert transport is not None
        parts = [] if body is None else (body if isinstance(body, list) else [body])
        length = sum(len(p) for p in parts)
        head = [f"{method} {target} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {length}")
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        for part in parts:
            view = memoryview(part)
            for start in range(0, len(view), MIB):
                transport.write(view[start : start + MIB])
                await wire.drain()

        raw = await wire.read_until(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status_line = lines[0].split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0]!r}")
        status = int(status_line[1])
        reply_headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                reply_headers[name.strip().lower()] = value.strip()
        payload = b""
        size = 0
        if method != "HEAD" and status not in (204, 304) and status >= 200:
            if "content-length" in reply_headers:
                size = int(reply_headers["content-length"])
                if discard:
                    await wire.skip(size)
                else:
                    payload = await wire.read_exactly(size)
            elif reply_headers.get("transfer-encoding", "").lower() == "chunked":
                pieces = []
                while True:
                    size_line = await wire.read_until(b"\r\n")
                    chunk_size = int(size_line.split(b";")[0], 16)
                    if chunk_size == 0:
                        await wire.read_until(b"\r\n")  # no trailers expected
                        break
                    data = await wire.read_exactly(chunk_size + 2)
                    size += chunk_size
                    if not discard:
                        pieces.append(data[:-2])
                payload = b"".join(pieces)
            else:
                payload = await wire.read_to_eof()
                size = len(payload)
                self.close()
        if reply_headers.get("connection", "").lower() == "close":
            self.close()
        return Reply(status, reply_headers, payload, size)


def location_target(location: str) -> str:
    parts = urlsplit(location)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def with_query(target: str, key: str, value: str) -> str:
    return target + ("&" if "?" in target else "?") + f"{key}={value}"


class Unexpected(Exception):
    def __init__(self, what: str, reply: Reply) -> None:
        body = reply.body[:300].decode("utf-8", "replace")
        super().__init__(f"{what}: HTTP {reply.status} {body}")
        self.reply = reply
        self.what = what


class Redirects:
    """One connection per worker to wherever the registry redirects (the S3 server)."""

    def __init__(self) -> None:
        self.conns: dict[tuple[int, str, int], Conn] = {}
        self.hops: list[float] = []  # the registry's part: request to 307

    def conn(self, worker: int, location: str) -> Conn:
        parts = urlsplit(location)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"redirect to {location[:120]!r}: the bench client speaks plain HTTP only")
        key = (worker, parts.hostname, parts.port or 80)
        conn = self.conns.get(key)
        if conn is None:
            conn = self.conns[key] = Conn(parts.hostname, parts.port or 80)
        return conn

    def close(self) -> None:
        for conn in self.conns.values():
            conn.close()
        self.conns.clear()

    async def get(self, conn: Conn, worker: int, target: str, discard: bool) -> tuple[Reply, int]:
        """GET `target`, following one 307/302 to storage: (the reply with the blob, requests made)."""
        t0 = time.perf_counter()
        reply = await conn.request("GET", target, discard=discard)
        if reply.status in (302, 307):
            self.hops.append(time.perf_counter() - t0)
            location = reply.headers.get("location", "")
            second = await self.conn(worker, location).request("GET", location_target(location), discard=discard)
            if second.status != 200:
                raise Unexpected("GET redirected blob from storage", second)
            return second, 2
        if reply.status != 200:
            raise Unexpected("GET blob", reply)
        return reply, 1
