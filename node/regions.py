"""Regions from a node: each region's storage and its health, where a blob is read from, what a push records.

A node writes into its own region's storage (`storage.*`) and reads from it whenever its region holds
the bytes; otherwise from another region that does (the order of `regions:` in the configuration,
nearest first), so a pull never waits for replication. A region whose storage fails is probed until
it answers again, and read from last meanwhile: pulls fall back, and readiness says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from coordinator.kv import KV, Op
from coordinator.replication import Copy, Fence, Replication

from .config import Config
from .metrics import InstrumentedStorage, Metrics
from .storage import layout
from .storage.driver import StorageDriver
from .store import open_driver

log = logging.getLogger("wharf.regions")

# How often each region's storage is probed, and how long a probe may take.
PROBE_SECONDS = 2.0
_PROBE_TIMEOUT = 3.0


@dataclass
class Region:
    name: str
    storage: StorageDriver
    local: bool  # this node's own region
    bandwidth: int | None = None  # bytes per second of replication into it (other regions only)
    up: bool = True
    error: str = ""
    since: float = 0.0  # when it was last seen to change state

    def describe(self) -> str:
        return (
            "ok" if self.up else f"unreachable since {time.strftime('%H:%M:%S', time.gmtime(self.since))}: {self.error}"
        )


@dataclass(frozen=True)
class Place:
    """Where a blob's bytes may be read: a region and a key; `recorded` when a copy record says so."""

    region: Region
    key: str
    recorded: bool


def _brief(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]


