"""Prometheus metrics: requests, bytes, storage and coordinator latency, uploads, leadership, caches."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from coordinator.kv import KV, Compare, KeyValue, Op, Snapshot, TxnResult, Watch

from .storage.driver import StorageDriver, StoredObject, UploadState

T = TypeVar("T")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Where worker processes of one `wharf serve` share their figures (prometheus multiprocess mode).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class Metrics:
    def __init__(self) -> None:
        if os.environ.get(MULTIPROC_ENV):
            # prometheus_client picks its value store when first imported; a worker forked from a
            # parent that imported it earlier must pick again to share figures through the files.
            from prometheus_client import values

            values.ValueClass = values.get_value_class()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("wharf_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=r)
        self.request_duration = Histogram(
            "wharf_http_request_duration_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.bytes_in = Counter("wharf_http_request_bytes_total", "Request body bytes received", ["route"], registry=r)
        self.bytes_out = Counter("wharf_http_response_bytes_total", "Response body bytes sent", ["route"], registry=r)
        self.storage_duration = Histogram(
            "wharf_storage_operation_duration_seconds",
            "Storage driver operation latency",
            ["driver", "operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.storage_errors = Counter(
            "wharf_storage_errors_total", "Storage driver operations that failed", ["driver", "operation"], registry=r
        )
        self.kv_duration = Histogram(
            "wharf_coordinator_operation_duration_seconds",
            "Coordinator KV operation latency",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_errors = Counter(
            "wharf_coordinator_errors_total", "Coordinator KV operations that failed", ["operation"], registry=r
        )
        self.upload_sessions = Gauge(
            "wharf_upload_sessions_open", "Upload sessions open in the cluster", registry=r, multiprocess_mode="max"
        )
        self.leader = Gauge(
            "wharf_leader", "1 while this node leads a cluster job", ["job"], registry=r, multiprocess_mode="max"
        )
        self.storage_corrupt = Counter(
            "wharf_storage_corrupt_objects_total",
            "Stored objects found not to match their digest (on read, or by wharf scrub)",
            ["kind"],
            registry=r,
        )
        self.cache_hits = Counter("wharf_cache_hits_total", "Cache hits", ["cache"], registry=r)
        self.cache_misses = Counter("wharf_cache_misses_total", "Cache misses", ["cache"], registry=r)
        self.uploads_purged = Counter("wharf_upload_sessions_purged_total", "Abandoned uploads removed", registry=r)
        self.gc_runs = Counter("wharf_gc_runs_total", "Garbage collection cycles", ["result"], registry=r)
        self.gc_duration = Histogram(
            "wharf_gc_duration_seconds",
            "Garbage collection cycle duration",
            buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
            registry=r,
        )
        self.gc_blobs_deleted = Counter("wharf_gc_blobs_deleted_total", "Blobs deleted by GC", registry=r)
        self.gc_manifests_deleted = Counter("wharf_gc_manifests_deleted_total", "Manifests deleted by GC", registry=r)
        self.gc_bytes_freed = Counter("wharf_gc_bytes_freed_total", "Bytes freed by GC", registry=r)
        self.gc_unaccounted_objects = Gauge(
            "wharf_gc_unaccounted_objects",
            "Storage objects no Wharf record names (never deleted unless asked), at the last sweep",
            registry=r,
            multiprocess_mode="max",
        )
        self.gc_unaccounted_bytes = Gauge(
            "wharf_gc_unaccounted_bytes",
            "Bytes of storage objects no Wharf record names, at the last sweep",
            registry=r,
            multiprocess_mode="max",
        )
        self.gc_held_back_bytes = Gauge(
            "wharf_gc_held_back_bytes",
            "Bytes the last cycle kept although nothing used them, by reason",
            ["reason"],
            registry=r,
            multiprocess_mode="max",
        )
        self.import_repositories = Gauge(
            "wharf_import_repositories",
            "Repositories of an adopted registry:2 store: done and total",
            ["state"],
            registry=r,
            multiprocess_mode="max",
        )
        self.gc_reclaimable_bytes = Gauge(
            "wharf_gc_reclaimable_bytes", "Bytes a running cycle found reclaimable", registry=r, multiprocess_mode="max"
        )

        # Coordinator snapshots the leader writes into the storage (node/backup.py).
        self.backup_last_timestamp = Gauge(
            "wharf_backup_last_snapshot_timestamp_seconds",
            "When the last coordinator snapshot in the storage was taken",
            registry=r,
            multiprocess_mode="max",
        )
        self.backup_last_bytes = Gauge(
            "wharf_backup_last_snapshot_bytes",
            "Compressed size of the last coordinator snapshot",
            registry=r,
            multiprocess_mode="max",
        )
        self.backup_last_keys = Gauge(
            "wharf_backup_last_snapshot_keys",
            "Keys in the last coordinator snapshot",
            registry=r,
            multiprocess_mode="max",
        )
        self.backup_last_duration = Gauge(
            "wharf_backup_last_snapshot_duration_seconds",
            "How long the last coordinator snapshot took to write",
            registry=r,
            multiprocess_mode="max",
        )
        self.backup_snapshots = Counter(
            "wharf_backup_snapshots_total", "Coordinator snapshots written into the storage", ["result"], registry=r
        )

    def observe_request(self, method: str, route: str, status: int, received: int, sent: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_duration.labels(method, route).observe(seconds)
        if received:
            self.bytes_in.labels(route).inc(received)
        if sent:
            self.bytes_out.labels(route).inc(sent)

    def exposition(self) -> bytes:
        """The text format for a scrape; all workers' figures when they share a directory."""
        if os.environ.get(MULTIPROC_ENV):
            combined = CollectorRegistry()
            MultiProcessCollector(combined)
            return generate_latest(combined)
        return generate_latest(self.registry)


