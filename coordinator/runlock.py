"""Cluster-wide run locks: one process at a time runs a job (a GC cycle, a retention run, an import)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from . import keys
from .kv import KV, Compare, Put
from .lease import KeptLease


class RunHeld(Exception):
    """Another process runs the job right now; the message names it."""


@contextlib.asynccontextmanager
async def run_lock(
    kv: KV, job: str, holder: str, *, ttl: int, busy: type[Exception] = RunHeld
) -> AsyncIterator[KeptLease]:
    """Hold `job`'s lock for the block (`busy`, naming the holder, if another holds it).

    The lock lapses with its lease if this process dies.
    """
    key = keys.leader(f"{job}-run")
    async with KeptLease(kv, max(ttl, 5)) as lease:
        taken = await kv.txn([Compare.absent(key)], [Put(key, holder.encode(), lease=lease.id)])
        if not taken.succeeded:
            found = await kv.get(key)
            raise busy(found.value.decode() if found else "another process")
        yield lease
