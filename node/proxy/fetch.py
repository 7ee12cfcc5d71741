"""One upstream fetch per missing blob for the whole cluster, streamed to the first client as it is stored.

The node that takes a blob's fetch claim (coordinator/cache.py) reads it from the upstream once and
writes it into storage through an ordinary monolithic upload session, so the bytes are covered by a
record before they are written and the blob becomes visible only once it hashes to its digest. The
client that asked first is sent the same chunks as they pass, one chunk behind: the last one is
held back until the whole blob is verified and committed, so a client is never given all of a wrong
blob, and one that has it all finds it stored. Every other request for the blob, on this node or
any other, waits for the claim to go and is then served from storage. The fetch runs on its own: a client that hangs up does not stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from coordinator.cache import CacheRecords
from coordinator.lease import NodeLease

from ..config import Upstream
from ..reference import parse_digest
from ..upload import Uploader
from .upstream import UpstreamClient, UpstreamInvalid

log = logging.getLogger("wharf.proxy")

# Chunks queued for a client that reads more slowly than the upstream sends; then it waits this long.
_QUEUED_CHUNKS = 8
_SLOW_CLIENT_SECONDS = 30.0
# How long a request waits for another node's fetch of the same blob.
WAIT_SECONDS = 1800.0


class _Listener:
    """The chunks of a fetch as the first client reads them; `dropped` once it cannot keep up."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(_QUEUED_CHUNKS)
        self.dropped = False

    async def give(self, chunk: bytes) -> None:
        if self.dropped:
            return
        try:
            await asyncio.wait_for(self.queue.put(chunk), _SLOW_CLIENT_SECONDS)
        except TimeoutError:
            self.drop()

    def end(self, error: BaseException | None = None) -> None:
        if self.dropped:
            return
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(error)
            return
        self.drop()

    def drop(self) -> None:
        """Stop feeding this client (it hung up, or reads too slowly to hold up the fetch for)."""
        self.dropped = True
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(ConnectionAbortedError("the fetch went on without this client"))

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                item = await self.queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.dropped = True


@dataclass
class BlobFetch:
    """A fetch of one blob on this node: started by the first request for it, awaited by the rest."""

    digest: str
    started: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    size: int | None = None
    listener: _Listener | None = None
    # Another node holds the claim: this one only waited for it.
    followed: bool = False
    error: BaseException | None = None
    # The verified blob's last chunk, held back from the first client until the blob is committed.
    last: bytes | None = None

    def listen(self) -> AsyncIterator[bytes] | None:
        """The chunks for the first client, if the fetch has not sent any yet."""
        if self.listener is not None or self.done.is_set():
            return None
        self.listener = _Listener()
        return self.listener.chunks()


class _Verified:
    """The upstream's chunks, hashed as they pass; the first client gets them one chunk behind."""

    def __init__(
        self, chunks: AsyncIterator[bytes], fetch: BlobFetch, upstream: Upstream, counted: Callable[[int], None]
    ) -> None:
        self._chunks = chunks
        self._fetch = fetch
        self._upstream = upstream
        self._counted = counted

    async def __aiter__(self) -> AsyncIterator[bytes]:
        fetch = self._fetch
        algorithm, _ = fetch.digest.split(":", 1)
        hasher = hashlib.new(algorithm)
        held: bytes | None = None
        ended = False
        try:
            async for chunk in self._chunks:
                hasher.update(chunk)
                self._counted(len(chunk))
                if held is not None and fetch.listener is not None:
                    await fetch.listener.give(held)
                held = chunk
                yield chunk
            actual = f"{algorithm}:{hasher.hexdigest()}"
            if actual != fetch.digest:
                raise UpstreamInvalid(self._upstream, f"blob {fetch.digest} came as {actual}: not stored, not served")
            # The last chunk goes once the blob is stored and linked (BlobFetches._run): a client that
            # has the whole blob finds it in the cache on its next request.
            fetch.last = held
            ended = True
        finally:
            if fetch.listener is not None and not ended:
                fetch.listener.end(ConnectionAbortedError("the upstream transfer failed"))


class BlobFetches:
    """Every blob fetch this node runs or waits for, by digest."""

    def __init__(self, records: CacheRecords, uploader: Uploader, lease: NodeLease, holder: str) -> None:
        self.records = records
        self.uploader = uploader
        self.lease = lease
        self.holder = holder
        self._running: dict[str, BlobFetch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def running(self, digest: str) -> BlobFetch | None:
        return self._running.get(digest)

    def start(
        self, client: UpstreamClient, remote: str, repository: str, digest: str, counted: Callable[[int], None]
    ) -> BlobFetch:
        """The fetch of `digest` on this node, started now unless one is under way."""
        fetch = self._running.get(digest)
        if fetch is not None:
            return fetch
        fetch = self._running[digest] = BlobFetch(digest)
        task = asyncio.get_running_loop().create_task(self._run(fetch, client, remote, repository, counted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fetch

    async def _run(
        self, fetch: BlobFetch, client: UpstreamClient, remote: str, repository: str, counted: Callable[[int], None]
    ) -> None:
        claimed = False
        try:
            claimed = await self.lease.attached(functools.partial(self.records.claim_fetch, fetch.digest, self.holder))
            if not claimed:
                fetch.followed = True
                fetch.started.set()
                await self.records.wait_fetched(fetch.digest, timeout=WAIT_SECONDS)
                return
            stored = await self.uploader.metadata.get_blob(fetch.digest)
            if stored is not None and not stored.corrupt:
                # Another node's fetch ended (stored, then its claim went) between this request's
                # look and this claim: served from storage, not fetched twice.
                fetch.followed = True
                fetch.started.set()
                return
            async with client.blob(remote, fetch.digest) as (size, chunks):
                if size is not None:
                    # Before the first client is sent a status line: a quota with no room is its answer.
                    await self.uploader.check_room(repository, size, fetch.digest)
                fetch.size = size
                fetch.started.set()
                verified = _Verified(chunks, fetch, client.upstream, counted)
                await self.uploader.monolithic(repository, parse_digest(fetch.digest), verified.__aiter__(), size)
            if fetch.listener is not None:
                if fetch.last is not None:
                    await fetch.listener.give(fetch.last)
                fetch.listener.end()
            log.info(
                "fetched %s of %s from upstream %s (%s bytes)",
                fetch.digest,
                repository,
                client.upstream.name,
                size if size is not None else "?",
                extra={"fields": {"digest": fetch.digest, "repository": repository, "upstream": client.upstream.name}},
            )
        except asyncio.CancelledError:
            fetch.error = ConnectionAbortedError("the node is stopping")
            raise
        except Exception as exc:
            fetch.error = exc
            if fetch.listener is not None:
                fetch.listener.end(exc)
        finally:
            if claimed:
                with contextlib.suppress(Exception):
                    await self.records.release_fetch(fetch.digest, self.holder)
            fetch.started.set()
            fetch.done.set()
            self._running.pop(fetch.digest, None)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
