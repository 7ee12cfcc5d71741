"""Replication between regions, as coordinator records: where each blob is, copies still to make, fences.

Every region keeps its blobs in a storage of its own; the coordinator is shared, so every region sees
the same tags. This module owns the records that say which region holds which object and what is
still to copy; moving bytes is the nodes' work (node/replication.py).

- A copy record, `region/copy/<digest>/<region>/<storage key>`, says that region's storage holds the
  digest's bytes at that key. A push writes its own region's record, and a queue entry for every
  other region that lacks the blob, in the transaction that records the blob (`Replication.placed`).
- A queue entry, `replicate/queue/<target>/<digest>`, names the region to copy from. Workers of that
  region take it: a claim (with the worker's node lease, so a dead worker's claim lapses and the
  entry is taken again), the copy, then one transaction that records the copy and drops the entry.
  A copy may so be made twice (at least once), always to the content-addressed key, which a write
  replaces atomically with the same bytes.
- Garbage collection deletes a blob from every region under one fence (`Replication.fence`): the
  transaction that removes the blob's records also checks that no copy is being made and that no
  copy record appeared since it read them, and removes the copy records and queue entries.

Blobs recorded before there were regions (or adopted from a registry:2 store) have no copy record:
the leader's backfill finds them (`unplaced`), looks for their bytes region by region, records
where they are and queues the rest (`record_found`). A region added later is filled the same way.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, TypeVar

from . import keys
from .kv import KV, Compare, Delete, Get, KeyValue, Op, Put, Watch, pages, scan
from .metadata import BlobRecord, ContentAddress, Metadata

T = TypeVar("T")

# Blob records read per backfill step; the copy records and queue entries of their span go with them.
_BACKFILL_BATCH = 500


def _dump(record: Any) -> bytes:
    return json.dumps(asdict(record), separators=(",", ":")).encode()


def _decode(cls: type[T], raw: bytes) -> T:
    """A record from its JSON; fields a later version added are left out, so old nodes still read it."""
    data = json.loads(raw)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class CopyRecord:
    size: int
    at: float


@dataclass(frozen=True)
class Queued:
    """A copy still to make: from `source`'s storage at `key`."""

    source: str
    key: str
    size: int
    at: float


@dataclass(frozen=True)
class ClaimRecord:
    node: str
    at: float


@dataclass(frozen=True)
class Joined:
    """A region whose storage carries the store identity (node/store.py writes both)."""

    at: float
    node: str = ""


@dataclass(frozen=True)
class Copy:
    """One object holding a digest's bytes, as its copy record says."""

    digest: str
    region: str
    key: str
    size: int
    revision: int = 0

    @property
    def record_key(self) -> str:
        return keys.region_copy(self.digest, self.region, self.key)


@dataclass(frozen=True)
class Entry:
    """A queue entry as a read found it."""

    target: str
    digest: str
    queued: Queued
    revision: int

    @property
    def key(self) -> str:
        return keys.replication_queued(self.target, self.digest)


@dataclass(frozen=True)
class Fence:
    """What garbage collection's delete of one blob must also check and do, in its transaction.

    `expected` maps keys to the mod revision they must still have (0: absent).
    """

    expected: dict[str, int]
    ops: list[Op]
    copies: list[Copy]


class RegionSweep(Protocol):
    """What garbage collection needs to delete a blob in every region (the node implements `delete`)."""

    async def fence(self, digest: str) -> Fence: ...

    async def delete(self, copies: Sequence[Copy]) -> None: ...


@dataclass
class Lag:
    """Copies waiting for one target region."""

    count: int = 0
    bytes: int = 0
    oldest: float | None = None  # when the oldest was queued

    def add(self, queued: Queued) -> None:
        self.count += 1
        self.bytes += queued.size
        self.oldest = queued.at if self.oldest is None else min(self.oldest, queued.at)


@dataclass(frozen=True)
class Claimed:
    """A claim this worker now holds; copy from `source_key` in the source region."""

    entry: Entry
    revision: int
    source_key: str


Outcome = Literal["done", "gone", "busy"]


