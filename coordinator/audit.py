"""Audit anchors: the newest line each audit log is known to have had, kept where its nodes cannot rewrite it.

A log file can be cut short by anyone who can write to it, and a hash chain alone does not show
that its last lines went. Each node therefore records, now and then and at every rotation, the
number and hash of its log's newest line here; `wharf audit verify` checks that the file still
holds that line. A record only moves forward, so several workers sharing one log, each with its
own view of the newest line, never move it back.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from . import keys
from .kv import KV, Compare, Put

# A few rounds of compare-and-swap against the other workers of the same log are enough.
_ATTEMPTS = 8


@dataclass(frozen=True)
class AuditHead:
    chain: str  # the log's chain id, carried by each of its lines
    seq: int  # the newest line's number (lines are numbered from 1 across rotations)
    hash: str  # sha256 hex of that line's bytes
    time: str = ""  # when the record was written (UTC, ISO 8601)
    node: str = ""  # the node that wrote it
    path: str = ""  # where that node writes the log


def _parse(value: bytes) -> AuditHead:
    raw = json.loads(value)
    return AuditHead(
        raw["chain"], int(raw["seq"]), raw["hash"], raw.get("time", ""), raw.get("node", ""), raw.get("path", "")
    )


async def read_head(kv: KV, chain: str) -> AuditHead | None:
    item = await kv.get(keys.audit_head(chain))
    return _parse(item.value) if item is not None else None


async def list_heads(kv: KV) -> list[AuditHead]:
    """Every audit log's record (one per chain: a few per node)."""
    return [_parse(item.value) for item in await kv.range(keys.AUDIT_HEADS)]


async def advance_head(kv: KV, head: AuditHead) -> bool:
    """Record `head` unless the stored one is as new or newer; True when written."""
    key = keys.audit_head(head.chain)
    value = json.dumps(asdict(head)).encode()
    for _ in range(_ATTEMPTS):
        item = await kv.get(key)
        if item is not None and int(json.loads(item.value)["seq"]) >= head.seq:
            return False
        guard = Compare.unchanged(key, item.mod_revision if item is not None else 0)
        if (await kv.txn([guard], [Put(key, value)])).succeeded:
            return True
    return False
