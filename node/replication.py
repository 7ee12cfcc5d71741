"""Replication jobs: every node copies its region's new blobs into the other regions; the leader reports
the lag and places blobs that no copy record names yet.

A worker runs on every node of a registry with regions. For each other region it takes the queue
entries its own region is to copy (coordinator/replication.py), a few at a time, and for each one:
claims it with its node's lease, streams the bytes from its region's storage into the target's at
the content-addressed key (hashing them as they go: a copy whose digest or size is off is never
committed), then records the copy and drops the entry in one transaction. A worker that dies lets
its claims lapse with its lease; the entry is taken again, and a copy already in the target (same
key, same size) is recorded without being written twice. Copies into one region share its
`regions.<name>.bandwidth` among the live workers of this region.

The leader reports every region's lag (waiting copies, their bytes, the oldest's age) as metrics,
and backfills: blobs recorded before regions, adopted from registry:2 or pushed by a node without
`regions:` get copy records where their bytes are found and queue entries for the other regions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator

from coordinator.election import current_leader
from coordinator.replication import Claimed, Entry, Outcome

from .reference import parse_reference, validate_name
from .regions import Region, Regions
from .services import Services
from .storage import layout
from .store import StoreRefused, coordinator_identity, join_region

log = logging.getLogger("wharf.replication")

# Copies under way at once, per worker and target region.
PARALLEL = 4
# A worker with nothing to copy looks again this often (a watch on the queues wakes it sooner).
_IDLE_SECONDS = 1.0
# After a failed copy, that entry waits this long before it is tried again.
_RETRY_SECONDS = 2.0
# A source whose bytes do not hash to their digest is tried again only after this long (scrub repairs).
_CORRUPT_RETRY_SECONDS = 300.0
_LAG_SECONDS = 2.0
_BACKFILL_SECONDS = 300.0
# A token bucket holds at most this many seconds of bandwidth.
_BURST_SECONDS = 0.25


class CopyRefused(Exception):
    """The bytes read do not match the digest or size the entry names: nothing was committed."""


class ClaimLost(Exception):
    """This node's lease lapsed while copying: another worker may be copying the same blob."""


