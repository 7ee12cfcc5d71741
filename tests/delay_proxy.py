"""A user-space TCP proxy on loopback that delays every byte, for latency between simulated regions.

The kernel here has no `sch_netem`, so `tc ... netem delay` is not available. Each connection to the
proxy is relayed to one upstream address; every chunk read from either side is written to the other
`delay` seconds later, in order, so a round trip costs twice the delay (as two hosts with netem each
would). `hold()` stops delivering (connections stay open, bytes wait) until `release()`: a link
between regions that has gone quiet. The proxy runs its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque

_CHUNK = 64 * 1024


class DelayProxy:
    def __init__(self, upstream: tuple[str, int], *, delay: float = 0.0) -> None:
        self.upstream = upstream
        self.delay = delay
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._started = threading.Event()
        self.relayed = 0  # bytes delivered, both ways

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self) -> DelayProxy:
        self._thread = threading.Thread(target=self._run, name=f"delay-proxy-{self.upstream[1]}", daemon=True)
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("the delay proxy did not start")
        return self

    def close(self) -> None:
        if self._loop is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._stop(), self._loop)
        with contextlib.suppress(Exception):
            future.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_delay(self, seconds: float) -> None:
        self.delay = seconds

    def hold(self) -> None:
        """Stop delivering bytes (they wait, connections stay open) until `release()`."""
        assert self._loop is not None and self._flowing is not None
        self._loop.call_soon_threadsafe(self._flowing.clear)

    def release(self) -> None:
        assert self._loop is not None and self._flowing is not None
        self._loop.call_soon_threadsafe(self._flowing.set)

    # -- the loop's side ----------------------------------------------------------------------

    def _run(self) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.run_until_complete(self._listen())
        self._started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._connections):
            writer.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        self._connections.update((client_writer, upstream_writer))
        try:
            await asyncio.gather(self._pipe(client_reader, upstream_writer), self._pipe(upstream_reader, client_writer))
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a reset, or the proxy closing: the connection ends either way
        finally:
            for writer in (client_writer, upstream_writer):
                self._connections.discard(writer)
                writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read as bytes come; write each chunk `delay` after it arrived, in order."""
        queue: deque[tuple[float, bytes]] = deque()
        arrived = asyncio.Event()
        ended = False

        async def deliver() -> None:
            assert self._flowing is not None
            while queue or not ended:
                if not queue:
                    arrived.clear()
                    await arrived.wait()
                    continue
                due, data = queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                queue.popleft()
                writer.write(data)
                await writer.drain()
                self.relayed += len(data)
            with contextlib.suppress(OSError):
                if writer.can_write_eof():
                    writer.write_eof()

        sender = asyncio.get_running_loop().create_task(deliver())
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    break
                queue.append((time.monotonic() + self.delay, data))
                arrived.set()
        finally:
            ended = True
            arrived.set()
            await sender
