"""Notification events in the KV: an inbox written with each change, queues in commit order, delivery state.

An event is put in the inbox in the same transaction as the change it describes (a push, a mount, a
delete), or just before a pull is answered, so it survives the node that made it. The leader's
sequencer moves inbox events in commit order (their create revision) into one queue per endpoint and
repository partition, under one counter guarded by compare-and-swap, so two sequencers never
interleave. A queue's key order is its delivery order; an event leaves its queue once its endpoint
accepted it. Event ids never change, so an endpoint can drop what it has already seen.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import unquote

from . import keys
from .kv import KV, Compare, Delete, KeyValue, Op, Put, Watch, prefix_end, scan

# Repositories spread over this many queues per endpoint; one repository's events stay in one.
PARTITIONS = 16
# A sequencing transaction stays well inside etcd's limits (128 operations, 1.5 MiB a request).
_TXN_OPS = 120
_TXN_BYTES = 512 * 1024


def partition(repository: str) -> int:
    return int.from_bytes(hashlib.sha256(repository.encode()).digest()[:2], "big") % PARTITIONS


def inbox_put(name: str, event: bytes) -> Put:
    """The op that records an event; goes in the transaction of the change it describes.

    `name` is unique and sorts events of one transaction in the order they happened.
    """
    return Put(keys.notify_inbox(name), event)


async def record(kv: KV, events: Sequence[tuple[str, bytes]]) -> None:
    """Record events that no other write carries (pulls), in one transaction."""
    await kv.txn([], [inbox_put(name, event) for name, event in events])


async def _all(kv: KV, prefix: str) -> list[KeyValue]:
    return await scan(kv, prefix)


# Which endpoints want an event: `(event) -> endpoint names`.
Router = Callable[[dict[str, Any]], Sequence[str]]


async def sequence(kv: KV, route: Router) -> dict[tuple[str, int], int]:
    """Move what the inbox holds, oldest commit first, into the queues; returns events per queue.

    Returns an empty mapping when there was nothing to move or another sequencer won the race
    (the caller simply goes again).
    """
    inbox = await _all(kv, keys.NOTIFY_INBOX)
    if not inbox:
        return {}
    inbox.sort(key=lambda item: (item.create_revision, item.key))
    moved: dict[tuple[str, int], int] = {}
    while inbox:
        counter = await kv.get(keys.NOTIFY_SEQ)
        seq = int(counter.value) if counter is not None else 0
        compares = [Compare.unchanged(keys.NOTIFY_SEQ, counter.mod_revision if counter is not None else 0)]
        ops: list[Op] = []
        size = 0
        taken = 0
        batch: dict[tuple[str, int], int] = {}
        for item in inbox:
            event = json.loads(item.value)
            targets = route(event)
            if taken and (len(ops) + 1 + len(targets) > _TXN_OPS or size + len(item.value) * len(targets) > _TXN_BYTES):
                break
            taken += 1
            compares.append(Compare.unchanged(item.key, item.mod_revision))
            ops.append(Delete(item.key))
            if not targets:
                continue
            seq += 1
            shard = partition(event.get("target", {}).get("repository", ""))
            for endpoint in targets:
                ops.append(Put(keys.notify_queued(endpoint, shard, seq), item.value))
                size += len(item.value)
                batch[(endpoint, shard)] = batch.get((endpoint, shard), 0) + 1
        ops.append(Put(keys.NOTIFY_SEQ, str(seq).encode()))
        if not (await kv.txn(compares, ops)).succeeded:
            return moved  # another sequencer moved on meanwhile: read again
        for queue, count in batch.items():
            moved[queue] = moved.get(queue, 0) + count
        inbox = inbox[taken:]
    return moved


async def queued(kv: KV, endpoint: str, shard: int, limit: int) -> list[KeyValue]:
    """The oldest `limit` events of one queue, in delivery order."""
    return await kv.range(keys.notify_partition(endpoint, shard), limit=limit)


async def delivered(kv: KV, items: Sequence[KeyValue]) -> None:
    """Drop events their endpoint accepted."""
    await kv.txn([], [Delete(item.key) for item in items])


async def unsequenced(kv: KV) -> int:
    """Events recorded but not yet moved to their endpoints' queues."""
    return await kv.count(keys.NOTIFY_INBOX)


async def watch_inbox(kv: KV) -> Watch:
    """A watch that fires when events are recorded."""
    return await kv.watch(keys.NOTIFY_INBOX)


async def pending(kv: KV, endpoint: str) -> int:
    return await kv.count(keys.notify_queue(endpoint))


async def oldest(kv: KV, endpoint: str) -> float | None:
    """When the oldest event still queued for `endpoint` happened (its timestamp), or None."""
    found: list[float] = []
    for shard in range(PARTITIONS):
        head = await kv.range(keys.notify_partition(endpoint, shard), limit=1)
        if head:
            stamp = timestamp(json.loads(head[0].value))
            if stamp is not None:
                found.append(stamp)
    return min(found) if found else None


def timestamp(event: dict[str, Any]) -> float | None:
    """An event's `timestamp` (RFC 3339) in seconds since the epoch."""
    try:
        return datetime.datetime.fromisoformat(str(event["timestamp"])).timestamp()
    except (KeyError, ValueError):
        return None


async def queued_endpoints(kv: KV) -> list[str]:
    """Names of every endpoint that has a queue (configured or not any more)."""
    names: set[str] = set()
    start: str | None = None
    while True:
        page = await kv.range(keys.NOTIFY_QUEUES, start=start, limit=1)
        if not page:
            return sorted(names)
        quoted = page[0].key[len(keys.NOTIFY_QUEUES) :].split("/", 1)[0]
        names.add(unquote(quoted))
        start = prefix_end(f"{keys.NOTIFY_QUEUES}{quoted}/")


@dataclass
class DeliveryStatus:
    """How delivery to one endpoint has gone, as the delivering leader last wrote it."""

    node: str = ""
    updated: float = 0.0
    delivered: int = 0  # events accepted since this node began delivering
    failures: int = 0  # consecutive failed attempts
    last_success: float = 0.0
    last_failure: float = 0.0
    last_error: str = ""
    backing_off_until: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> DeliveryStatus:
        data = json.loads(raw)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)


async def write_status(kv: KV, endpoint: str, status: DeliveryStatus) -> None:
    status.updated = time.time()
    await kv.put(keys.notify_status(endpoint), status.to_json())


async def read_status(kv: KV, endpoint: str) -> DeliveryStatus | None:
    found = await kv.get(keys.notify_status(endpoint))
    return DeliveryStatus.from_json(found.value) if found is not None else None