class Regions:
    """This node's region and every other one, as the configuration names them."""

    def __init__(self, config: Config, own: StorageDriver, kv: KV, metrics: Metrics) -> None:
        self.name = config.cluster.region
        self.metrics = metrics
        self.own = Region(self.name, own, local=True)
        self.others = [
            Region(
                name,
                InstrumentedStorage(open_driver(region.storage.filesystem, region.storage.s3), metrics),
                local=False,
                bandwidth=region.bandwidth,
            )
            for name, region in config.regions.items()
            if region.storage is not None
        ]
        self.all = [self.own, *self.others]
        self.replication = Replication(kv, self.name, [r.name for r in self.others], address=layout.blob_key)
        for region in self.all:
            metrics.region_storage_up.labels(region.name).set(1)

    @classmethod
    def from_config(cls, config: Config, own: StorageDriver, kv: KV, metrics: Metrics) -> Regions | None:
        """None for a single-region registry (no `regions:`): everything works as it always has."""
        return cls(config, own, kv, metrics) if config.regions else None

    def get(self, name: str) -> Region | None:
        return next((r for r in self.all if r.name == name), None)

    async def close(self) -> None:
        for region in self.others:
            with contextlib.suppress(Exception):
                await region.storage.close()

    # -- pushes ----------------------------------------------------------------------------------

    async def placed(self, digest: str, size: int, key: str) -> Sequence[Op]:
        """Records for bytes just stored in this region: written with the blob or manifest record."""
        return await self.replication.placed(digest, size, key)

    # -- pulls -----------------------------------------------------------------------------------

    async def places(self, digest: str, key: str) -> list[Place]:
        """Where to read `digest` from, best first: this region, then the others in configured order,
        regions whose storage is down last. `key` is the blob record's (used where no copy is recorded:
        blobs from before regions, until the leader's backfill has found them)."""
        copies = await self.replication.copies(digest)
        order = {region.name: i for i, region in enumerate(self.all)}
        if copies:
            addressed = layout.blob_key(digest)
            found = [
                Place(region, copy.key, True)
                for copy in sorted(copies, key=lambda c: (order.get(c.region, len(order)), c.key != addressed))
                if (region := self.get(copy.region)) is not None
            ]
        else:
            found = [Place(region, key, False) for region in self.all]
        return sorted(found, key=lambda p: not p.region.up)  # stable: the order above otherwise

    async def read_bytes(self, digest: str, key: str) -> bytes:
        """A small object (a manifest) from the first region that has it; FileNotFoundError if none does."""
        failure: BaseException | None = None
        for place in await self.places(digest, key):
            try:
                body = await place.region.storage.read_bytes(place.key)
            except FileNotFoundError as exc:
                failure = failure or exc
                continue
            except Exception as exc:
                self.failed(place.region, exc)
                failure = exc
                continue
            self.served(place.region)
            return body
        if failure is None or isinstance(failure, FileNotFoundError):
            raise FileNotFoundError(f"{digest} is in no region's storage")
        raise failure

    def served(self, region: Region) -> None:
        if not region.local:
            self.metrics.add(self.metrics.region_fallback_reads.labels(region.name))

    def failed(self, region: Region, exc: BaseException) -> None:
        """A read from `region` failed (not for a missing object): read elsewhere until a probe passes."""
        if region.up:
            region.up, region.error, region.since = False, _brief(exc), time.time()
            self.metrics.region_storage_up.labels(region.name).set(0)
            log.error(
                "storage of region %s failed: %s; reading from other regions until it answers again",
                region.name,
                region.error,
                extra={"fields": {"region": region.name, "error": region.error}},
            )

    # -- health ----------------------------------------------------------------------------------

    async def probe(self, region: Region) -> None:
        with contextlib.suppress(Exception):
            await self.check(region)

    async def check(self, region: Region) -> None:
        """Probe one region's storage now; raise what it failed with (and read from it last meanwhile)."""
        try:
            # As the readiness check: a stat of a key that need not exist; only errors count.
            await asyncio.wait_for(region.storage.stat(layout.ROOT + "/ready"), _PROBE_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed(region, exc)
            region.error = _brief(exc)
            raise
        if not region.up:
            log.info("storage of region %s answers again", region.name, extra={"fields": {"region": region.name}})
            region.up, region.error, region.since = True, "", time.time()
            self.metrics.region_storage_up.labels(region.name).set(1)

    async def run_probes(self, interval: float = PROBE_SECONDS) -> None:
        """Probe every region's storage every `interval`, until cancelled."""
        while True:
            await asyncio.gather(*(self.probe(region) for region in self.all))
            await asyncio.sleep(interval)

    def fallback(self) -> list[str]:
        """The other regions whose storage answers (where pulls go while this region's is down)."""
        return [r.name for r in self.others if r.up]

    def describe(self) -> dict[str, str]:
        return {region.name: region.describe() for region in self.all}

    # -- garbage collection (coordinator/gc.py's RegionSweep) ------------------------------------

    async def fence(self, digest: str) -> Fence:
        return await self.replication.fence(digest, layout.blob_key(digest))

    async def delete(self, copies: Sequence[Copy]) -> None:
        """Delete recorded copies, each from its region's storage (one request per region).

        The content-addressed key goes from every region too: a worker that died after writing its
        copy and before recording it left the digest's bytes there, which nothing needs either.
        """
        by_region: dict[str, list[str]] = {}
        for copy in copies:
            by_region.setdefault(copy.region, []).append(copy.key)
        for digest in {copy.digest for copy in copies}:
            for each in self.all:
                found = by_region.setdefault(each.name, [])
                if layout.blob_key(digest) not in found:
                    found.append(layout.blob_key(digest))
        for name, found in by_region.items():
            region = self.get(name)
            if region is None:
                log.warning(
                    "%d objects recorded in region %s, which the configuration does not name, are kept",
                    len(found),
                    name,
                    extra={"fields": {"region": name, "keys": found}},
                )
                continue
            if found:
                await region.storage.delete_many(found)

    async def delete_everywhere(self, keys: list[str]) -> None:
        """Delete keys (of blobs recorded before regions, with no copy records) from every region."""
        for region in self.all:
            await region.storage.delete_many(keys)

    # -- what a region holds ---------------------------------------------------------------------

    async def stat_everywhere(self, key: str) -> AsyncIterator[tuple[Region, int | None]]:
        for region in self.all:
            try:
                yield region, await region.storage.stat(key)
            except Exception as exc:
                self.failed(region, exc)
                yield region, None
