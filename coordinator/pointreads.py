"""Point reads that share round trips while they wait, without ever answering from the past.

Under load most of a node's coordinator reads are point reads (a tag, a manifest record) arriving
faster than one round trip to the store. `PointReads` keeps at most `in_flight` of them on the wire;
a read asked for while that many are out waits, with every other read asked for meanwhile, for the
next round trip, which then carries them all at once (one key asked for by many callers is read
once). A read joins only a round trip that starts after it was asked for, so each answer is at
least as new as the store was when its caller asked: a write acknowledged before a read began is
always seen, as with a read of its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class PointReads(Generic[K, V]):
    """`read_one(key)` and `read_many(keys)` (one value per key, in order), shared as above."""

    def __init__(
        self,
        read_one: Callable[[K], Awaitable[V]],
        read_many: Callable[[Sequence[K]], Awaitable[Sequence[V]]],
        *,
        in_flight: int = 1,
        batch: int = 64,
    ) -> None:
        if in_flight < 1 or batch < 1:
            raise ValueError("in_flight and batch must be at least 1")
        self._read_one = read_one
        self._read_many = read_many
        self._limit = in_flight
        self._batch = batch
        self._flying = 0
        # The next round trip's keys, in the order first asked for, each with its callers.
        self._waiting: dict[K, list[asyncio.Future[V]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        """Keys waiting for a round trip."""
        return len(self._waiting)

    async def get(self, key: K) -> V:
        if self._flying < self._limit and not self._waiting:
            self._flying += 1
            try:
                return await self._read_one(key)
            finally:
                self._flying -= 1
                self._next()
        callers = self._waiting.get(key)
        if callers is None:
            callers = self._waiting[key] = []
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        callers.append(future)
        return await future

    def _next(self) -> None:
        """Start the next round trip with what waits, if there is room on the wire."""
        while self._waiting and self._flying < self._limit:
            batch: list[tuple[K, list[asyncio.Future[V]]]] = []
            for key in self._waiting:
                batch.append((key, self._waiting[key]))
                if len(batch) >= self._batch:
                    break
            for key, _ in batch:
                del self._waiting[key]
            batch = [(key, callers) for key, callers in batch if not all(f.done() for f in callers)]
            if not batch:
                continue  # every caller of these gave up
            self._flying += 1
            task = asyncio.get_running_loop().create_task(self._fly(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _fly(self, batch: list[tuple[K, list[asyncio.Future[V]]]]) -> None:
        try:
            if len(batch) == 1:
                values: Sequence[V] = [await self._read_one(batch[0][0])]
            else:
                values = await self._read_many([key for key, _ in batch])
        except asyncio.CancelledError:
            for _, callers in batch:
                for future in callers:
                    future.cancel()
            raise
        except Exception as exc:
            for _, callers in batch:
                for future in callers:
                    if not future.done():
                        future.set_exception(exc)
        else:
            for (_, callers), value in zip(batch, values, strict=True):
                for future in callers:
                    if not future.done():
                        future.set_result(value)
        finally:
            self._flying -= 1
            self._next()

    async def drain(self) -> None:
        """Wait for the round trips still out (once the store is closed, they end at once)."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
