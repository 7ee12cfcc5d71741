"""Cluster-wide housekeeping that the elected leader runs: abandoned uploads, retention, GC, backups."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from coordinator.readonly import Halted

from . import backup, gc, importer, retention
from .delivery import Dispatcher
from .services import Services

log = logging.getLogger("wharf.maintenance")

_GAUGE_SECONDS = 15.0
_IMPORT_CHECK_SECONDS = 2.0


class Maintenance:
    def __init__(self, services: Services) -> None:
        self.services = services
        purging = services.config.storage.maintenance.uploadpurging
        self.enabled = purging.enabled
        # A session goes once idle for `age` (Distribution's) or http.uploads.idletimeout, the shorter.
        idle = services.config.http.uploads.idletimeout
        self.age = min(purging.age, idle)
        self.interval = min(purging.interval, max(idle / 4, 5.0))
        self.dry_run = purging.dryrun

    async def lead(self) -> None:
        """The leader's jobs, each on its own schedule; all cancelled when leadership ends."""
        built = await self.services.metadata.build_tag_index()
        if built:
            log.info("indexed %d tags by digest (a store from before the index)", built)
        jobs = [self._every(_GAUGE_SECONDS, self._count_uploads), self._every(_IMPORT_CHECK_SECONDS, self._import)]
        if self.enabled:
            jobs.append(self._every(self.interval, self._purge))
        if self.services.config.gc.enabled:
            jobs.append(self._every(self.services.config.gc.interval, self._collect))
        policies = self.services.config.retention
        if policies.enabled and policies.policies:
            jobs.append(self._every(policies.interval, self._retain))
        # Coordinator snapshots into the storage, on a schedule of their own (node/backup.py).
        if self.services.config.backup.enabled:
            jobs.append(backup.scheduled(self.services))
        # Webhook delivery: the cluster's queues, wherever their events were recorded.
        if self.services.notifier.enabled:
            jobs.append(Dispatcher(self.services).run())
        try:
            await asyncio.gather(*jobs)
        finally:
            # Only the leader reports the cluster-wide figure, so a sum over nodes stays right.
            self.services.metrics.upload_sessions.set(0)

    @staticmethod
    async def _every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            started = time.monotonic()
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Halted as exc:
                log.info("maintenance job %s waits: the registry is %s", getattr(job, "__name__", job), exc)
            except Exception:
                log.exception("maintenance job %s failed", getattr(job, "__name__", job))
            await asyncio.sleep(max(seconds - (time.monotonic() - started), 0.05))

    async def _count_uploads(self) -> None:
        self.services.metrics.upload_sessions.set(await self.services.sessions.count())

    async def _import(self) -> None:
        await importer.import_if_pending(self.services)

    async def _purge(self) -> None:
        self.services.readonly.check()
        self.services.metrics.uploads_purged.inc(await self.purge_uploads())

    async def _collect(self) -> None:
        self.services.readonly.check()
        try:
            await gc.collect(self.services, orphans=await gc.orphan_sweep_due(self.services))
        except gc.CycleRunning as exc:
            log.info("garbage collection skipped: a cycle is running on %s", exc)
        except gc.ImportRunning as exc:
            log.info("garbage collection waits: a registry:2 store is being adopted (import %s)", exc)

    async def _retain(self) -> None:
        self.services.readonly.check()
        try:
            await retention.apply(self.services)
        except retention.RunInProgress as exc:
            log.info("retention skipped: a run is in progress on %s", exc)

    async def purge_uploads(self, *, now: float | None = None) -> int:
        """Remove sessions idle for longer than `age`, record first so nobody continues them.

        A session left committing (its node died mid-commit) names what it was writing: those bytes
        go too, unless a blob record names them or an object was there before.
        """
        sessions = self.services.sessions
        purged = 0
        async for session in sessions.idle_since((now or time.time()) - self.age):
            if self.dry_run:
                log.info("would purge upload %s of %s", session.id, session.repository)
                purged += 1
                continue
            self.services.readonly.check()
            if not await sessions.end_idle(session):
                continue  # it moved on meanwhile, or a request is writing to it: not abandoned
            await self.services.uploader.reclaim(session)
            purged += 1
        if purged:
            log.info("purged %d abandoned upload sessions", purged, extra={"fields": {"purged": purged}})
        return purged
