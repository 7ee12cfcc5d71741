"""Garbage collection from a node: the coordinator decides, this deletes from storage and reports."""

from __future__ import annotations

import contextlib
import functools
import logging
import time

from coordinator.gc import (
    HELD_IMPORTED,
    HELD_PUSHED,
    HELD_UNACCOUNTED,
    HELD_YOUNG,
    HELD_YOUNG_MANIFEST,
    Collector,
    Progress,
    Summary,
    orphan_sweep_done,
)
from coordinator.gc import orphan_sweep_due as _orphan_sweep_due
from coordinator.gcmark import Mark
from coordinator.runlock import run_lock

from .services import Services
from .storage import layout

log = logging.getLogger("wharf.gc")


class CycleRunning(Exception):
    """Another process is running a collection cycle right now."""


class ImportRunning(Exception):
    """A registry:2 store is being adopted: collecting now could judge half-imported records."""


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


async def _sweep_unaccounted(services: Services, mark: Mark, summary: Summary, *, delete: bool, dry_run: bool) -> None:
    """Count storage objects no record names; delete them only when the operator asked by name.

    Such an object may be a registry:2 store's leftover, a copied-in file or another cluster's data:
    Wharf cannot prove it wrote it, so by default it is only reported (`wharf gc` summary, the
    `wharf_gc_unaccounted_*` gauges, `wharf gc --explain`). Bytes a crashed Wharf writer left are
    reclaimed through the upload session record written before them, not here. The listing goes a
    batch at a time against the cycle's mark, so memory does not grow with the store.
    """
    storage = services.storage
    batch: list[str] = []
    sessions: dict[str, bool] = {}
    registry2_uploads: dict[str, bool] = {}
    committing: set[str] | None = None
    # With regions, this region's copy of a large blob may be kept at its own upload's key, which
    # only its copy record names (the blob record names the pushing region's).
    copied: set[str] = set()
    if services.regions is not None:
        async for key in services.regions.replication.stored_keys(services.regions.name):
            if layout.digest_from_blob_key(key) is None:
                copied.add(key)

    async def judge(found: list[str]) -> None:
        nonlocal committing
        digests = {key: layout.digest_from_blob_key(key) for key in found}
        recorded, named = await mark.recorded_of([d for d in digests.values() if d], found)
        for key in found:
            digest = digests[key]
            if digest is not None:
                if digest in recorded:
                    continue
                if committing is None:
                    committing = await services.sessions.committing()
                if digest in committing:
                    continue  # committed to its key by an upload not yet recorded (or refused): the session reclaims it
            else:
                upload = layout.upload_of_key(key)
                if upload is None or key in named or key in copied:
                    continue  # a link file of Distribution's tree, or a recorded blob
                if upload not in sessions:
                    if len(sessions) > 10_000:
                        sessions.clear()
                    sessions[upload] = await services.sessions.get(upload) is not None
                if sessions[upload]:
                    continue  # a live upload's own bytes
                if upload not in registry2_uploads:
                    if len(registry2_uploads) > 10_000:
                        registry2_uploads.clear()
                    registry2_uploads[upload] = await storage.stat(_registry2_started(key, upload)) is not None
                if not registry2_uploads[upload]:
                    # Wharf's own upload layout: a blob committed there (a large S3 upload) after
                    # this cycle's mark is named by a record the mark has not seen, and its session
                    # is gone; bytes of an upload cut short go with its session. Never judged here.
                    continue
            await _unaccounted(services, summary, key, digest, delete=delete, dry_run=dry_run)

    async for key in storage.list(layout.ROOT):
        batch.append(key)
        if len(batch) >= 1000:
            await judge(batch)
            batch = []
    if batch:
        await judge(batch)


def _registry2_started(key: str, upload: str) -> str:
    """registry:2's `startedat` of the upload folder `key` is in: Wharf writes none, so it tells a
    registry:2 upload's leftovers from a Wharf upload's bytes."""
    head, _, _ = key.partition("/_uploads/")
    return f"{head}/_uploads/{upload}/startedat"


