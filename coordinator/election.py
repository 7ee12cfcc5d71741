"""Leader election on the KV: a key created with a lease; whoever creates it leads until it lapses."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from . import keys
from .kv import KV, Compare, Get, Put
from .lease import KeptLease

log = logging.getLogger("wharf.election")


async def current_leader(kv: KV, job: str) -> str | None:
    """The candidate leading `job` now, or None."""
    found = await kv.get(keys.leader(job))
    return found.value.decode() if found else None


class Election:
    """Campaign for one job's leadership and run `lead` while leader.

    `lead` is cancelled as soon as leadership may be lost (the lease could not be refreshed
    within its TTL), so two nodes never believe they lead for longer than one TTL.
    """

    def __init__(self, kv: KV, job: str, candidate: str, *, ttl: int = 10) -> None:
        self.kv = kv
        self.job = job
        self.candidate = candidate
        self.ttl = ttl
        self.is_leader = False
        self.on_change: Callable[[bool], None] | None = None
        self._stopped = asyncio.Event()

    async def leader(self) -> str | None:
        return await current_leader(self.kv, self.job)

    def stop(self) -> None:
        self._stopped.set()

    async def run(self, lead: Callable[[], Awaitable[None]]) -> None:
        """Campaign until stopped; never raises for store failures, it retries."""
        while not self._stopped.is_set():
            try:
                await self._campaign_once(lead)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("election for %s: %s", self.job, exc)
                await self._sleep(min(self.ttl / 2, 2.0))

    async def _campaign_once(self, lead: Callable[[], Awaitable[None]]) -> None:
        key = keys.leader(self.job)
        lease = await KeptLease(self.kv, self.ttl).start()
        try:
            result = await self.kv.txn(
                [Compare.absent(key)], [Put(key, self.candidate.encode(), lease=lease.id)], [Get(key)]
            )
            if not result.succeeded:
                await lease.close()
                await self._await_vacancy(key)
                return
            await self._lead(lead, lease)
        finally:
            await lease.close()

    async def _lead(self, lead: Callable[[], Awaitable[None]], lease: KeptLease) -> None:
        self._set_leader(True)
        log.info("leading %s as %s", self.job, self.candidate)
        work = asyncio.ensure_future(lead())
        lost = asyncio.ensure_future(lease.lost.wait())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait([work, lost, stopped], return_when=asyncio.FIRST_COMPLETED)
            if work.done() and not work.cancelled() and work.exception() is not None:
                log.warning("%s leader work failed: %r", self.job, work.exception())
        finally:
            for task in (work, lost, stopped):
                task.cancel()
            for task in (work, lost, stopped):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._set_leader(False)
            log.info("no longer leading %s", self.job)

    async def _await_vacancy(self, key: str) -> None:
        """Return when the leader key goes (watch), or after a while to check again anyway."""
        watch = await self.kv.watch(key)
        try:
            if await self.kv.get(key) is None:
                return

            async def deleted() -> None:
                async for event in watch:
                    if event.key == key and event.type == "delete":
                        return

            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(deleted(), timeout=self.ttl)
        finally:
            await watch.close()

    def _set_leader(self, leading: bool) -> None:
        self.is_leader = leading
        if self.on_change is not None:
            self.on_change(leading)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), timeout=seconds)