class QueueWatch:
    """An open watch on every region's queue, yielding the target region of each new entry."""

    def __init__(self, watch: Watch) -> None:
        self._watch = watch

    async def __aiter__(self) -> AsyncIterator[str]:
        async for change in self._watch:
            if change.type == "put":
                yield keys.split_replication_queued(change.key)[0]

    async def close(self) -> None:
        await self._watch.close()


@dataclass
class Unplaced:
    """A blob that some regions lack with nothing queued for them."""

    digest: str
    record: BlobRecord
    copies: list[Copy] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)


def _copy(kv: KeyValue) -> Copy:
    digest, region, storage_key = keys.split_region_copy(kv.key)
    return Copy(digest, region, storage_key, _decode(CopyRecord, kv.value).size, kv.mod_revision)


def _entry(kv: KeyValue) -> Entry:
    target, digest = keys.split_replication_queued(kv.key)
    return Entry(target, digest, _decode(Queued, kv.value), kv.mod_revision)


class Replication:
    """The replication records of a store, seen from one node's region (`region`; `others` are the rest)."""

    def __init__(self, kv: KV, region: str, others: Sequence[str], *, address: ContentAddress | None = None) -> None:
        self.kv = kv
        self.address = address  # a digest's content address: blob records at it store no key
        self.region = region
        self.others = list(others)
        self.regions = [region, *self.others]

    # -- where a blob is -----------------------------------------------------------------------

    async def copies(self, digest: str) -> list[Copy]:
        return [_copy(kv) for kv in await scan(self.kv, keys.region_copies_of(digest))]

    def placed_ops(self, digest: str, size: int, key: str, present: Iterable[str] = ()) -> list[Op]:
        """This region's copy record for bytes just stored at `key`, and a queue entry for each other
        region not in `present`; written in the transaction that records the blob or manifest."""
        now = time.time()
        ops: list[Op] = [Put(keys.region_copy(digest, self.region, key), _dump(CopyRecord(size, now)))]
        have = set(present)
        queued = _dump(Queued(self.region, key, size, now))
        ops += [Put(keys.replication_queued(t, digest), queued) for t in self.others if t not in have]
        return ops

    async def placed(self, digest: str, size: int, key: str) -> list[Op]:
        """`placed_ops`, queueing only for the regions that hold no copy yet (one read)."""
        return self.placed_ops(digest, size, key, {c.region for c in await self.copies(digest)})

    # -- the workers' side ---------------------------------------------------------------------

    async def waiting(self, target: str, *, limit: int, start: str | None = None) -> tuple[list[Entry], str | None]:
        """Up to `limit` entries for `target` that this region copies, from key `start` on; and where
        to go on from (None: the queue's end was reached)."""
        found: list[Entry] = []
        async for page in pages(self.kv, keys.replication_queue(target), start=start):
            for kv in page:
                entry = _entry(kv)
                if entry.queued.source == self.region:
                    found.append(entry)
                    if len(found) >= limit:
                        return found, keys.after(kv.key)
        return found, None

    async def claim(self, entry: Entry, node: str, lease: int) -> Claimed | Outcome:
        """Take `entry` for this worker; or say it is done already, gone with its blob, or busy."""
        copies = await self.copies(entry.digest)
        if any(c.region == entry.target for c in copies):
            await self.drop(entry)
            return "done"
        copying = keys.replication_copying(entry.digest, entry.target)
        result = await self.kv.txn(
            [
                Compare.unchanged(entry.key, entry.revision),
                Compare.present(keys.blob(entry.digest)),
                Compare.absent(keys.deleting(entry.digest)),
                Compare.absent(copying),
            ],
            [Put(copying, _dump(ClaimRecord(node, time.time())), lease=lease)],
            [Get(keys.blob(entry.digest)), Get(keys.deleting(entry.digest))],
        )
        if result.succeeded:
            source = [c for c in copies if c.region == entry.queued.source]
            # The content-addressed copy if the source has one (an upload's own key may be older).
            source.sort(key=lambda c: c.key != entry.queued.key)
            return Claimed(entry, result.revision, source[0].key if source else entry.queued.key)
        blob, deleting = result.gets
        if blob is None and deleting is None:
            await self.drop(entry)  # collected meanwhile: nothing to copy
            return "gone"
        return "busy"

    async def complete(self, claimed: Claimed, key: str, size: int) -> bool:
        """Record the copy at `key` in the target region and drop the entry, if the claim still holds."""
        entry = claimed.entry
        copying = keys.replication_copying(entry.digest, entry.target)
        result = await self.kv.txn(
            [
                Compare.unchanged(copying, claimed.revision),
                Compare.present(keys.blob(entry.digest)),
                Compare.absent(keys.deleting(entry.digest)),
            ],
            [
                Put(keys.region_copy(entry.digest, entry.target, key), _dump(CopyRecord(size, time.time()))),
                Delete(entry.key),
                Delete(copying),
            ],
        )
        return result.succeeded

    async def release(self, claimed: Claimed) -> None:
        """Give a claim up (the copy failed): the entry is taken again later."""
        copying = keys.replication_copying(claimed.entry.digest, claimed.entry.target)
        await self.kv.txn([Compare.unchanged(copying, claimed.revision)], [Delete(copying)])

    async def drop(self, entry: Entry) -> None:
        await self.kv.txn([Compare.unchanged(entry.key, entry.revision)], [Delete(entry.key)])

    async def claim_holder(self, digest: str, target: str) -> str | None:
        found = await self.kv.get(keys.replication_copying(digest, target))
        return _decode(ClaimRecord, found.value).node if found is not None else None

    async def register_worker(self, node: str, lease: int) -> None:
        """Count `node` among this region's workers for as long as `lease` lives."""
        await self.kv.put(keys.replication_worker(self.region, node), b"", lease=lease)

    async def workers(self, region: str | None = None) -> int:
        """The live workers of `region` (this node's by default), which share its bandwidth."""
        return await self.kv.count(keys.replication_workers(region or self.region))

    async def watch_queues(self) -> QueueWatch:
        """The target region of every entry queued from now on, whoever queued it."""
        return QueueWatch(await self.kv.watch(keys.REPLICATION_QUEUE))

    async def pending(self, digest: str, target: str) -> tuple[bool, bool]:
        """Whether a copy of `digest` into `target` is queued, and whether one is being made."""
        queued = await self.kv.get(keys.replication_queued(target, digest))
        copying = await self.kv.get(keys.replication_copying(digest, target))
        return queued is not None, copying is not None

    # -- the leader's side ---------------------------------------------------------------------

    async def lag(self) -> dict[str, Lag]:
        """Copies waiting for each region (every region's queue, whoever copies into it)."""
        lags: dict[str, Lag] = {}
        for target in self.regions:
            lag = lags[target] = Lag()
            async for page in pages(self.kv, keys.replication_queue(target)):
                for kv in page:
                    lag.add(_decode(Queued, kv.value))
        return lags

    async def unplaced(self) -> AsyncIterator[Unplaced]:
        """Every blob that some region lacks and whose copy there nobody has queued, a batch at a time.

        Blob records are read in digest order; the copy records and queue entries of each batch's
        span of digests are read with it, so the scan costs what it reads.
        """
        batch: list[tuple[str, BlobRecord]] = []
        async for digest, record in Metadata(self.kv, address=self.address).blob_records():
            batch.append((digest, record))
            if len(batch) >= _BACKFILL_BATCH:
                for found in await self._unplaced_in(batch):
                    yield found
                batch = []
        if batch:
            for found in await self._unplaced_in(batch):
                yield found

    async def _unplaced_in(self, batch: list[tuple[str, BlobRecord]]) -> list[Unplaced]:
        first, last = batch[0][0], batch[-1][0]
        copies: dict[str, list[Copy]] = {}
        for kv in await self._span(keys.REGION_COPIES, first, last):
            copy = _copy(kv)
            copies.setdefault(copy.digest, []).append(copy)
        queued: dict[str, set[str]] = {}
        for target in self.regions:
            for kv in await self._span(keys.replication_queue(target), first, last):
                queued.setdefault(keys.split_replication_queued(kv.key)[1], set()).add(target)
        found = []
        for digest, record in batch:
            have = {c.region for c in copies.get(digest, [])} | queued.get(digest, set())
            missing = [r for r in self.regions if r not in have]
            if missing:
                found.append(Unplaced(digest, record, copies.get(digest, []), missing))
        return found

    async def _span(self, prefix: str, first: str, last: str) -> list[KeyValue]:
        """Keys `prefix + digest...` for digests from `first` to `last` (both in the span)."""
        found: list[KeyValue] = []
        end = prefix + last + "\x7f"  # a digest is followed by '/' (or nothing): both sort before it
        async for page in pages(self.kv, prefix, start=prefix + first):
            for kv in page:
                if kv.key > end:
                    return found
                found.append(kv)
        return found

    async def record_found(self, digest: str, size: int, found: Mapping[str, str]) -> bool:
        """Record where a blob's bytes were found (region -> key) and queue it for the other regions.

        Only while the blob is recorded and not being collected.
        """
        if not found:
            return False
        now = time.time()
        source = next(r for r in self.regions if r in found) if any(r in found for r in self.regions) else ""
        ops: list[Op] = [
            Put(keys.region_copy(digest, region, key), _dump(CopyRecord(size, now))) for region, key in found.items()
        ]
        if source:
            queued = _dump(Queued(source, found[source], size, now))
            ops += [Put(keys.replication_queued(t, digest), queued) for t in self.regions if t not in found]
        result = await self.kv.txn([Compare.present(keys.blob(digest)), Compare.absent(keys.deleting(digest))], ops)
        return result.succeeded

    async def enqueue(self, digest: str, size: int, source: str, key: str, targets: Iterable[str]) -> bool:
        """Queue copies of a recorded blob from `source` (its bytes at `key`) into `targets`."""
        queued = _dump(Queued(source, key, size, time.time()))
        ops: list[Op] = [Put(keys.replication_queued(t, digest), queued) for t in targets]
        if not ops:
            return True
        result = await self.kv.txn([Compare.present(keys.blob(digest)), Compare.absent(keys.deleting(digest))], ops)
        return result.succeeded

    # -- garbage collection ----------------------------------------------------------------------

    async def fence(self, digest: str, addressed: str) -> Fence:
        """The checks and deletes that make a blob's deletion cover every region (see the module doc).

        `addressed` is the digest's content-addressed storage key, where workers put their copies.
        """
        copies = await self.copies(digest)
        expected = {c.record_key: c.revision for c in copies}
        for region in self.regions:
            expected[keys.replication_copying(digest, region)] = 0
            expected.setdefault(keys.region_copy(digest, region, addressed), 0)
        ops: list[Op] = [Delete(keys.region_copies_of(digest), prefix=True)]
        ops += [Delete(keys.replication_queued(region, digest)) for region in self.regions]
        return Fence(expected, ops, copies)

    # -- what a region holds ---------------------------------------------------------------------

    async def stored_keys(self, region: str) -> AsyncIterator[str]:
        """Every storage key a copy record names in `region` (a scan of all copy records)."""
        async for page in pages(self.kv, keys.REGION_COPIES):
            for kv in page:
                _, where, storage_key = keys.split_region_copy(kv.key)
                if where == region:
                    yield storage_key

    async def regions_holding(self, digests: Sequence[str]) -> dict[str, set[str]]:
        """For each digest, the regions whose copy records name it."""
        return {digest: {c.region for c in await self.copies(digest)} for digest in digests}


# -- regions that joined the store ---------------------------------------------------------------


async def joined(kv: KV) -> dict[str, Joined]:
    return {kv_.key[len(keys.REGIONS) :]: _decode(Joined, kv_.value) for kv_ in await scan(kv, keys.REGIONS)}


async def has_joined(kv: KV, region: str) -> bool:
    return await kv.get(keys.region(region)) is not None


async def join(kv: KV, region: str, node: str) -> None:
    """Note that `region`'s storage now carries the store identity (written there first)."""
    await kv.txn([Compare.absent(keys.region(region))], [Put(keys.region(region), _dump(Joined(time.time(), node)))])
