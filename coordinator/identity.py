"""The store identity's coordinator record: which store this coordinator's records belong to.

A node claims a new store in two steps: the record is written `claiming` (with the first records a
fresh store needs), the identity is then written into the storage, and the record becomes `bound`.
A concurrent first start agrees on whichever claim landed first. node/store.py compares this record
with the storage's copy.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from . import keys
from .kv import KV, Compare, Get, Put


@dataclass(frozen=True)
class StoreRecord:
    id: str
    created: float
    claiming: bool = False  # the storage's copy may not be written yet


def _decode(value: bytes) -> StoreRecord:
    data = json.loads(value)
    return StoreRecord(str(data["id"]), float(data["created"]), data.get("state") == "claiming")


def _encode(record: StoreRecord) -> bytes:
    state = "claiming" if record.claiming else "bound"
    return json.dumps({"id": record.id, "created": record.created, "state": state}).encode()


async def read(kv: KV) -> StoreRecord | None:
    found = await kv.get(keys.STORE_IDENTITY)
    return None if found is None else _decode(found.value)


async def has_records(kv: KV) -> bool:
    """Whether the coordinator holds any registry record (repositories, blobs, manifests, uploads)."""
    for prefix in (keys.REPOSITORIES, keys.BLOBS, keys.MANIFESTS, keys.UPLOADS):
        if await kv.range(prefix, limit=1):
            return True
    return False


async def claim(kv: KV, id: str, created: float, *, adopt: bool) -> StoreRecord:
    """Claim the store for `id` unless another claim landed first; the record that holds, `claiming`.

    A store with no records yet starts with its digest -> tags index built; one to `adopt` from
    registry:2 starts with its import pending.
    """
    mine = StoreRecord(id, created, claiming=True)
    ops = [Put(keys.STORE_IDENTITY, _encode(mine))]
    if not await has_records(kv):
        # Nothing to index yet: every tag written from now on keeps the digest -> tags index.
        ops.append(Put(keys.TAG_INDEX_BUILT, json.dumps({"at": time.time(), "entries": 0}).encode()))
    if adopt:
        ops.append(Put(keys.IMPORT_STATE, json.dumps({"state": "pending", "requested": time.time()}).encode()))
    result = await kv.txn([Compare.absent(keys.STORE_IDENTITY)], ops, [Get(keys.STORE_IDENTITY)])
    if result.succeeded:
        return mine
    existing = result.gets[0]
    assert existing is not None
    return _decode(existing.value)


async def bind(kv: KV, id: str, created: float) -> None:
    """The storage holds the identity now: the claim is complete."""
    await kv.put(keys.STORE_IDENTITY, _encode(StoreRecord(id, created)))
