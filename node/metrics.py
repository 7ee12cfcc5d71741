"""Prometheus metrics: requests, bytes, storage and coordinator latency, uploads, leadership, caches."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from coordinator.kv import KV, Compare, KeyValue, Op, Snapshot, StoreSpace, TxnResult, Watch

from .storage.driver import StorageDriver, StoredObject, UploadState, WholeUploads

T = TypeVar("T")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# CNCF Distribution's own series (registry:2 with http.debug.prometheus.enabled), with its buckets, so
# dashboards and alerts built on registry:2 keep working: seen on Debian's docker-registry 2.8.2.
_DISTRIBUTION_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60)
_DISTRIBUTION_SIZE_BUCKETS = tuple(1024 * 2**i for i in range(22))  # 1 KiB .. 2 GiB
_DISTRIBUTION_STORAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Distribution's storage driver names and action names for Wharf's driver operations.
_DISTRIBUTION_DRIVERS = {"s3": "s3aws"}
_DISTRIBUTION_ACTIONS = {
    "stat": "Stat",
    "modified": "Stat",
    "read": "Reader",
    "read_bytes": "GetContent",
    "write_bytes": "PutContent",
    "write_stream": "Writer",
    "delete": "Delete",
    "delete_many": "Delete",
    "redirect_url": "URLFor",
    "upload_start": "Writer",
    "upload_write": "Writer",
    "upload_commit": "Move",
    "upload_abort": "Delete",
}


def distribution_handler(path: str) -> str | None:
    """Distribution's handler name for a request path (its metrics' `handler` label); None off the API.

    Decided from the path alone, the way the route table decides, so it is known when a request starts.
    """
    if not path.startswith("/v2/"):
        return None
    if path == "/v2/":
        return "base"
    if path == "/v2/_catalog":
        return "catalog"
    if path.endswith("/tags/list"):
        return "tags"
    head, _, last = path.rpartition("/")
    parent = head.rpartition("/")[2]
    if parent == "manifests":
        return "manifest"
    if parent == "blobs":
        return "blob"
    if parent == "uploads" and head.endswith("/blobs/uploads"):
        return "blob_upload_chunk" if last else "blob_upload"
    if parent == "referrers":
        return "referrers"
    return None


# Request-path updates are written out at the latest this long after they were made, under load.
_FLUSH_SECONDS = 0.05
# When idle, they are written at once, but not more often than this.
_IDLE_FLUSH_GAP = 0.01
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

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def gauge(
            name: str, doc: str, labels: Sequence[str] = (), mode: Literal["max", "min", "livesum"] = "max"
        ) -> Gauge:
            """With worker processes a gauge's series are combined by `mode`: most are set by the
            leader or by every worker alike, so the largest value is the figure."""
            return Gauge(name, doc, labels, registry=r, multiprocess_mode=mode)

        def histogram(name: str, doc: str, labels: Sequence[str] = (), **options: Any) -> Histogram:
            return Histogram(name, doc, labels, registry=r, **options)

        self.requests = counter("wharf_http_requests_total", "HTTP requests", ["method", "route", "status"])
        self.request_duration = histogram(
            "wharf_http_request_duration_seconds", "HTTP request latency", ["method", "route"], buckets=_LATENCY_BUCKETS
        )
        self.bytes_in = counter("wharf_http_request_bytes_total", "Request body bytes received", ["route"])
        self.bytes_out = counter("wharf_http_response_bytes_total", "Response body bytes sent", ["route"])
        self.registry_requests = counter(
            "registry_http_requests_total", "Total number of HTTP requests made.", ["code", "handler", "method"]
        )
        self.registry_request_duration = histogram(
            "registry_http_request_duration_seconds",
            "The HTTP request latencies in seconds.",
            ["handler", "method"],
            buckets=_DISTRIBUTION_LATENCY_BUCKETS,
        )
        self.registry_request_size = histogram(
            "registry_http_request_size_bytes",
            "The HTTP request sizes in bytes.",
            ["handler"],
            buckets=_DISTRIBUTION_SIZE_BUCKETS,
        )
        self.registry_response_size = histogram(
            "registry_http_response_size_bytes",
            "The HTTP response sizes in bytes.",
            ["handler"],
            buckets=_DISTRIBUTION_SIZE_BUCKETS,
        )
        self.registry_in_flight = gauge(
            "registry_http_in_flight_requests", "The in-flight HTTP requests", ["handler"], mode="livesum"
        )
        self.registry_storage_action = histogram(
            "registry_storage_action_seconds",
            "The number of seconds that the storage action takes",
            ["action", "driver"],
            buckets=_DISTRIBUTION_STORAGE_BUCKETS,
        )
        # Series children by label values, resolved once: `labels()` costs more than the update itself.
        self._request_series: dict[tuple[str, str, int, str | None], _RequestSeries] = {}
        self._in_flight_gauges: dict[str, Any] = {}
        # Updates on the request path are gathered here and written out together (see `flush`).
        self._counts: dict[Any, float] = {}
        self._observed: dict[Any, list[float]] = {}
        self._in_flight: dict[str, int] = {}
        self._in_flight_changed: set[str] = set()
        self._in_flight_written: dict[str, int] = {}
        self._busy = 0
        self._flush_due: asyncio.TimerHandle | None = None
        self._flush_at = 0.0  # when _flush_due runs
        self._flushed = 0.0  # when the last flush ran
        self.storage_duration = histogram(
            "wharf_storage_operation_duration_seconds",
            "Storage driver operation latency",
            ["driver", "operation"],
            buckets=_LATENCY_BUCKETS,
        )
        self.storage_errors = counter(
            "wharf_storage_errors_total", "Storage driver operations that failed", ["driver", "operation"]
        )
        self.kv_duration = histogram(
            "wharf_coordinator_operation_duration_seconds",
            "Coordinator KV operation latency",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
        )
        self.kv_errors = counter(
            "wharf_coordinator_errors_total", "Coordinator KV operations that failed", ["operation"]
        )
        # Room in the coordinator's store, from etcd's status of each member (or the embedded file).
        self.coordinator_db_size = gauge(
            "wharf_coordinator_db_size_bytes",
            "Bytes the coordinator's database takes on disk, per etcd member (or the embedded file)",
            ["member"],
        )
        self.coordinator_db_in_use = gauge(
            "wharf_coordinator_db_size_in_use_bytes",
            "Bytes of the coordinator's database holding data (the rest a defragmentation gives back)",
            ["member"],
        )
        self.coordinator_quota = gauge(
            "wharf_coordinator_quota_bytes",
            "Size at which the coordinator refuses writes (etcd --quota-backend-bytes; embedded: file and free disk)",
            ["member"],
        )
        self.coordinator_used = gauge(
            "wharf_coordinator_quota_used_ratio",
            "Share of its quota the fullest coordinator member takes (writes stop at 1)",
        )
        self.coordinator_revision = gauge("wharf_coordinator_revision", "The coordinator's current revision")
        self.coordinator_alarm = gauge(
            "wharf_coordinator_alarm",
            "1 while a coordinator member has the alarm raised (NOSPACE: out of space, writes refused)",
            ["member", "alarm"],
        )
        self.coordinator_writes_refused = counter(
            "wharf_coordinator_writes_refused_total", "Writes the coordinator refused for lack of space (answered 503)"
        )
        self.coordinator_compacted_revision = gauge(
            "wharf_coordinator_compacted_revision",
            "The revision the leader last compacted the coordinator's history to",
        )
        self.upload_sessions = gauge("wharf_upload_sessions_open", "Upload sessions open in the cluster")
        self.leader = gauge("wharf_leader", "1 while this node leads a cluster job", ["job"])
        self.storage_corrupt = counter(
            "wharf_storage_corrupt_objects_total",
            "Stored objects found not to match their digest (on read, or by wharf scrub)",
            ["kind"],
        )
        self.blobs_missing = counter(
            "wharf_blobs_missing_total",
            "Blob GETs whose content was missing from storage (answered BLOB_UNKNOWN; see the log to repair)",
        )
        self.cache_hits = counter("wharf_cache_hits_total", "Cache hits", ["cache"])
        self.cache_misses = counter("wharf_cache_misses_total", "Cache misses", ["cache"])
        self.uploads_purged = counter("wharf_upload_sessions_purged_total", "Abandoned uploads removed")
        self.gc_runs = counter("wharf_gc_runs_total", "Garbage collection cycles", ["result"])
        self.gc_duration = histogram(
            "wharf_gc_duration_seconds",
            "Garbage collection cycle duration",
            buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
        )
        self.gc_blobs_deleted = counter("wharf_gc_blobs_deleted_total", "Blobs deleted by GC")
        self.gc_manifests_deleted = counter("wharf_gc_manifests_deleted_total", "Manifests deleted by GC")
        self.gc_bytes_freed = counter("wharf_gc_bytes_freed_total", "Bytes freed by GC")
        self.gc_unaccounted_objects = gauge(
            "wharf_gc_unaccounted_objects",
            "Storage objects no Wharf record names (never deleted unless asked), at the last sweep",
        )
        self.gc_unaccounted_bytes = gauge(
            "wharf_gc_unaccounted_bytes", "Bytes of storage objects no Wharf record names, at the last sweep"
        )
        self.gc_held_back_bytes = gauge(
            "wharf_gc_held_back_bytes", "Bytes the last cycle kept although nothing used them, by reason", ["reason"]
        )
        self.import_repositories = gauge(
            "wharf_import_repositories", "Repositories of an adopted registry:2 store: done and total", ["state"]
        )
        self.gc_reclaimable_bytes = gauge("wharf_gc_reclaimable_bytes", "Bytes a running cycle found reclaimable")

        # Webhook notifications (node/notifications.py): Distribution 3's series, then Wharf's.
        self.notifications_events = counter(
            "registry_notifications_events_total", "The number of total events", ["type", "endpoint"]
        )
        self.notifications_status = counter(
            "registry_notifications_status_total", "The number of status code", ["code", "endpoint"]
        )
        self.notifications_pending = gauge(
            "registry_notifications_pending_total",
            "The gauge of pending events in queue (the cluster's, reported by the leader)",
            ["endpoint"],
        )
        self.notifications_oldest = gauge(
            "wharf_notifications_oldest_pending_seconds",
            "Age of the oldest event still queued for an endpoint (reported by the leader)",
            ["endpoint"],
        )
        self.notifications_inbox = gauge(
            "wharf_notifications_unsequenced_events",
            "Events recorded but not yet queued per endpoint (reported by the leader)",
        )
        self.notifications_delivery = histogram(
            "wharf_notifications_delivery_seconds",
            "Time to post one envelope of events to an endpoint",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
        )
        self.notifications_unrecorded = counter(
            "wharf_notifications_unrecorded_events_total",
            "Pull events lost because the coordinator could not take them (the pull was served)",
        )

        # Coordinator snapshots the leader writes into the storage (node/backup.py).
        self.backup_last_timestamp = gauge(
            "wharf_backup_last_snapshot_timestamp_seconds",
            "When the last coordinator snapshot in the storage was taken",
        )
        self.backup_last_bytes = gauge(
            "wharf_backup_last_snapshot_bytes", "Compressed size of the last coordinator snapshot"
        )
        self.backup_last_keys = gauge("wharf_backup_last_snapshot_keys", "Keys in the last coordinator snapshot")
        self.backup_last_duration = gauge(
            "wharf_backup_last_snapshot_duration_seconds", "How long the last coordinator snapshot took to write"
        )
        self.backup_snapshots = counter(
            "wharf_backup_snapshots_total", "Coordinator snapshots written into the storage", ["result"]
        )

        # Signature policies (node/trust.py): every pull they decide, and every verification they run.
        self.signature_pulls = counter(
            "wharf_signature_pulls_total",
            "Manifest pulls under a signature policy, by rule and decision (allowed, warned, refused)",
            ["rule", "decision"],
        )
        self.signature_verifications = counter(
            "wharf_signature_verifications_total",
            "Signature look-ups not answered from the verified cache, by rule and result",
            ["rule", "result"],
        )
        self.signature_tags_refused = counter(
            "wharf_signature_tags_refused_total",
            "Tag pushes refused because the image is unsigned (requiresignedtags), by rule",
            ["rule"],
        )

        # Storage per repository, namespace and the registry (node/usage.py): the leader publishes them.
        self.storage = StorageFigures(os.environ.get(MULTIPROC_ENV) or None)
        if not os.environ.get(MULTIPROC_ENV):
            r.register(self.storage)

        # The pull-through cache (node/proxy/): per upstream, what was served from the cache and what
        # had to come from the upstream.
        self.proxy_hits = counter(
            "wharf_proxy_hits_total",
            "Pulls of cached repositories served from the cache, by upstream and kind (manifest, blob)",
            ["upstream", "kind"],
        )
        self.proxy_misses = counter(
            "wharf_proxy_misses_total",
            "Pulls of cached repositories fetched from the upstream, by upstream and kind",
            ["upstream", "kind"],
        )
        self.proxy_stale = counter(
            "wharf_proxy_stale_total",
            "Cached tags served past their TTL because the upstream was down or refused to answer",
            ["upstream"],
        )
        self.proxy_upstream_bytes = counter(
            "wharf_proxy_upstream_bytes_total", "Bytes fetched from an upstream (blobs and manifests)", ["upstream"]
        )
        self.proxy_upstream_errors = counter(
            "wharf_proxy_upstream_errors_total",
            "Upstream requests that failed, by reason (unavailable, ratelimited, refused, invalid)",
            ["upstream", "reason"],
        )
        self.proxy_evictions = counter(
            "wharf_proxy_evictions_total", "Cached images evicted by the byte budget", ["upstream"]
        )
        self.proxy_evicted_bytes = counter(
            "wharf_proxy_evicted_bytes_total", "Bytes the evicted images no longer keep", ["upstream"]
        )
        self.proxy_usage = gauge(
            "wharf_proxy_cache_bytes", "Bytes an upstream's cached images use (reported by the leader)", ["upstream"]
        )
        self.proxy_budget = gauge(
            "wharf_proxy_cache_budget_bytes",
            "An upstream's byte budget (proxy.upstreams maxbytes; 0: none)",
            ["upstream"],
        )

        # Regions (node/regions.py, node/replication.py): storage health, fallback reads, replication lag.
        self.region_storage_up = gauge(
            "wharf_region_storage_up", "1 while a region's storage answers this node's probes", ["region"], mode="min"
        )
        self.region_fallback_reads = counter(
            "wharf_region_fallback_reads_total",
            "Blob and manifest reads served from another region's storage (not yet replicated here, or ours down)",
            ["region"],
        )
        self.replication_pending = gauge(
            "wharf_replication_pending_blobs",
            "Blobs and manifests waiting to be copied into a region (reported by the leader)",
            ["region"],
        )
        self.replication_pending_bytes = gauge(
            "wharf_replication_pending_bytes",
            "Bytes waiting to be copied into a region (reported by the leader)",
            ["region"],
        )
        self.replication_oldest = gauge(
            "wharf_replication_oldest_pending_seconds",
            "Age of the oldest copy waiting for a region (reported by the leader; 0 when none waits)",
            ["region"],
        )
        self.replication_copies = counter(
            "wharf_replication_copies_total",
            "Copies into a region by this node: copied, present (already there), failed",
            ["region", "result"],
        )
        self.replication_bytes = counter(
            "wharf_replication_bytes_total", "Bytes this node copied into a region", ["region"]
        )

    # -- updates on the request path ------------------------------------------------------------
    #
    # With worker processes every update of a prometheus value is a write into a shared file under
    # a lock (3 us for a counter, 9 us for a histogram here), and a manifest GET makes a dozen. The
    # request path instead adds to plain dicts, written out as soon as no request is in flight, or
    # within 50 ms under load: one write per series per flush, whatever the traffic.

    def add(self, child: Any, amount: float = 1.0) -> None:
        """Count into a counter child."""
        self._counts[child] = self._counts.get(child, 0.0) + amount
        if self._flush_due is None:
            self._schedule_flush()

    def observe(self, child: Any, value: float) -> None:
        """Observe into a histogram child."""
        entry = self._observed.get(child)
        if entry is None:
            entry = self._observed[child] = [0.0] * (len(child._upper_bounds) + 1)
        entry[0] += value
        entry[1 + bisect.bisect_left(child._upper_bounds, value)] += 1
        if self._flush_due is None:
            self._schedule_flush()

    def request_started(self, handler: str | None) -> None:
        self._busy += 1
        if handler is not None:
            self._in_flight[handler] = self._in_flight.get(handler, 0) + 1
            self._in_flight_changed.add(handler)

    def request_finished(self, handler: str | None) -> None:
        self._busy -= 1
        if handler is not None:
            self._in_flight[handler] -= 1
            self._in_flight_changed.add(handler)
        if self._busy <= 0:
            # Idle: figures are made current for the next scrape, at once unless they were a moment
            # ago (a worker that answers one request at a time is idle after every request).
            due = self._flushed + _IDLE_FLUSH_GAP
            if time.monotonic() >= due:
                self.flush()
            elif self._flush_due is None or self._flush_at > due:
                self._schedule_flush(due)
        elif self._flush_due is None:
            self._schedule_flush()

    def _schedule_flush(self, at: float | None = None) -> None:
        """A flush at `at` (time.monotonic(); default: _FLUSH_SECONDS from now), unless one is due by then."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a command line run): written at the next flush
        now = time.monotonic()
        if at is None:
            at = now + _FLUSH_SECONDS
        if self._flush_due is not None:
            if self._flush_at <= at:
                return
            self._flush_due.cancel()
        self._flush_due = loop.call_later(max(0.0, at - now), self.flush)
        self._flush_at = at

    def flush(self) -> None:
        """Write what the request path gathered into the prometheus values."""
        self._flushed = time.monotonic()
        if self._flush_due is not None:
            self._flush_due.cancel()
            self._flush_due = None
        counts, self._counts = self._counts, {}
        observed, self._observed = self._observed, {}
        for child, amount in counts.items():
            child.inc(amount)
        for child, entry in observed.items():
            # What Histogram.observe does, once per series instead of once per observation.
            child._sum.inc(entry[0])
            for bucket, count in zip(child._buckets, entry[1:], strict=True):
                if count:
                    bucket.inc(count)
        changed, self._in_flight_changed = self._in_flight_changed, set()
        for handler in changed:
            value = self._in_flight[handler]
            if self._in_flight_written.get(handler) == value:
                continue  # back where it was (a request came and went)
            gauge = self._in_flight_gauges.get(handler)
            if gauge is None:
                gauge = self._in_flight_gauges[handler] = self.registry_in_flight.labels(handler)
            gauge.set(value)
            self._in_flight_written[handler] = value

    def observe_request(
        self,
        method: str,
        route: str,
        status: int,
        received: int,
        sent: int,
        seconds: float,
        *,
        handler: str | None = None,
        request_size: int = 0,
    ) -> None:
        key = (method, route, status, handler)
        series = self._request_series.get(key)
        if series is None:
            series = self._request_series[key] = _RequestSeries(self, method, route, status, handler)
        self.add(series.requests)
        self.observe(series.duration, seconds)
        if received:
            self.add(series.bytes_in, received)
        if sent:
            self.add(series.bytes_out, sent)
        if series.registry_requests is not None:
            self.add(series.registry_requests)
            self.observe(series.registry_duration, seconds)
            self.observe(series.registry_request_size, request_size)
            self.observe(series.registry_response_size, sent)

    def exposition(self) -> bytes:
        """The text format for a scrape; all workers' figures when they share a directory."""
        self.flush()
        if os.environ.get(MULTIPROC_ENV):
            combined = CollectorRegistry()
            MultiProcessCollector(combined)
            combined.register(StorageFigures(os.environ[MULTIPROC_ENV]))
            return generate_latest(combined)
        return generate_latest(self.registry)


