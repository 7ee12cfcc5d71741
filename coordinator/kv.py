"""The KV contract every coordinator backend implements (embedded and etcd)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True)
class KeyValue:
    """One stored key with etcd-style revision bookkeeping."""

    key: str
    value: bytes
    version: int  # 1 on create, +1 on every put; a deleted key starts again at 1
    create_revision: int
    mod_revision: int
    lease: int = 0


CompareTarget = Literal["value", "version", "create_revision", "mod_revision"]
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True)
class Compare:
    """A guard of a transaction.

    An absent key has version, create_revision and mod_revision 0 and never
    matches a value comparison (as in etcd).
    """

    key: str
    target: CompareTarget
    op: CompareOp
    operand: int | bytes

    @staticmethod
    def absent(key: str) -> Compare:
        return Compare(key, "version", "==", 0)

    @staticmethod
    def present(key: str) -> Compare:
        return Compare(key, "version", ">", 0)

    @staticmethod
    def unchanged(key: str, mod_revision: int) -> Compare:
        """The key is as it was read (mod_revision 0 means: still absent)."""
        return Compare(key, "mod_revision", "==", mod_revision)


@dataclass(frozen=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    key: str


@dataclass(frozen=True)
class Count:
    """The keys under `prefix`, counted where the op stands in its branch (so before its later writes)."""

    prefix: str


Op = Put | Delete | Get | Count
READS = (Get, Count)


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    # One entry per Get op of the branch that ran, in order; None for an absent key.
    gets: list[KeyValue | None] = field(default_factory=list)
    revision: int = 0
    # One entry per Count op of the branch that ran, in order.
    counts: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["put", "delete"]
    key: str
    value: bytes  # empty for deletes
    mod_revision: int


class Watch(Protocol):
    """An open prefix watch; iterate for events, close to stop."""

    def __aiter__(self) -> AsyncIterator[WatchEvent]: ...

    async def close(self) -> None: ...


class LeaseGone(LookupError):
    """A put named a lease the store no longer has: it expired (its holder's refreshes were late) or
    was revoked. Nothing of that write was applied."""


class OutOfSpace(Exception):
    """The store refused a write for lack of space (etcd's NOSPACE alarm, a full disk under the
    embedded file). Nothing of that write was applied; reads go on, and writes succeed again once
    space returns, on the same connection."""

    def __init__(self, message: str, *, backend: str) -> None:
        super().__init__(message)
        self.backend = backend


@dataclass(frozen=True)
class MemberSpace:
    """How full one etcd member (or the embedded file) is."""

    name: str  # an etcd member's client URL, or the embedded file's path
    size: int  # bytes it takes on disk
    in_use: int  # bytes of them holding data; a defragmentation gives the rest back
    quota: int  # the size at which it refuses writes; 0 when it cannot be told
    revision: int
    alarms: tuple[str, ...] = ()  # "NOSPACE", "CORRUPT" (etcd); "NOSPACE" after a write found the disk full
    leader: bool = False
    member_id: str = ""
    error: str = ""  # set when the member did not answer (the figures are then 0)

    @property
    def used(self) -> float:
        """The share of the quota taken (0 when the quota is unknown)."""
        return self.size / self.quota if self.quota else 0.0


@dataclass(frozen=True)
class StoreSpace:
    """Every member's figures, as `KV.space()` found them."""

    backend: str  # "etcd" or "embedded"
    members: tuple[MemberSpace, ...]

    @property
    def revision(self) -> int:
        return max((m.revision for m in self.members), default=0)

    @property
    def fullest(self) -> MemberSpace | None:
        """The member nearest its quota (the one that refuses writes first)."""
        answered = [m for m in self.members if not m.error]
        return max(answered, key=lambda m: (m.used, m.size), default=None)

    @property
    def alarms(self) -> tuple[str, ...]:
        return tuple(sorted({a for m in self.members for a in m.alarms}))


class SnapshotLost(Exception):
    """The store no longer holds the revision a snapshot reads (etcd compacted it meanwhile)."""


class Snapshot(Protocol):
    """Every key of the store as of one revision, read in pages while writes go on.

    Reads answer as the store stood at `revision`, however much it has changed since; a page is
    the most a read holds in memory. Valid until the context that opened it ends.
    """

    revision: int
    backend: str  # "embedded" or "etcd", for the snapshot's header

    async def range(self, prefix: str, *, start: str | None = None, limit: int = 0) -> list[KeyValue]:
        """As `KV.range`, at the snapshot's revision."""
        ...

    async def count(self, prefix: str) -> int: ...


class KV(Protocol):
    """The small store all coordinator logic is written against."""

    async def get(self, key: str) -> KeyValue | None: ...

    async def range(self, prefix: str, *, start: str | None = None, limit: int = 0) -> list[KeyValue]:
        """Keys under `prefix` in byte order, from `start` (inclusive) if given.

        `limit` 0 means no limit.
        """
        ...

    async def count(self, prefix: str) -> int: ...

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Store a value; returns the new revision."""
        ...

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete a key (or every key under a prefix); returns how many went."""
        ...

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Op],
        failure: Sequence[Op] = (),
    ) -> TxnResult:
        """Atomically run `success` if every compare holds, else `failure`."""
        ...

    async def grant_lease(self, ttl: int) -> int:
        """A new lease id that expires `ttl` seconds from now unless refreshed."""
        ...

    async def refresh_lease(self, lease: int) -> bool:
        """Push the expiry of a lease out by its TTL; False if it has expired."""
        ...

    async def revoke_lease(self, lease: int) -> None:
        """End a lease now, deleting every key attached to it."""
        ...

    async def watch(self, prefix: str, *, start_revision: int = 0) -> Watch:
        """Events for keys under `prefix` after the watch opens.

        With `start_revision`, events from that revision on (as far as history allows).
        """
        ...

    def snapshot(self) -> AbstractAsyncContextManager[Snapshot]:
        """`async with kv.snapshot() as snap:` a consistent view as of the current revision.

        Writers are not held up while it is open (etcd: reads at a fixed revision; embedded: one
        read transaction on a connection of its own). Reads may raise `SnapshotLost` if the store
        discards the revision meanwhile.
        """
        ...

    async def ping(self) -> None:
        """Raise if the store cannot be reached."""
        ...

    async def space(self) -> StoreSpace:
        """How big the store is against its quota, per member, and its alarms."""
        ...

    async def compact(self, revision: int) -> None:
        """Forget history before `revision`: watches from older revisions and snapshots at them are
        lost, the current state is kept. Compacting to a revision already compacted does nothing."""
        ...

    async def defragment(self, member: str | None = None) -> None:
        """Give the space that compaction and deletes freed back to the disk, for one member (a
        `MemberSpace.name`; None: the one in use). The member answers nothing else meanwhile."""
        ...

    async def disarm(self) -> tuple[str, ...]:
        """Clear NOSPACE alarms (once space is back); returns those cleared. A write that still
        does not fit raises it again."""
        ...

    async def close(self) -> None: ...