class Bandwidth:
    """A token bucket shared by the copies of one worker into one region; `rate` None: no limit."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._tokens = 0.0
        self._at = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, amount: int) -> None:
        if not self.rate:
            return
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self._tokens + (now - self._at) * self.rate, self.rate * _BURST_SECONDS)
            self._at = now
            self._tokens -= amount
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


class Worker:
    """One node's copies out of its region into every other one."""

    def __init__(self, services: Services) -> None:
        assert services.regions is not None
        self.services = services
        self.regions: Regions = services.regions
        self.replication = self.regions.replication
        self.lease = services.uploader.lease
        self.metrics = services.metrics
        self.limits = {r.name: Bandwidth(r.bandwidth) for r in self.regions.others}
        self.wake = {r.name: asyncio.Event() for r in self.regions.others}
        self._joined: set[str] = set()
        self._refused_logged: dict[str, float] = {}
        self._retry_after: dict[tuple[str, str], float] = {}

    async def run(self) -> None:
        jobs = [self._register(), self._watch()] + [self._serve(region) for region in self.regions.others]
        await asyncio.gather(*jobs)

    async def _register(self) -> None:
        """Keep this node counted among its region's workers, and each target's share of bandwidth right."""
        registered = 0
        while True:
            try:
                lease = await self.lease.id()
                if lease != registered:
                    registered = await self.lease.attached(self._register_worker)
                workers = max(await self.replication.workers(), 1)
                for region in self.regions.others:
                    if region.bandwidth:
                        self.limits[region.name].rate = region.bandwidth / workers
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("replication worker registration failed: %s", exc)
            await asyncio.sleep(max(self.lease.ttl / 3, 0.5))

    async def _watch(self) -> None:
        while True:
            try:
                watch = await self.replication.watch_queues()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(_IDLE_SECONDS)
                continue
            try:
                for event in self.wake.values():
                    event.set()  # anything queued before the watch opened
                async for target in watch:
                    if target in self.wake:
                        self.wake[target].set()
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(_IDLE_SECONDS)
            finally:
                with contextlib.suppress(Exception):
                    await watch.close()

    async def _serve(self, target: Region) -> None:
        """Copy into `target`, up to PARALLEL at once, for as long as the node runs."""
        gate = asyncio.Semaphore(PARALLEL)
        running: set[str] = set()
        tasks: set[asyncio.Task[None]] = set()
        wake = self.wake[target.name]
        start: str | None = None
        try:
            while True:
                wake.clear()
                try:
                    if not await self._may_write(target):
                        await asyncio.sleep(_RETRY_SECONDS)
                        continue
                    entries, start = await self.replication.waiting(target.name, limit=PARALLEL * 4, start=start)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("replication queue of region %s could not be read: %s", target.name, exc)
                    await asyncio.sleep(_RETRY_SECONDS)
                    continue
                now = time.monotonic()
                todo = [
                    e
                    for e in entries
                    if e.digest not in running and self._retry_after.get((target.name, e.digest), 0) <= now
                ]
                for entry in todo:
                    await gate.acquire()
                    running.add(entry.digest)
                    task = asyncio.get_running_loop().create_task(self._copy(target, entry))
                    tasks.add(task)

                    def done(t: asyncio.Task[None], digest: str = entry.digest) -> None:
                        tasks.discard(t)
                        running.discard(digest)
                        gate.release()
                        wake.set()  # a slot is free: look again

                    task.add_done_callback(done)
                if start is None and not todo:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), _IDLE_SECONDS)
        finally:
            for task in list(tasks):
                task.cancel()
            for task in list(tasks):
                with contextlib.suppress(BaseException):
                    await task

    async def _may_write(self, target: Region) -> bool:
        """Whether `target`'s storage is this store's (joining it if it is new and empty)."""
        if target.name in self._joined:
            return True
        identity = await coordinator_identity(self.services.kv)
        if identity is None:
            return False
        try:
            await join_region(
                self.services.kv, target.storage, target.name, identity, f"region {target.name}", self.services.node_id
            )
        except StoreRefused as exc:
            if time.monotonic() - self._refused_logged.get(target.name, -1e9) > 60:
                self._refused_logged[target.name] = time.monotonic()
                log.error("not replicating into region %s: %s", target.name, exc)
            return False
        self._joined.add(target.name)
        return True

    async def _copy(self, target: Region, entry: Entry) -> None:
        try:
            if await self.copy(target, entry) == "busy":
                # Another worker holds it, or it is being collected: look again a little later.
                self._retry_after[(target.name, entry.digest)] = time.monotonic() + _RETRY_SECONDS
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.metrics.replication_copies.labels(target.name, "failed").inc()
            wait = _CORRUPT_RETRY_SECONDS if isinstance(exc, CopyRefused) else _RETRY_SECONDS
            self._retry_after[(target.name, entry.digest)] = time.monotonic() + wait
            if len(self._retry_after) > 10_000:
                now = time.monotonic()
                self._retry_after = {k: t for k, t in self._retry_after.items() if t > now}
            level = logging.ERROR if isinstance(exc, CopyRefused) else logging.WARNING
            log.log(
                level,
                "copy of %s into region %s failed: %s; trying again in %.0fs",
                entry.digest,
                target.name,
                exc,
                wait,
                extra={"fields": {"digest": entry.digest, "region": target.name, "error": str(exc)[:200]}},
            )

    async def copy(self, target: Region, entry: Entry) -> str | None:
        """Make one queued copy. Returns "copied" or "present" (found there already, recorded without a
        write); "done" or "gone" (nothing to copy any more: the entry went); "busy" (claimed elsewhere, or
        being collected); None when the copy was made but another worker's claim is now the one in force."""
        claimed, lease = await self.lease.attached(functools.partial(self._claim, entry))
        if isinstance(claimed, str):
            return claimed
        key = layout.blob_key(entry.digest)
        size = entry.queued.size
        try:
            if await target.storage.stat(key) == size:
                result = "present"  # a copy made before its worker could record it: not written again
            else:
                source = self.regions.own.storage.read(claimed.source_key)
                await target.storage.write_stream(key, self._verified(source, entry.digest, size, target.name, lease))
                result = "copied"
        except BaseException:
            with contextlib.suppress(Exception):
                await self.replication.release(claimed)
            raise
        if await self.replication.complete(claimed, key, size):
            self.metrics.replication_copies.labels(target.name, result).inc()
            return result
        await self._lost(claimed, target, key)
        return None

    async def _register_worker(self, lease: int) -> int:
        await self.replication.register_worker(self.services.node_id, lease)
        return lease

    async def _claim(self, entry: Entry, lease: int) -> tuple[Claimed | Outcome, int]:
        return await self.replication.claim(entry, self.services.node_id, lease), lease

    async def _verified(
        self, chunks: AsyncIterator[bytes], digest: str, size: int, target: str, lease: int
    ) -> AsyncIterator[bytes]:
        """The source's bytes, within the bandwidth, checked against the digest before the last one goes."""
        algorithm, expected = digest.split(":", 1)
        hasher = hashlib.new(algorithm)
        count = 0
        limit = self.limits[target]
        copied = self.metrics.replication_bytes.labels(target)
        async for chunk in chunks:
            if not self.lease.holds(lease):
                raise ClaimLost(f"this node's lease lapsed while copying {digest}")
            count += len(chunk)
            if count > size:
                raise CopyRefused(f"{digest} in this region's storage holds more than its {size} bytes")
            await limit.take(len(chunk))
            hasher.update(chunk)
            copied.inc(len(chunk))
            if count == size and hasher.hexdigest() != expected:
                raise CopyRefused(f"{digest} in this region's storage does not match its digest")
            yield chunk
        if count != size:
            raise CopyRefused(f"{digest} in this region's storage holds {count} bytes, its record {size}")
        if size == 0 and hasher.hexdigest() != expected:
            raise CopyRefused(f"{digest} in this region's storage does not match its digest")

    async def _lost(self, claimed: Claimed, target: Region, key: str) -> None:
        """The copy could not be recorded: the claim lapsed, or the blob was collected meanwhile."""
        digest = claimed.entry.digest
        if await self.services.metadata.get_blob(digest) is None:
            # Collected after our claim lapsed: the bytes just written are no record's. Writers of the
            # same digest in that region wait for this deletion, as they wait for a collection's.
            others = functools.partial(self.services.sessions.others_committing, digest, "")
            await self.services.metadata.remove_unrecorded(digest, key, target.storage.delete, others)
            return
        log.info(
            "copy of %s into region %s was made but not recorded by this node (its claim lapsed); the "
            "next worker to take it finds it there",
            digest,
            target.name,
        )


