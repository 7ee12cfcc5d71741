"""Coordinator snapshots: every durable key as of one revision, in a file that reads without Wharf.

A snapshot is one gzip stream of UTF-8 JSON lines, one object per line:

    {"format": "wharf-coordinator-snapshot", "version": 1, "revision": 5120, "created": "2025-03-01T12:00:00.250Z",
     "created_unix": 1740830400.25, "backend": "etcd", "keys_at_revision": 10004}
    {"k": "blob/sha256:4f2b0c...", "v": "eyJzaXplIjogMTIzLCAia2V5IjogIi4uLiJ9"}
    {"k": "manifest/library/alpine@sha256:9d1e...", "v": "..."}
    ...
    {"end": true, "keys": 10000, "left_out": 4, "sha256": "6a0f..."}

The header (first line):
- `format`, `version`: this is version 1; a restore refuses a version it does not know.
- `revision`: the coordinator revision every key was read at (the etcd cluster's revision, or the
  embedded store's own counter).
- `created` (UTC, ISO 8601) and `created_unix` (seconds): taken just before the revision was
  fixed, so every write acknowledged before that time is in the snapshot.
- `backend`: "etcd" or "embedded", where it was taken; a snapshot restores into either.
- `keys_at_revision`: every key the coordinator held at that revision, the left-out ones included.

Key lines: `k` is the key as Wharf names it (coordinator/keys.py; an etcd prefix is not part of
it, so a snapshot restores under any prefix), `v` the value's bytes in standard base64. Lines come
in byte order of the UTF-8 keys, each key once.

The trailer (last line): `keys` key lines, `left_out` = keys_at_revision - keys, and `sha256`, the
hex SHA-256 of every uncompressed byte before the trailer line (header and key lines, newlines
included). A file with a broken gzip stream, without its trailer, or whose count or digest differ
is refused whole, before anything is written.

By hand, with nothing but a shell:

    zcat SNAP | head -n 1                 # the header
    zcat SNAP | tail -n 1                 # the trailer
    zcat SNAP | head -n -1 | sha256sum    # the trailer's sha256
    zcat SNAP | sed '1d;$d' | jq -r .k | grep '^tag/'          # every tag
    zcat SNAP | grep -F '"k": "tag/library/alpine@3.20"' | jq -r .v | base64 -d

Left out: keys attached to a lease (leader election, run locks) and the `keys.EPHEMERAL` prefixes
(`leader/`, `gc/deleting/`, `restore/in-progress`): they describe processes at work when the
snapshot was taken, not the registry, and would mislead the processes of the restored one.

`restore` reads a snapshot twice: once to check it whole, then to write it. It writes only into a
coordinator that holds no durable key, unless `force`; with `force` the coordinator is made to
hold exactly the snapshot's keys (others deleted, changed ones rewritten, equal ones left), so
restoring one snapshot twice gives the same state. Writes go in transactions within etcd's limits
(`MAX_TXN_OPS` operations, about 1 MiB). `restore/in-progress` is written first and removed last:
an interrupted restore leaves it, and restoring the same snapshot again (no `force` needed)
finishes the job. Restored keys get the target's revisions; no Wharf record stores a revision.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
import zlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from . import keys
from .kv import KV, MAX_TXN_OPS, Delete, KeyValue, Op, Put, Snapshot

FORMAT = "wharf-coordinator-snapshot"
VERSION = 1

# Keys read (and held in memory) at a time, by a dump and by a restore's walk of its target.
PAGE = 500
# Compressed bytes gathered before a dump hands them on.
_CHUNK = 256 * 1024
# etcd refuses requests above 1.5 MiB by default (--max-request-bytes).
_TXN_BYTES = 1024 * 1024
# No line of a snapshot Wharf wrote comes near this: anything longer is a corrupt file.
_MAX_LINE = 64 * 1024 * 1024
_DECOMPRESS_STEP = 1024 * 1024

Sink = Callable[[bytes], Awaitable[None]]
# Opens the snapshot's compressed bytes from the start, once per call.
Source = Callable[[], AsyncIterator[bytes]]
Progress = Callable[[int, int], None]


class SnapshotError(Exception):
    """The file is not a whole, intact snapshot of a known version; nothing was written."""


class CoordinatorNotEmpty(Exception):
    """A restore without `force` found durable keys in the coordinator; nothing was written."""


@dataclass(frozen=True)
class Header:
    revision: int
    created: float
    backend: str
    keys_at_revision: int

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "revision": self.revision,
            "created": iso_time(self.created),
            "created_unix": round(self.created, 3),
            "backend": self.backend,
            "keys_at_revision": self.keys_at_revision,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Header:
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise SnapshotError("not a Wharf coordinator snapshot (its first line is no snapshot header)")
        if doc.get("version") != VERSION:
            raise SnapshotError(f"snapshot format version {doc.get('version')!r} is not one this Wharf reads")
        try:
            return cls(
                int(doc["revision"]), float(doc["created_unix"]), str(doc["backend"]), int(doc["keys_at_revision"])
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"the snapshot header lacks or garbles {exc}") from None


@dataclass(frozen=True)
class Trailer:
    keys: int
    left_out: int
    sha256: str


@dataclass
class SnapshotInfo:
    """What a dump wrote."""

    header: Header
    keys: int = 0
    left_out: int = 0
    size: int = 0  # compressed bytes
    sha256: str = ""
    seconds: float = 0.0


def iso_time(ts: float) -> str:
    whole, millis = divmod(round(ts * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


def _transient(item: KeyValue) -> bool:
    return item.lease != 0 or keys.ephemeral(item.key)


def _order(key: str) -> bytes:
    """Keys sort as their UTF-8 bytes do, in both backends."""
    return key.encode("utf-8", "surrogateescape")


# -- dump ------------------------------------------------------------------------------------


class _Encoder:
    """Lines to gzip bytes, with the running digest and counts for the trailer."""

    def __init__(self) -> None:
        self._gzip = zlib.compressobj(6, zlib.DEFLATED, 31)  # 31: a gzip header (no name, mtime 0)
        self._sha = hashlib.sha256()
        self.keys = 0
        self.left_out = 0

    def _line(self, doc: dict[str, Any]) -> bytes:
        line = (json.dumps(doc, separators=(", ", ": ")) + "\n").encode()
        self._sha.update(line)
        return self._gzip.compress(line)

    def header(self, header: Header) -> bytes:
        return self._line(header.to_json())

    def page(self, items: list[KeyValue]) -> bytes:
        out = []
        for item in items:
            if _transient(item):
                self.left_out += 1
                continue
            self.keys += 1
            out.append(self._line({"k": item.key, "v": base64.b64encode(item.value).decode()}))
        return b"".join(out)

    def trailer(self) -> tuple[bytes, str]:
        digest = self._sha.hexdigest()
        doc = {"end": True, "keys": self.keys, "left_out": self.left_out, "sha256": digest}
        line = (json.dumps(doc, separators=(", ", ": ")) + "\n").encode()
        return self._gzip.compress(line) + self._gzip.flush(), digest


class Dump:
    """A snapshot being written: its header is known before the first byte goes out."""

    def __init__(self, snapshot: Snapshot, header: Header, page: int) -> None:
        self._snapshot = snapshot
        self.header = header
        self._page = page
        self.info = SnapshotInfo(header)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The compressed snapshot; `info` is complete once this is exhausted."""
        started = time.monotonic()
        encoder = _Encoder()
        out = bytearray(encoder.header(self.header))
        start: str | None = None
        while True:
            items = await self._snapshot.range("", start=start, limit=self._page)
            if items:
                # JSON, base64 and zlib for a page take milliseconds: off the event loop.
                out += await asyncio.to_thread(encoder.page, items)
            if len(out) >= _CHUNK:
                self.info.size += len(out)
                yield bytes(out)
                out.clear()
            if len(items) < self._page:
                break
            start = keys.after(items[-1].key)
        tail, digest = encoder.trailer()
        out += tail
        self.info.size += len(out)
        self.info.keys, self.info.left_out, self.info.sha256 = encoder.keys, encoder.left_out, digest
        self.info.seconds = time.monotonic() - started
        yield bytes(out)


