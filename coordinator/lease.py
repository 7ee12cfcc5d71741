"""Keep a KV lease alive from a background task, for as long as its holder runs."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .kv import KV, LeaseGone

T = TypeVar("T")

log = logging.getLogger("wharf.coordinator")


class KeptLease:
    """A lease refreshed every TTL/3 until closed; `lost` is set if a refresh finds it gone."""

    def __init__(self, kv: KV, ttl: int) -> None:
        self.kv = kv
        self.ttl = ttl
        self.id = 0
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> KeptLease:
        self.id = await self.kv.grant_lease(self.ttl)
        self._task = asyncio.get_running_loop().create_task(self._keep_alive())
        return self

    async def _keep_alive(self) -> None:
        interval = max(self.ttl / 3, 0.2)
        confirmed = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                alive = await asyncio.wait_for(self.kv.refresh_lease(self.id), timeout=interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a store hiccup: try again until the TTL says otherwise
                log.warning("lease refresh failed: %s", exc)
                # Past its TTL without a confirmed refresh the store may have ended the lease:
                # whoever holds it must act as if it had.
                if time.monotonic() - confirmed >= self.ttl:
                    self.lost.set()
                    return
                continue
            if not alive:
                log.warning("lease %x ended in the store before its refresh; records attached to it are gone", self.id)
                self.lost.set()
                return
            confirmed = time.monotonic()

    async def close(self, *, revoke: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if revoke and self.id:
            try:
                await self.kv.revoke_lease(self.id)
            except Exception as exc:
                log.warning("lease revoke failed: %s", exc)

    async def __aenter__(self) -> KeptLease:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class NodeLease:
    """One lease for a whole process, started on first use and renewed if it is ever lost.

    Records that must vanish when their node dies (a claim on an upload being written) attach to it.
    """

    def __init__(self, kv: KV, ttl: int) -> None:
        self.kv = kv
        self.ttl = ttl
        self._lease: KeptLease | None = None
        self._starting: asyncio.Lock | None = None

    @property
    def lost(self) -> bool:
        return self._lease is not None and self._lease.lost.is_set()

    async def id(self) -> int:
        if self._lease is not None and not self._lease.lost.is_set():
            return self._lease.id
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._lease is None or self._lease.lost.is_set():
                if self._lease is not None:
                    await self._lease.close(revoke=False)
                self._lease = await KeptLease(self.kv, self.ttl).start()
            return self._lease.id

    async def attached(self, write: Callable[[int], Awaitable[T]]) -> T:
        """`write` given this process's lease; once more with a new lease if the store has ended it.

        A store ends a lease whose refreshes came late (a starved process) before the refresh task
        can notice, so a write that names it is refused (LeaseGone) and nothing of it was applied.
        """
        lease = await self.id()
        try:
            return await write(lease)
        except LeaseGone:
            log.warning("lease %x ended in the store before this node noticed; taking a new one", lease)
            if self._lease is not None and self._lease.id == lease:
                self._lease.lost.set()
            return await write(await self.id())

    def holds(self, lease: int) -> bool:
        """Whether `lease` is still this process's live lease (a writer checks before each write)."""
        return self._lease is not None and self._lease.id == lease and not self._lease.lost.is_set()

    async def close(self) -> None:
        if self._lease is not None:
            await self._lease.close()
            self._lease = None