class Leader:
    """The leader's part: lag gauges for every region, and the backfill."""

    def __init__(self, services: Services) -> None:
        assert services.regions is not None
        self.services = services
        self.regions: Regions = services.regions
        self.replication = self.regions.replication
        self.metrics = services.metrics
        self._missing_logged: set[str] = set()

    async def run(self) -> None:
        try:
            await asyncio.gather(self._every(_LAG_SECONDS, self.report), self._every(_BACKFILL_SECONDS, self.backfill))
        finally:
            # Only the leader reports the cluster's queues, so a maximum over nodes stays right.
            for region in self.regions.all:
                self.metrics.replication_pending.labels(region.name).set(0)
                self.metrics.replication_pending_bytes.labels(region.name).set(0)
                self.metrics.replication_oldest.labels(region.name).set(0)

    @staticmethod
    async def _every(seconds: float, job: object) -> None:
        assert callable(job)
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("replication job %s failed", getattr(job, "__name__", job))
            await asyncio.sleep(seconds)

    async def report(self) -> None:
        now = time.time()
        for region, lag in (await self.replication.lag()).items():
            self.metrics.replication_pending.labels(region).set(lag.count)
            self.metrics.replication_pending_bytes.labels(region).set(lag.bytes)
            self.metrics.replication_oldest.labels(region).set(max(now - lag.oldest, 0) if lag.oldest else 0)

    async def backfill(self) -> int:
        """Place every blob that some region lacks with nothing queued; returns how many were placed."""
        placed = 0
        order = {region.name: i for i, region in enumerate(self.regions.all)}
        async for found in self.replication.unplaced():
            record = found.record
            if found.copies:
                source = min(found.copies, key=lambda c: (order.get(c.region, len(order)), c.key != record.key))
                if await self.replication.enqueue(found.digest, record.size, source.region, source.key, found.missing):
                    placed += 1
                continue
            where: dict[str, str] = {}
            async for region, size in self.regions.stat_everywhere(record.key):
                if size == record.size:
                    where[region.name] = record.key
            if not where:
                if found.digest not in self._missing_logged:
                    self._missing_logged.add(found.digest)
                    log.error(
                        "blob %s (key %s) is in no region's storage; push it again or restore the object",
                        found.digest,
                        record.key,
                        extra={"fields": {"digest": found.digest, "key": record.key, "repair": "blob content missing"}},
                    )
                continue
            if await self.replication.record_found(found.digest, record.size, where):
                placed += 1
        if placed:
            log.info("replication backfill placed %d blobs", placed, extra={"fields": {"placed": placed}})
        return placed


