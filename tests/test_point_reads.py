"""Point reads sharing round trips (coordinator/pointreads.py): batched, never from the past."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from coordinator.pointreads import PointReads


class Store:
    """A store whose round trips stay open until the test lets them go, recording what each carried."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.trips: list[list[str]] = []
        self.gates: list[asyncio.Event] = []
        self.fail: Exception | None = None

    async def _trip(self, keys: list[str]) -> list[int | None]:
        self.trips.append(keys)
        gate = asyncio.Event()
        self.gates.append(gate)
        await gate.wait()
        if self.fail is not None:
            raise self.fail
        # The values as they are when the store answers (after every write made before).
        return [self.values.get(key) for key in keys]

    async def one(self, key: str) -> int | None:
        return (await self._trip([key]))[0]

    async def many(self, keys: Sequence[str]) -> list[int | None]:
        return await self._trip(list(keys))

    def reads(self, **kwargs: int) -> PointReads[str, int | None]:
        return PointReads(self.one, self.many, **kwargs)

    async def release(self, index: int) -> None:
        self.gates[index].set()
        for _ in range(5):
            await asyncio.sleep(0)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_idle_read_goes_out_at_once_on_its_own() -> None:
    store = Store()
    store.values["a"] = 1
    reads = store.reads()
    task = asyncio.create_task(reads.get("a"))
    await _settle()
    assert store.trips == [["a"]]
    await store.release(0)
    assert await task == 1


async def test_reads_asked_for_during_a_round_trip_share_the_next_one() -> None:
    store = Store()
    store.values.update(a=1, b=2, c=3)
    reads = store.reads()
    first = asyncio.create_task(reads.get("a"))
    await _settle()
    waiting = [asyncio.create_task(reads.get(key)) for key in ("b", "c", "b", "a")]
    await _settle()
    assert store.trips == [["a"]]  # nothing more on the wire while one is out
    assert reads.waiting == 3
    await store.release(0)
    assert store.trips == [["a"], ["b", "c", "a"]]  # one trip, each key once
    await store.release(1)
    assert await first == 1
    assert [await t for t in waiting] == [2, 3, 2, 1]


async def test_a_read_never_joins_a_round_trip_that_began_before_it_was_asked_for() -> None:
    """A write acknowledged before a read is asked for is always in its answer."""
    store = Store()
    store.values["tag"] = 1
    reads = store.reads()
    early = asyncio.create_task(reads.get("tag"))
    await _settle()
    store.values["tag"] = 2  # the move is acknowledged while the first read is out
    late = asyncio.create_task(reads.get("tag"))
    await _settle()
    # The store answers the first trip as it stands now (2) or stood (1); the late read must not
    # take that answer, whatever it is: it waits for a trip of its own.
    store.values["tag"] = 3
    await store.release(0)
    assert store.trips == [["tag"], ["tag"]]
    assert not late.done()
    await store.release(1)
    assert await early == 3
    assert await late == 3


async def test_a_failed_round_trip_fails_each_of_its_callers_and_the_next_still_goes() -> None:
    store = Store()
    store.values.update(a=1, b=2)
    reads = store.reads()
    first = asyncio.create_task(reads.get("a"))
    await _settle()
    shared = [asyncio.create_task(reads.get(key)) for key in ("a", "b")]
    await _settle()
    await store.release(0)
    store.fail = ConnectionError("store went away")
    await store.release(1)
    assert await first == 1
    for task in shared:
        with pytest.raises(ConnectionError):
            await task
    store.fail = None
    after = asyncio.create_task(reads.get("b"))
    await _settle()
    await store.release(2)
    assert await after == 2


async def test_a_caller_that_gives_up_leaves_the_others_their_answer() -> None:
    store = Store()
    store.values.update(a=1, b=2)
    reads = store.reads()
    first = asyncio.create_task(reads.get("a"))
    await _settle()
    quitter = asyncio.create_task(reads.get("b"))
    stayer = asyncio.create_task(reads.get("b"))
    gone = asyncio.create_task(reads.get("a"))
    await _settle()
    quitter.cancel()
    gone.cancel()
    await _settle()
    await store.release(0)
    assert store.trips[1] == ["b"]  # "a" had no caller left, so it was not read again
    await store.release(1)
    assert await first == 1
    assert await stayer == 2
    assert quitter.cancelled() and gone.cancelled()


async def test_a_round_trip_carries_at_most_a_batch_and_the_rest_follow() -> None:
    store = Store()
    store.values.update({f"k{i}": i for i in range(5)})
    reads = store.reads(batch=2)
    first = asyncio.create_task(reads.get("k0"))
    await _settle()
    rest = [asyncio.create_task(reads.get(f"k{i}")) for i in range(1, 5)]
    await _settle()
    for index in range(3):
        await store.release(index)
    assert store.trips == [["k0"], ["k1", "k2"], ["k3", "k4"]]
    assert await first == 0
    assert [await t for t in rest] == [1, 2, 3, 4]


async def test_more_room_on_the_wire_sends_reads_at_once() -> None:
    store = Store()
    reads = store.reads(in_flight=2)
    tasks = [asyncio.create_task(reads.get(key)) for key in ("a", "b", "c")]
    await _settle()
    assert store.trips == [["a"], ["b"]]
    await store.release(0)
    assert store.trips == [["a"], ["b"], ["c"]]
    await store.release(1)
    await store.release(2)
    assert [await t for t in tasks] == [None, None, None]
    await reads.drain()


def test_nonsense_limits_are_refused() -> None:
    store = Store()
    with pytest.raises(ValueError):
        store.reads(in_flight=0)
    with pytest.raises(ValueError):
        store.reads(batch=0)