class _Timer:
    def __init__(self, histogram: Histogram, errors: Counter, labels: Sequence[str]) -> None:
        self.histogram = histogram
        self.errors = errors
        self.labels = labels

    async def run(self, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await call
        except Exception:
            self.errors.labels(*self.labels).inc()
            raise
        finally:
            self.histogram.labels(*self.labels).observe(time.perf_counter() - started)


class InstrumentedKV:
    """A KV that times every call; the contract is unchanged."""

    def __init__(self, kv: KV, metrics: Metrics) -> None:
        self.inner = kv
        self._metrics = metrics

    def _timed(self, operation: str) -> _Timer:
        return _Timer(self._metrics.kv_duration, self._metrics.kv_errors, (operation,))

    async def get(self, key: str) -> KeyValue | None:
        return await self._timed("get").run(self.inner.get(key))

    async def range(self, prefix: str, *, start: str | None = None, limit: int = 0) -> list[KeyValue]:
        return await self._timed("range").run(self.inner.range(prefix, start=start, limit=limit))

    async def count(self, prefix: str) -> int:
        return await self._timed("count").run(self.inner.count(prefix))

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        return await self._timed("put").run(self.inner.put(key, value, lease=lease))

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        return await self._timed("delete").run(self.inner.delete(key, prefix=prefix))

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        return await self._timed("txn").run(self.inner.txn(compares, success, failure))

    async def grant_lease(self, ttl: int) -> int:
        return await self._timed("grant_lease").run(self.inner.grant_lease(ttl))

    async def refresh_lease(self, lease: int) -> bool:
        return await self._timed("refresh_lease").run(self.inner.refresh_lease(lease))

    async def revoke_lease(self, lease: int) -> None:
        await self._timed("revoke_lease").run(self.inner.revoke_lease(lease))

    async def watch(self, prefix: str, *, start_revision: int = 0) -> Watch:
        return await self.inner.watch(prefix, start_revision=start_revision)

    def snapshot(self) -> AbstractAsyncContextManager[Snapshot]:
        return self.inner.snapshot()

    async def ping(self) -> None:
        await self._timed("ping").run(self.inner.ping())

    async def close(self) -> None:
        await self.inner.close()


class InstrumentedStorage:
    """A storage driver that times every call; streams are timed to their last chunk."""

    def __init__(self, driver: StorageDriver, metrics: Metrics) -> None:
        self.inner = driver
        self.name = driver.name
        self._metrics = metrics

    def _timed(self, operation: str) -> _Timer:
        return _Timer(self._metrics.storage_duration, self._metrics.storage_errors, (self.name, operation))

    async def stat(self, key: str) -> int | None:
        return await self._timed("stat").run(self.inner.stat(key))

    async def read(self, key: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        try:
            async for chunk in self.inner.read(key, offset, length):
                yield chunk
        except Exception:
            self._metrics.storage_errors.labels(self.name, "read").inc()
            raise
        finally:
            self._metrics.storage_duration.labels(self.name, "read").observe(time.perf_counter() - started)

    async def modified(self, key: str) -> float | None:
        return await self._timed("modified").run(self.inner.modified(key))

    async def read_bytes(self, key: str) -> bytes:
        return await self._timed("read_bytes").run(self.inner.read_bytes(key))

    async def write_bytes(self, key: str, data: bytes) -> None:
        await self._timed("write_bytes").run(self.inner.write_bytes(key, data))

    async def write_stream(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        return await self._timed("write_stream").run(self.inner.write_stream(key, chunks))

    async def copy(self, source: str, key: str) -> int:
        return await self._timed("copy").run(self.inner.copy(source, key))

    async def delete(self, key: str) -> None:
        await self._timed("delete").run(self.inner.delete(key))

    async def delete_many(self, keys: list[str]) -> None:
        await self._timed("delete_many").run(self.inner.delete_many(keys))

    def list(self, prefix: str) -> AsyncIterator[str]:
        return self.inner.list(prefix)

    def list_objects(self, prefix: str) -> AsyncIterator[StoredObject]:
        return self.inner.list_objects(prefix)

    async def redirect_url(self, key: str) -> str | None:
        return await self._timed("redirect_url").run(self.inner.redirect_url(key))

    def local_path(self, key: str) -> str | None:
        return self.inner.local_path(key)

    async def upload_start(self, upload_key: str) -> UploadState:
        return await self._timed("upload_start").run(self.inner.upload_start(upload_key))

    async def upload_write(
        self, upload_key: str, state: UploadState, offset: int, chunks: AsyncIterator[bytes]
    ) -> tuple[int, UploadState]:
        return await self._timed("upload_write").run(self.inner.upload_write(upload_key, state, offset, chunks))

    async def upload_commit(self, upload_key: str, state: UploadState, size: int, key: str) -> str:
        return await self._timed("upload_commit").run(self.inner.upload_commit(upload_key, state, size, key))

    async def upload_abort(self, upload_key: str, state: UploadState) -> None:
        await self._timed("upload_abort").run(self.inner.upload_abort(upload_key, state))

    async def close(self) -> None:
        await self.inner.close()


def metrics_app(metrics: Metrics) -> Callable[..., Any]:
    """A tiny ASGI app for the debug listener: /metrics and /debug/health."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    async def scrape(request: Request) -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def health(request: Request) -> Response:
        return Response(b"{}", media_type="application/json")

    return Starlette(routes=[Route("/metrics", scrape), Route("/debug/health", health)])