# -- `wharf replication status` ----------------------------------------------------------------


class ImageUnknown(Exception):
    """The REPO:TAG (or REPO@DIGEST) names nothing in the registry."""


async def image_objects(services: Services, repository: str, digest: str) -> dict[str, int]:
    """Every object an image is made of (its manifests, an index's children, their blobs): digest -> size."""
    found: dict[str, int] = {}
    pending = [digest]
    while pending:
        current = pending.pop()
        if current in found:
            continue
        record = await services.metadata.get_manifest(repository, current)
        if record is None:
            raise ImageUnknown(f"manifest {current} is not in {repository}")
        found[current] = record.size
        for blob in record.blobs:
            if blob not in found:
                link = await services.metadata.get_link(repository, blob)
                found[blob] = link.size if link is not None else 0
        pending.extend(record.manifests)
    return found


async def report(services: Services, image: str | None = None) -> dict[str, object]:
    """Each region's lag, storage and workers; with `image` (REPO:TAG or REPO@DIGEST), where it is whole."""
    regions = services.regions
    if regions is None:
        return {"regions": None, "message": "one region: nothing is replicated (no regions: section)"}
    lags = await regions.replication.lag()
    await asyncio.gather(*(regions.probe(region) for region in regions.all))
    now = time.time()
    leader = await current_leader(services.kv, "maintenance")
    rows = []
    for region in regions.all:
        lag = lags.get(region.name)
        rows.append(
            {
                "region": region.name,
                "local": region.local,
                "storage": region.describe(),
                "waiting": lag.count if lag else 0,
                "waiting_bytes": lag.bytes if lag else 0,
                "oldest_seconds": round(now - lag.oldest, 3) if lag and lag.oldest else None,
                "workers": await regions.replication.workers(region.name),
            }
        )
    found: dict[str, object] = {
        "region": regions.name,
        "leader": leader,
        "regions": rows,
    }
    if image is not None:
        found["image"] = await _image_report(services, regions, image)
    return found


async def _image_report(services: Services, regions: Regions, image: str) -> dict[str, object]:
    name, sep, reference = image.rpartition("@") if "@" in image else image.rpartition(":")
    if not sep or not name:
        raise ImageUnknown(f"{image!r}: expected REPOSITORY:TAG or REPOSITORY@DIGEST")
    repository = validate_name(name)
    ref = parse_reference(reference)
    if ref.tag is not None:
        tag = await services.metadata.get_tag(repository, ref.tag)
        if tag is None:
            raise ImageUnknown(f"no tag {ref.tag} in {repository}")
        digest = tag.digest
    else:
        digest = str(ref.digest)
    objects = await image_objects(services, repository, digest)
    holding = await regions.replication.regions_holding(list(objects))
    per_region = []
    for region in regions.all:
        missing = [d for d in objects if region.name not in holding[d]]
        queued = copying = 0
        for d in missing:
            is_queued, is_copying = await regions.replication.pending(d, region.name)
            queued += is_queued
            copying += is_copying
        per_region.append(
            {
                "region": region.name,
                "complete": not missing,
                "missing": len(missing),
                "missing_bytes": sum(objects[d] for d in missing),
                "queued": queued,
                "copying": copying,
                # Objects with no copy record at all are from before regions: the backfill places them.
                "unplaced": sum(1 for d in missing if not holding[d]),
            }
        )
    return {
        "reference": image,
        "digest": digest,
        "objects": len(objects),
        "bytes": sum(objects.values()),
        "regions": per_region,
    }
