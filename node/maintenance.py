"""Cluster-wide housekeeping that the elected leader runs: abandoned upload sessions."""

from __future__ import annotations

import asyncio
import logging
import time

from coordinator import keys
from coordinator.kv import Compare, Delete
from coordinator.uploads import UploadSession

from .config import parse_duration
from .services import Services
from .storage import layout

log = logging.getLogger("wharf.maintenance")

_GAUGE_SECONDS = 15.0


class Maintenance:
    def __init__(self, services: Services) -> None:
        self.services = services
        purging = services.config.storage.maintenance.uploadpurging
        self.enabled = purging.enabled
        self.age = parse_duration(purging.age)
        self.interval = parse_duration(purging.interval)
        self.dry_run = purging.dryrun

    async def lead(self) -> None:
        """The leader's loop; cancelled when leadership ends."""
        gauge = self.services.metrics.upload_sessions
        next_purge = time.monotonic()
        try:
            while True:
                try:
                    gauge.set(await self.services.kv.count(keys.UPLOADS))
                    if self.enabled and time.monotonic() >= next_purge:
                        next_purge = time.monotonic() + self.interval
                        self.services.metrics.uploads_purged.inc(await self.purge_uploads())
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("maintenance cycle failed")
                delay = _GAUGE_SECONDS
                if self.enabled:
                    delay = min(delay, max(next_purge - time.monotonic(), 0.05))
                await asyncio.sleep(delay)
        finally:
            # Only the leader reports the cluster-wide figure, so a sum over nodes stays right.
            gauge.set(0)

    async def purge_uploads(self, *, now: float | None = None) -> int:
        """Remove sessions idle for longer than `age`, record first so nobody continues them."""
        kv = self.services.kv
        cutoff = (now or time.time()) - self.age
        purged = 0
        start: str | None = None
        while True:
            page = await kv.range(keys.UPLOADS, start=start, limit=500)
            for item in page:
                session = UploadSession.from_json(item.key[len(keys.UPLOADS) :], item.value, item.mod_revision)
                if session.updated >= cutoff:
                    continue
                if self.dry_run:
                    log.info("would purge upload %s of %s", session.id, session.repository)
                    purged += 1
                    continue
                result = await kv.txn([Compare.unchanged(item.key, item.mod_revision)], [Delete(item.key)])
                if not result.succeeded:
                    continue  # it moved on meanwhile: not abandoned
                await self.services.storage.upload_abort(
                    layout.upload_key(session.repository, session.id), session.driver_state
                )
                purged += 1
            if len(page) < 500:
                break
            start = keys.after(page[-1].key)
        if purged:
            log.info("purged %d abandoned upload sessions", purged, extra={"fields": {"purged": purged}})
        return purged