# Where the leader's worker leaves the storage figures for the process that answers scrapes.
_STORAGE_FILE = "wharf-storage-figures.json"
# Figures a leader published this long ago (and never replaced: it died) are not shown.
_STORAGE_STALE_SECONDS = 300.0
_STORAGE_KINDS = ("linked", "exclusive", "shared")


class StorageFigures:
    """Gauges of the storage figures the leader last published, made at scrape time.

    Kept out of the shared value files on purpose: a repository that leaves the largest N leaves
    the metrics with it, so the series stay the N largest repositories and namespaces, the rest
    summed (`_other`), and the registry's total, however many repositories there are.
    """

    def __init__(self, directory: str | None = None) -> None:
        self._path = os.path.join(directory, _STORAGE_FILE) if directory else None
        self._figures: dict[str, Any] | None = None

    def publish(self, figures: dict[str, Any] | None) -> None:
        """Show `figures` ({"total": {...}, "repositories": {name: {...}}, ...}); None: show none."""
        self._figures = None if figures is None else {**figures, "at": time.time()}
        if self._path is None:
            return
        if self._figures is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
            return
        fd, temporary = tempfile.mkstemp(dir=os.path.dirname(self._path), prefix=".storage-")
        with os.fdopen(fd, "w") as out:
            json.dump(self._figures, out)
        os.replace(temporary, self._path)

    def _current(self) -> dict[str, Any] | None:
        figures = self._figures
        if self._path is not None:
            try:
                with open(self._path) as found:
                    figures = json.load(found)
            except (OSError, ValueError):
                return None
        if figures is None or figures.get("at", 0) < time.time() - _STORAGE_STALE_SECONDS:
            return None
        return figures

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        figures = self._current()
        if figures is None:
            return
        total = figures["total"]
        registry = GaugeMetricFamily(
            "wharf_storage_bytes",
            "Bytes the registry's repositories hold: unique counts each object once, linked once per repository",
            labels=["kind"],
        )
        for kind in ("unique", "linked"):
            registry.add_metric([kind], total.get(kind, 0))
        yield registry
        yield GaugeMetricFamily(
            "wharf_storage_objects", "Objects (blobs and manifests) repositories hold", value=total.get("objects", 0)
        )
        for scope, key in (("repository", "repositories"), ("namespace", "namespaces")):
            family = GaugeMetricFamily(
                f"wharf_storage_{scope}_bytes",
                f'Bytes per {scope}, the largest by linked bytes (the rest summed as {scope}="_other"); '
                "exclusive: what deleting it frees",
                labels=[scope, "kind"],
            )
            for name, values in figures.get(key, {}).items():
                for kind in _STORAGE_KINDS:
                    family.add_metric([name, kind], values.get(kind, 0))
            yield family


