"""Garbage collection from a node: the coordinator decides, this deletes from storage and reports."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import TYPE_CHECKING

from coordinator import keys
from coordinator.gc import Collector, Progress, Summary
from coordinator.kv import Compare, Put
from coordinator.lease import KeptLease

from .config import parse_duration
from .storage import layout

if TYPE_CHECKING:
    from .services import Services

log = logging.getLogger("wharf.gc")

_RUN_LOCK = keys.leader("gc-run")


class CycleRunning(Exception):
    """Another process is running a collection cycle right now."""


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


async def _sweep_orphans(services: Services, collector: Collector, summary: Summary) -> None:
    """Delete blob objects in storage that no record names and that are older than the grace."""
    storage = services.storage
    recorded = await collector.recorded_blobs()
    cutoff = time.time() - collector.grace
    async for key in storage.list(layout.BLOBS):
        digest = layout.digest_from_blob_key(key)
        if digest is None or digest in recorded:
            continue
        written = await storage.modified(key)
        if written is None or written > cutoff:
            continue
        size = await storage.stat(key) or 0
        if collector.dry_run:
            summary.orphans_deleted += 1
            summary.bytes_freed += size
            summary.deleted.append(f"orphan {digest}")
            continue
        if not await collector.claim_orphan(digest, key):
            continue
        try:
            await storage.delete(key)
        finally:
            await collector.release_orphan(digest)
        summary.orphans_deleted += 1
        summary.bytes_freed += size
        summary.deleted.append(f"orphan {digest}")


async def orphan_sweep_due(services: Services) -> bool:
    last = await services.kv.get(keys.GC_ORPHANS_LAST)
    interval = parse_duration(services.config.gc.orphaninterval)
    return last is None or json.loads(last.value).get("at", 0) + interval <= time.time()


class Touches:
    """Mark blobs a client was just told exist, at most once per half grace period per node."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._half_grace = parse_duration(services.config.gc.grace) / 2
        self._written: dict[str, float] = {}

    async def touch(self, digest: str) -> None:
        now = time.monotonic()
        last = self._written.get(digest)
        if last is not None and now - last < self._half_grace:
            return
        await self._services.metadata.touch(digest)
        self._written[digest] = now
        if len(self._written) > 200_000:
            cutoff = now - self._half_grace
            self._written = {d: t for d, t in self._written.items() if t >= cutoff}


async def collect(
    services: Services,
    *,
    dry_run: bool = False,
    delete_untagged: bool | None = None,
    progress: Progress = _no_progress,
    orphans: bool = True,
) -> Summary:
    """One cycle, holding a cluster-wide lock so cycles never overlap."""
    config = services.config.gc
    collector = Collector(
        services.kv,
        grace=parse_duration(config.grace),
        delete_untagged=config.deleteuntagged if delete_untagged is None else delete_untagged,
        dry_run=dry_run,
        progress=progress,
    )
    metrics = services.metrics

    def report(phase: str, done: int, total: int) -> None:
        metrics.gc_reclaimable_bytes.set(collector.summary.reclaimable_bytes)
        if phase != "sweep" or done == total or done % 1000 == 0:
            log.info(
                "garbage collection %s: %d/%d",
                phase,
                done,
                total,
                extra={
                    "fields": {
                        "phase": phase,
                        "done": done,
                        "total": total,
                        "reclaimable_bytes": collector.summary.reclaimable_bytes,
                    }
                },
            )
        progress(phase, done, total)

    collector.progress = report
    async with KeptLease(services.kv, max(services.config.cluster.leasettl, 5)) as lease:
        taken = await services.kv.txn(
            [Compare.absent(_RUN_LOCK)], [Put(_RUN_LOCK, services.node_id.encode(), lease=lease.id)]
        )
        if not taken.succeeded:
            holder = await services.kv.get(_RUN_LOCK)
            raise CycleRunning(holder.value.decode() if holder else "another process")

        async def delete_object(key: str) -> None:
            await services.storage.delete(key)

        started = time.perf_counter()
        try:
            summary = await collector.run(delete_object, services.storage.delete_many)
            if orphans:
                await _sweep_orphans(services, collector, summary)
                if not dry_run:
                    await services.kv.put(keys.GC_ORPHANS_LAST, json.dumps({"at": time.time()}).encode())
        except Exception:
            metrics.gc_runs.labels("failed").inc()
            raise
        metrics.gc_runs.labels("dry-run" if dry_run else "ok").inc()
        metrics.gc_duration.observe(time.perf_counter() - started)
        if not dry_run:
            metrics.gc_blobs_deleted.inc(summary.blobs_deleted)
            metrics.gc_manifests_deleted.inc(summary.manifests_deleted)
            metrics.gc_bytes_freed.inc(summary.bytes_freed)
        metrics.gc_reclaimable_bytes.set(0 if not dry_run else summary.reclaimable_bytes)
        fields = {k: v for k, v in asdict(summary).items() if k != "deleted"}
        log.info("garbage collection %s", "dry run" if dry_run else "cycle", extra={"fields": fields})
        return summary