async def _unaccounted(
    services: Services, summary: Summary, key: str, digest: str | None, *, delete: bool, dry_run: bool
) -> None:
    size = await services.storage.stat(key) or 0
    if not delete:
        summary.unaccounted_objects += 1
        summary.unaccounted_bytes += size
        summary.hold(HELD_UNACCOUNTED, size)
        return
    if not dry_run:
        if digest is not None:
            others = functools.partial(services.sessions.others_committing, digest, "")
            if not await services.metadata.remove_unrecorded(digest, key, services.storage.delete, others):
                return  # recorded (or being collected) meanwhile
        else:
            await services.storage.delete(key)
        log.warning("deleted unaccounted storage object %s as asked", key, extra={"fields": {"key": key}})
    summary.orphans_deleted += 1
    summary.bytes_freed += size
    if len(summary.deleted) < 100_000:
        summary.deleted.append(f"unaccounted {key}")


async def import_in_progress(services: Services) -> str | None:
    """The import state while a registry:2 store is being adopted (GC waits for it)."""
    found = await services.metadata.import_state()
    return found.state if found is not None and found.state in ("pending", "running") else None


async def orphan_sweep_due(services: Services) -> bool:
    return await _orphan_sweep_due(services.kv, services.config.gc.orphaninterval)


async def collect(
    services: Services,
    *,
    dry_run: bool = False,
    delete_untagged: bool | None = None,
    progress: Progress = _no_progress,
    orphans: bool = True,
    reclaim_imported: bool = False,
    delete_unaccounted: bool = False,
) -> Summary:
    """One cycle, holding a cluster-wide lock so cycles never overlap (a dry run writes nothing).

    `orphans` also sweeps storage for objects no record names, to report them (and to delete them
    with `delete_unaccounted`).
    """
    config = services.config.gc
    collector = Collector(
        services.kv,
        grace=config.grace,
        delete_untagged=config.deleteuntagged if delete_untagged is None else delete_untagged,
        dry_run=dry_run,
        reclaim_imported=reclaim_imported,
        quotas=services.policies.scopes,
        progress=progress,
        address=services.metadata.address,
    )
    if not dry_run:
        services.readonly.check()
        collector.may_delete = lambda: not services.readonly.active
    metrics = services.metrics
    importing = await import_in_progress(services)
    if importing is not None:
        raise ImportRunning(importing)

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
    async with contextlib.AsyncExitStack() as stack:
        if not dry_run:
            await stack.enter_async_context(
                run_lock(services.kv, "gc", services.node_id, ttl=services.config.cluster.leasettl, busy=CycleRunning)
            )

        async def delete_object(key: str) -> None:
            await services.storage.delete(key)

        delete_many = services.storage.delete_many
        regions = services.regions
        if regions is not None:
            # Each blob goes from every region: its copy records say where; a blob from before
            # regions (no copy record yet) at its recorded key, from every region's storage.
            collector.regions = regions
            delete_many = regions.delete_everywhere

        started = time.perf_counter()

        async def sweep(mark: Mark) -> None:
            await _sweep_unaccounted(services, mark, collector.summary, delete=delete_unaccounted, dry_run=dry_run)

        try:
            summary = await collector.run(delete_object, delete_many, sweep=sweep if orphans else None)
            if orphans:
                metrics.gc_unaccounted_objects.set(summary.unaccounted_objects)
                metrics.gc_unaccounted_bytes.set(summary.unaccounted_bytes)
                if not dry_run:
                    await orphan_sweep_done(services.kv)
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
        for held in summary.held_back.values():
            metrics.gc_held_back_bytes.labels(_HELD_LABELS.get(held.reason, "other")).set(held.bytes)
        fields = {k: v for k, v in summary.report().items() if k != "deleted"}
        log.info("garbage collection %s", "dry run" if dry_run else "cycle", extra={"fields": fields})
        return summary


_HELD_LABELS = {
    HELD_YOUNG: "grace",
    HELD_YOUNG_MANIFEST: "grace",
    HELD_IMPORTED: "imported",
    HELD_PUSHED: "pushed",
    HELD_UNACCOUNTED: "unaccounted",
}