@contextlib.asynccontextmanager
async def open_dump(kv: KV, *, page: int = PAGE) -> AsyncIterator[Dump]:
    """Fix a revision and start a dump of it (`async with open_dump(kv) as d: ... d.chunks()`)."""
    created = time.time()
    async with kv.snapshot() as snapshot:
        header = Header(snapshot.revision, created, snapshot.backend, await snapshot.count(""))
        yield Dump(snapshot, header, page)


async def dump(kv: KV, sink: Sink, *, page: int = PAGE) -> SnapshotInfo:
    """Write a snapshot of `kv` to `sink`, a page of keys in memory at a time."""
    async with open_dump(kv, page=page) as running:
        async for chunk in running.chunks():
            await sink(chunk)
    return running.info


# -- reading ---------------------------------------------------------------------------------


async def _lines(chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    inflate = zlib.decompressobj(31)
    pending = b""
    try:
        async for chunk in chunks:
            data = chunk
            while data:
                if inflate.eof:
                    raise SnapshotError("the file goes on after its gzip stream ends")
                try:
                    out = inflate.decompress(data, _DECOMPRESS_STEP)
                except zlib.error as exc:
                    raise SnapshotError(f"not a gzip file, or a corrupt one ({exc})") from None
                data = inflate.unconsumed_tail or inflate.unused_data
                if inflate.eof and inflate.unused_data:
                    raise SnapshotError("the file goes on after its gzip stream ends")
                lines = (pending + out).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    yield line
                if len(pending) > _MAX_LINE:
                    raise SnapshotError("a line longer than any snapshot holds: not a snapshot, or a corrupt one")
    finally:
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
    if not inflate.eof:
        raise SnapshotError("the file ends before its gzip stream does: it is truncated")
    if pending:
        raise SnapshotError("the last line is cut off: the file is truncated")


class _Reader:
    """One pass over a snapshot: the header, then (key, value) in order, checked against the trailer."""

    def __init__(self, source: Source) -> None:
        self._source = source
        self.header: Header | None = None
        self.trailer: Trailer | None = None

    async def entries(self) -> AsyncIterator[tuple[str, bytes]]:
        sha = hashlib.sha256()
        count = 0
        previous: bytes | None = None
        number = 0
        async for line in _lines(self._source()):
            number += 1
            if self.trailer is not None:
                raise SnapshotError(f"line {number}: lines after the trailer")
            try:
                doc = json.loads(line)
            except ValueError:
                raise SnapshotError(f"line {number} is not JSON: not a snapshot, or a corrupt one") from None
            if self.header is None:
                self.header = Header.from_json(doc)
                sha.update(line + b"\n")
                continue
            if not isinstance(doc, dict):
                raise SnapshotError(f"line {number} is not a snapshot record")
            if doc.get("end") is True:
                try:
                    self.trailer = Trailer(int(doc["keys"]), int(doc["left_out"]), str(doc["sha256"]))
                except (KeyError, TypeError, ValueError):
                    raise SnapshotError(f"line {number}: a garbled trailer") from None
                continue
            try:
                key = doc["k"]
                value = base64.b64decode(doc["v"], validate=True)
            except (KeyError, TypeError, ValueError):
                raise SnapshotError(f"line {number} is not a key record") from None
            if not isinstance(key, str) or not key:
                raise SnapshotError(f"line {number}: a key must be a non-empty string")
            order = _order(key)
            if previous is not None and order <= previous:
                raise SnapshotError(f"line {number}: keys out of order (a snapshot lists them sorted, once each)")
            previous = order
            sha.update(line + b"\n")
            count += 1
            yield key, value
        if self.header is None:
            raise SnapshotError("the file is empty")
        if self.trailer is None:
            raise SnapshotError(f"no trailer after {count} keys: the file is truncated")
        if self.trailer.keys != count:
            raise SnapshotError(f"the trailer counts {self.trailer.keys} keys, the file holds {count}")
        if self.trailer.sha256 != sha.hexdigest():
            raise SnapshotError("the checksum in the trailer does not match the contents: the file is corrupt")


async def read_header(source: Source) -> Header:
    """The header alone (the first line), without checking the rest."""
    async with contextlib.aclosing(_lines(source())) as lines:
        async for line in lines:
            try:
                return Header.from_json(json.loads(line))
            except ValueError:
                raise SnapshotError("the first line is not JSON: not a snapshot") from None
    raise SnapshotError("the file is empty")


async def verify(source: Source) -> tuple[Header, Trailer]:
    """Read the whole snapshot and check it; SnapshotError says what is wrong."""
    reader = _Reader(source)
    async for _ in reader.entries():
        pass
    assert reader.header is not None and reader.trailer is not None
    return reader.header, reader.trailer


# -- restore ---------------------------------------------------------------------------------


@dataclass
class RestoreResult:
    header: Header
    trailer: Trailer
    dry_run: bool
    resumed: bool = False  # an interrupted restore of this snapshot was finished
    written: int = 0
    deleted: int = 0
    unchanged: int = 0
    transactions: int = 0
    seconds: float = 0.0
    # The coordinator's durable keys before the restore (counted up to the first page).
    found: list[str] = field(default_factory=list)


class _Batch:
    """Writes gathered into transactions of at most MAX_TXN_OPS operations and _TXN_BYTES bytes."""

    def __init__(self, kv: KV, apply: bool, result: RestoreResult) -> None:
        self._kv = kv
        self._apply = apply
        self._result = result
        self._ops: list[Op] = []
        self._bytes = 0

    async def add(self, op: Put | Delete) -> None:
        size = len(op.key) + (len(op.value) if isinstance(op, Put) else 0) + 16
        if self._ops and (len(self._ops) >= MAX_TXN_OPS or self._bytes + size > _TXN_BYTES):
            await self.flush()
        self._ops.append(op)
        self._bytes += size

    async def flush(self) -> None:
        if not self._ops:
            return
        if self._apply:
            await self._kv.txn([], self._ops)
        self._result.transactions += 1
        self._ops, self._bytes = [], 0


class _Cursor:
    """The target's current keys in order, a page at a time."""

    def __init__(self, kv: KV) -> None:
        self._kv = kv
        self._page: list[KeyValue] = []
        self._at = 0
        self._start: str | None = None
        self._done = False

    async def peek(self) -> KeyValue | None:
        if self._at >= len(self._page) and not self._done:
            self._page = await self._kv.range("", start=self._start, limit=PAGE)
            self._at = 0
            self._done = len(self._page) < PAGE
            if self._page:
                self._start = keys.after(self._page[-1].key)
        return self._page[self._at] if self._at < len(self._page) else None

    def advance(self) -> None:
        self._at += 1


async def durable_keys(kv: KV, *, limit: int = 5) -> list[str]:
    """Up to `limit` keys a restore would have to overwrite (transient ones do not count)."""
    found: list[str] = []
    start: str | None = None
    while len(found) < limit:
        page = await kv.range("", start=start, limit=PAGE)
        found += [item.key for item in page if not _transient(item)][: limit - len(found)]
        if len(page) < PAGE:
            break
        start = keys.after(page[-1].key)
    return found


def _marker(header: Header, trailer: Trailer) -> bytes:
    return json.dumps(
        {"sha256": trailer.sha256, "revision": header.revision, "created": header.created, "started": time.time()}
    ).encode()


async def restore(
    kv: KV,
    source: Source,
    *,
    force: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    verified: tuple[Header, Trailer] | None = None,
) -> RestoreResult:
    """Rebuild `kv` from a snapshot; see the module docstring. A dry run reads and writes nothing.

    `verified` is what `verify(source)` said, for a caller that checked the snapshot already.
    """
    started = time.monotonic()
    header, trailer = verified or await verify(source)
    result = RestoreResult(header, trailer, dry_run)
    result.found = await durable_keys(kv)
    marker = await kv.get(keys.RESTORING)
    if marker is not None:
        try:
            result.resumed = json.loads(marker.value).get("sha256") == trailer.sha256
        except ValueError:
            result.resumed = False
    if result.found and not force and not result.resumed:
        if marker is not None:
            raise CoordinatorNotEmpty(
                "an interrupted restore of another snapshot left the coordinator half-written; "
                "restore that snapshot again to finish it, or force this one over it"
            )
        sample = ", ".join(result.found[:3])
        raise CoordinatorNotEmpty(
            f"the coordinator is not empty (it holds {sample} ...); restoring would mix two states"
        )
    if not dry_run:
        await kv.put(keys.RESTORING, _marker(header, trailer))
    await _merge(kv, source, result, progress)
    if not dry_run:
        await kv.delete(keys.RESTORING)
    result.seconds = time.monotonic() - started
    return result


async def _merge(kv: KV, source: Source, result: RestoreResult, progress: Progress | None) -> None:
    """Walk the snapshot and the target's keys side by side, both in key order."""
    batch = _Batch(kv, not result.dry_run, result)
    target = _Cursor(kv)
    done = 0
    reader = _Reader(source)

    async def drop_below(bound: bytes | None) -> None:
        while (current := await target.peek()) is not None and (bound is None or _order(current.key) < bound):
            if not _transient(current):
                await batch.add(Delete(current.key))
                result.deleted += 1
            target.advance()

    async for key, value in reader.entries():
        done += 1
        if progress is not None and done % 1000 == 0:
            progress(done, result.trailer.keys)
        if keys.ephemeral(key):
            continue  # not from a Wharf dump; a restore never writes what describes running processes
        await drop_below(_order(key))
        current = await target.peek()
        if current is not None and current.key == key:
            target.advance()
            if current.value == value and current.lease == 0:
                result.unchanged += 1
                continue
        await batch.add(Put(key, value))
        result.written += 1
    await drop_below(None)
    await batch.flush()
    if progress is not None:
        progress(done, result.trailer.keys)
