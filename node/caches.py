"""What a node keeps in memory for the request path: manifest bytes, blob locations, name lists."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

from coordinator.metadata import Metadata

from .metrics import Metrics
from .storage import layout


class ManifestCache:
    """Manifest bytes by digest. Content is immutable, so entries never go stale; bounded by bytes."""

    def __init__(self, metrics: Metrics, max_bytes: int = 64 * 1024 * 1024) -> None:
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._max = max_bytes
        self._metrics = metrics
        self._hits = metrics.cache_hits.labels("manifest")
        self._misses = metrics.cache_misses.labels("manifest")

    def get(self, digest: str) -> bytes | None:
        body = self._entries.get(digest)
        if body is None:
            self._metrics.add(self._misses)
            return None
        self._entries.move_to_end(digest)
        self._metrics.add(self._hits)
        return body

    def put(self, digest: str, body: bytes) -> None:
        if len(body) > self._max or digest in self._entries:
            return
        self._entries[digest] = body
        self._bytes += len(body)
        while self._bytes > self._max:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= len(dropped)


class BlobLocations:
    """Storage key of each blob by digest, from its blob record.

    Only content-addressed keys are cached: they never change for a digest. A blob stored where
    its upload began (a large S3 upload) gets a new key if it is collected and pushed again, so
    its record is read each time.
    """

    def __init__(self, metadata: Metadata, metrics: Metrics, max_entries: int = 100_000) -> None:
        self._metadata = metadata
        self._keys: OrderedDict[str, str] = OrderedDict()
        self._max = max_entries
        self._metrics = metrics
        self._hits = metrics.cache_hits.labels("blob_location")
        self._misses = metrics.cache_misses.labels("blob_location")

    async def key(self, digest: str) -> str:
        key = self._keys.get(digest)
        if key is not None:
            self._metrics.add(self._hits)
            return key
        self._metrics.add(self._misses)
        record = await self._metadata.get_blob(digest)
        addressed = layout.blob_key(digest)
        if record is not None and record.key != addressed:
            return record.key
        self._keys[digest] = addressed
        if len(self._keys) > self._max:
            self._keys.popitem(last=False)
        return addressed


class ListCache:
    """Sorted name lists (a repository's tags, the catalog) kept while their coordinator version stands.

    Each use asks the coordinator for the version (one point read) and reads the whole list again
    only when it moved, so a tag moved through any node is seen by the next request to this one.
    Bounded by the number of names held.
    """

    def __init__(self, metrics: Metrics, kind: str, max_names: int = 500_000) -> None:
        self._entries: OrderedDict[str, tuple[int, list[str]]] = OrderedDict()
        # The last rendering of a kept list (the whole of it, as a response body), dropped with it.
        self._rendered: dict[str, tuple[list[str], bytes]] = {}
        self._names = 0
        self._max = max_names
        self._hits = metrics.cache_hits.labels(kind)
        self._misses = metrics.cache_misses.labels(kind)

    async def get(self, key: str, fetch: Callable[[int | None], Awaitable[tuple[int, list[str] | None]]]) -> list[str]:
        cached = self._entries.get(key)
        version, fresh = await fetch(cached[0] if cached is not None else None)
        if fresh is None and cached is not None:
            self._entries.move_to_end(key)
            self._hits.inc()
            return cached[1]
        self._misses.inc()
        assert fresh is not None
        if cached is not None:
            del self._entries[key]
            self._rendered.pop(key, None)
            self._names -= len(cached[1])
        if version and len(fresh) <= self._max:
            self._entries[key] = (version, fresh)
            self._names += len(fresh)
            while self._names > self._max:
                evicted, (_, dropped) = self._entries.popitem(last=False)
                self._rendered.pop(evicted, None)
                self._names -= len(dropped)
        return fresh

    def rendered(self, key: str, names: list[str], render: Callable[[list[str]], bytes]) -> bytes:
        """`render(names)`, made once while `names` is the list kept for `key` (as `get` returned it)."""
        kept = self._entries.get(key)
        if kept is None or kept[1] is not names:
            return render(names)
        last = self._rendered.get(key)
        if last is None or last[0] is not names:
            last = self._rendered[key] = (names, render(names))
        return last[1]
