"""What the request handlers share: configuration, storage, coordinator records and caches."""

from __future__ import annotations

import os
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from coordinator.kv import KV
from coordinator.lease import NodeLease
from coordinator.metadata import Metadata
from coordinator.uploads import UploadSessions

from .config import Config
from .gc import Touches
from .metrics import InstrumentedKV, InstrumentedStorage, Metrics
from .notifications import Notifier
from .policies import Policies
from .readonly import ReadOnly
from .space import Space
from .storage import layout
from .storage.driver import StorageDriver
from .trust import Trust
from .upload import Uploader


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
            self._names -= len(cached[1])
        if version and len(fresh) <= self._max:
            self._entries[key] = (version, fresh)
            self._names += len(fresh)
            while self._names > self._max:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._names -= len(dropped)
        return fresh


@dataclass
class Services:
    config: Config
    kv: KV
    storage: StorageDriver
    metadata: Metadata
    sessions: UploadSessions
    uploader: Uploader
    manifests: ManifestCache
    blobs: BlobLocations
    metrics: Metrics
    node_id: str
    tag_lists: ListCache = field(init=False)
    catalog: ListCache = field(init=False)
    touches: Touches = field(init=False)
    policies: Policies = field(init=False)
    readonly: ReadOnly = field(init=False)
    space: Space = field(init=False)
    notifier: Notifier = field(init=False)
    trust: Trust = field(init=False)

    def __post_init__(self) -> None:
        self.tag_lists = ListCache(self.metrics, "tag_list")
        self.catalog = ListCache(self.metrics, "catalog")
        self.touches = Touches(self)
        self.policies = Policies.from_config(self.config)
        self.readonly = ReadOnly(self.config.storage.maintenance.readonly.enabled, self.kv)
        self.space = Space(self.kv, self.metrics, "etcd" if self.config.coordinator.etcd is not None else "embedded")
        self.notifier = Notifier(self.config, self.kv, self.metrics)
        self.trust = Trust(self, self.config.signatures.policies)
        self.uploader.quotas_for = self.policies.quota_scopes
        self.uploader.max_sessions = self.config.http.uploads.maxsessions

    @classmethod
    def build(cls, config: Config, kv: KV, storage: StorageDriver, metrics: Metrics | None = None) -> Services:
        metrics = metrics or Metrics()
        kv = InstrumentedKV(kv, metrics)
        storage = InstrumentedStorage(storage, metrics)
        metadata = Metadata(kv, address=layout.blob_key)
        sessions = UploadSessions(kv)
        lease = NodeLease(kv, max(config.cluster.leasettl, 2))
        return cls(
            config,
            kv,
            storage,
            metadata,
            sessions,
            Uploader(storage, sessions, metadata, lease),
            ManifestCache(metrics),
            BlobLocations(metadata, metrics),
            metrics,
            config.cluster.node or f"{socket.gethostname()}:{config.http.listen.port or 'unix'}:{os.getpid()}",
        )

    async def close(self) -> None:
        await self.uploader.lease.close()
        await self.storage.close()
        await self.kv.close()