# etcd's default --max-txn-ops; the embedded backend holds to it too, so code that works on
# one backend works on the other.
MAX_TXN_OPS = 128


def check_txn_branch(ops: Sequence[Op]) -> None:
    """Refuse what etcd refuses: a key written twice in one branch, or too many operations."""
    if len(ops) > MAX_TXN_OPS:
        raise ValueError(f"a transaction branch holds at most {MAX_TXN_OPS} operations, not {len(ops)}")
    written = [op.key for op in ops if isinstance(op, (Put, Delete))]
    if len(written) != len(set(written)):
        raise ValueError("a transaction may write each key only once")


def prefix_end(prefix: str) -> str:
    """The smallest key greater than every key starting with `prefix`."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return raw.decode("utf-8", errors="surrogateescape")
        raw.pop()
    return "\0"


SCAN_PAGE = 1000


async def pages(
    kv: KV, prefix: str, *, start: str | None = None, page: int = SCAN_PAGE
) -> AsyncIterator[list[KeyValue]]:
    """Every key under `prefix` (from `start`), a page at a time: memory stays one page deep.

    Both backends read a page without walking the rest of the range (etcd through bounded
    windows), so a whole scan costs what it returns.
    """
    while True:
        found = await kv.range(prefix, start=start, limit=page)
        if found:
            yield found
        if len(found) < page:
            return
        start = found[-1].key + "\0"


async def scan(kv: KV, prefix: str, *, start: str | None = None) -> list[KeyValue]:
    """Every key under `prefix`, read a page at a time (for ranges known to be small)."""
    return [item async for found in pages(kv, prefix, start=start) for item in found]