class _RequestSeries:
    """The series one kind of request updates: Wharf's by route, Distribution's by handler."""

    def __init__(self, metrics: Metrics, method: str, route: str, status: int, handler: str | None) -> None:
        self.requests = metrics.requests.labels(method, route, str(status))
        self.duration = metrics.request_duration.labels(method, route)
        self.bytes_in = metrics.bytes_in.labels(route)
        self.bytes_out = metrics.bytes_out.labels(route)
        self.registry_requests: Any = None
        if handler is not None:
            self.registry_requests = metrics.registry_requests.labels(str(status), handler, method.lower())
            self.registry_duration = metrics.registry_request_duration.labels(handler, method.lower())
            self.registry_request_size = metrics.registry_request_size.labels(handler)
            self.registry_response_size = metrics.registry_response_size.labels(handler)


class _Timer:
    """Times calls into one histogram child (and Distribution's, for storage), counting failures."""

    def __init__(self, metrics: Metrics, histogram: Any, errors: Any, also: Any = None) -> None:
        self.metrics = metrics
        self.histogram = histogram
        self.errors = errors
        self.also = also

    def observe(self, seconds: float) -> None:
        self.metrics.observe(self.histogram, seconds)
        if self.also is not None:
            self.metrics.observe(self.also, seconds)

    def failed(self) -> None:
        self.metrics.add(self.errors)

    async def run(self, call: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await call
        except Exception:
            self.failed()
            raise
        finally:
            self.observe(time.perf_counter() - started)


class InstrumentedKV:
    """A KV that times every call; the contract is unchanged."""

    def __init__(self, kv: KV, metrics: Metrics) -> None:
        self.inner = kv
        self._metrics = metrics
        self._timers: dict[str, _Timer] = {}

    def _timed(self, operation: str) -> _Timer:
        timer = self._timers.get(operation)
        if timer is None:
            m = self._metrics
            timer = self._timers[operation] = _Timer(m, m.kv_duration.labels(operation), m.kv_errors.labels(operation))
        return timer

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

    async def space(self) -> StoreSpace:
        return await self._timed("space").run(self.inner.space())

    async def compact(self, revision: int) -> None:
        await self._timed("compact").run(self.inner.compact(revision))

    async def defragment(self, member: str | None = None) -> None:
        await self._timed("defragment").run(self.inner.defragment(member))

    async def disarm(self) -> tuple[str, ...]:
        return await self._timed("disarm").run(self.inner.disarm())

    async def close(self) -> None:
        await self.inner.close()


class InstrumentedStorage:
    """A storage driver that times every call; streams are timed to their last chunk."""

    def __init__(self, driver: StorageDriver, metrics: Metrics) -> None:
        self.inner = driver
        self.name = driver.name
        self._metrics = metrics
        self._timers: dict[str, _Timer] = {}
        if isinstance(driver, WholeUploads):
            # Offered only where the driver has them, so that callers can ask this wrapper as they would it.
            whole = driver

            def stat_now(key: str) -> int | None:
                timer, started = self._timed("stat"), time.perf_counter()
                try:
                    return whole.stat_now(key)
                except Exception:
                    timer.failed()
                    raise
                finally:
                    timer.observe(time.perf_counter() - started)

            async def upload_whole(upload_key: str, data: bytes, key: str) -> str:
                return await self._timed("upload_commit").run(whole.upload_whole(upload_key, data, key))

            self.stat_now = stat_now
            self.upload_whole = upload_whole

    def _timed(self, operation: str) -> _Timer:
        timer = self._timers.get(operation)
        if timer is None:
            m = self._metrics
            action = _DISTRIBUTION_ACTIONS.get(operation)
            also = None
            if action is not None:
                also = m.registry_storage_action.labels(action, _DISTRIBUTION_DRIVERS.get(self.name, self.name))
            timer = self._timers[operation] = _Timer(
                m, m.storage_duration.labels(self.name, operation), m.storage_errors.labels(self.name, operation), also
            )
        return timer

    async def stat(self, key: str) -> int | None:
        return await self._timed("stat").run(self.inner.stat(key))

    async def read(self, key: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        timer = self._timed("read")
        started = time.perf_counter()
        try:
            async for chunk in self.inner.read(key, offset, length):
                yield chunk
        except Exception:
            timer.failed()
            raise
        finally:
            timer.observe(time.perf_counter() - started)

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


def debug_app(
    registry: CollectorRegistry,
    path: str = "/metrics",
    *,
    metrics: bool = True,
    health: Callable[[], dict[str, str]] | None = None,
) -> Any:
    """The debug listener's WSGI app: Prometheus metrics at `path` (unless `metrics` is off, as
    `http.debug.prometheus.enabled: false` asks) and `/debug/health`: as registry:2's, the failing
    health checks (`health()`: name -> why) and 503, or `{}` and 200."""
    from prometheus_client import CONTENT_TYPE_LATEST

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        route = environ.get("PATH_INFO", "")
        if metrics and route == path:
            body, media_type, status = generate_latest(registry), CONTENT_TYPE_LATEST, "200 OK"
        elif route == "/debug/health":
            failing = health() if health is not None else {}
            body, media_type = json.dumps(failing).encode(), "application/json"
            status = "503 Service Unavailable" if failing else "200 OK"
        else:
            body, media_type, status = b"404 page not found\n", "text/plain; charset=utf-8", "404 Not Found"
        start_response(status, [("Content-Type", media_type), ("Content-Length", str(len(body)))])
        return [body]

    return app
