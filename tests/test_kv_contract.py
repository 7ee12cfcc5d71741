"""The KV contract (coordinator/kv.py), run against every backend.

`embedded` runs on a SQLite file in tmp_path; `etcd` runs on the session's etcd under a random key
prefix per test, removed afterwards. A few tests at the end exercise what only the etcd backend has
(endpoint failover) on clusters of their own.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from aetcd import rpc
from services import EtcdCluster

from coordinator import embedded
from coordinator.embedded import EmbeddedKV
from coordinator.etcd import EtcdKV, RevisionCompacted
from coordinator.kv import KV, Compare, Count, Delete, Get, LeaseGone, Put, SnapshotLost, WatchEvent
from coordinator.lease import KeptLease, NodeLease

TTL = 1  # seconds; the session etcd is tuned so that a 1 s lease really lasts 1 s
EVENT_TIMEOUT = 5.0


class Backend:
    """Opens clients onto one store; every client opened is closed when the test ends."""

    def __init__(self, name: str, opener: Callable[[], Awaitable[KV]]) -> None:
        self.name = name
        self._opener = opener
        self.clients: list[KV] = []

    async def open(self) -> KV:
        client = await self._opener()
        self.clients.append(client)
        return client

    async def close_all(self) -> None:
        for client in reversed(self.clients):
            await client.close()
        self.clients.clear()


@pytest.fixture(params=["embedded", "etcd"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "embedded":
        path = str(tmp_path / "coordinator.sqlite3")

        async def open_embedded() -> KV:
            return EmbeddedKV(path)

        b = Backend("embedded", open_embedded)
        try:
            yield b
        finally:
            await b.close_all()
        return

    cluster: EtcdCluster = request.getfixturevalue("etcd")
    prefix = f"/wharf-test/{uuid.uuid4().hex}/"

    async def open_etcd() -> KV:
        return await EtcdKV.open(cluster.endpoints, prefix=prefix)

    b = Backend("etcd", open_etcd)
    try:
        yield b
    finally:
        await b.close_all()
        cleaner = await EtcdKV.open(cluster.endpoints, prefix=prefix)
        try:
            await cleaner.delete("", prefix=True)
        finally:
            await cleaner.close()


@pytest.fixture
async def kv(backend: Backend) -> KV:
    return await backend.open()


async def wait_for(predicate: Callable[[], Awaitable[Any]], *, timeout: float = 5.0, interval: float = 0.05) -> Any:
    """Poll an async predicate until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def next_events(events: AsyncIterator[WatchEvent], n: int) -> list[WatchEvent]:
    return [await asyncio.wait_for(anext(events), EVENT_TIMEOUT) for _ in range(n)]


def summary(events: list[WatchEvent]) -> list[tuple[str, str, bytes]]:
    return [(e.type, e.key, e.value) for e in events]


def byte_order(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode())


# -- get / put / delete ------------------------------------------------------------------


async def test_get_of_missing_key_returns_none(kv: KV) -> None:
    assert await kv.get("nothing/here") is None


async def test_put_then_get_returns_value_with_fresh_bookkeeping(kv: KV) -> None:
    rev = await kv.put("k", b"v1")
    got = await kv.get("k")
    assert got is not None
    assert (got.key, got.value, got.version, got.lease) == ("k", b"v1", 1, 0)
    assert got.create_revision == got.mod_revision == rev > 0


async def test_every_put_bumps_version_and_mod_revision_but_keeps_create_revision(kv: KV) -> None:
    first = await kv.put("k", b"1")
    second = await kv.put("k", b"2")
    third = await kv.put("k", b"3")
    assert first < second < third
    got = await kv.get("k")
    assert got is not None
    assert (got.value, got.version, got.create_revision, got.mod_revision) == (b"3", 3, first, third)


async def test_revision_is_store_wide_and_strictly_increasing(kv: KV) -> None:
    revs = [await kv.put(f"k{i}", b"x") for i in range(5)]
    assert revs == sorted(set(revs))
    assert [(await kv.get(f"k{i}")).mod_revision for i in range(5)] == revs  # type: ignore[union-attr]


async def test_values_round_trip_as_exact_bytes_and_keys_as_unicode(kv: KV) -> None:
    blobs = {"empty": b"", "binary": bytes(range(256)), "big": b"\x00\xff" * 50_000, "unicodé/ключ/鍵": b"ok"}
    for key, value in blobs.items():
        await kv.put(key, value)
    for key, value in blobs.items():
        got = await kv.get(key)
        assert got is not None and got.key == key and got.value == value


async def test_delete_removes_a_key_and_reports_how_many_went(kv: KV) -> None:
    await kv.put("k", b"v")
    assert await kv.delete("k") == 1
    assert await kv.get("k") is None
    assert await kv.delete("k") == 0


async def test_deleting_a_missing_key_does_not_advance_the_revision(kv: KV) -> None:
    rev = await kv.put("k", b"v")
    assert await kv.delete("missing") == 0
    assert await kv.put("k2", b"v") == rev + 1


async def test_recreated_key_starts_again_at_version_one(kv: KV) -> None:
    await kv.put("k", b"a")
    await kv.put("k", b"b")
    await kv.delete("k")
    rev = await kv.put("k", b"c")
    got = await kv.get("k")
    assert got is not None
    assert (got.version, got.create_revision, got.mod_revision) == (1, rev, rev)


# -- range / count / delete by prefix ------------------------------------------------------

NESTED = ["a", "a/", "a/b", "a/b/c", "a/bz", "a/c", "a/\u00e9", "a/Z", "a/~", "a0", "ab", "b", "a/b\u00ff", "a/b\uffff"]
# "п" is D0 BF in UTF-8: bumping its last byte gives invalid UTF-8, so its range end needs care.
NESTED += ["\u043f", "\u043f/1", "\u043f\u043f", "\u0440"]


async def test_range_lists_keys_under_a_prefix_in_byte_order(kv: KV) -> None:
    for key in reversed(NESTED):
        await kv.put(key, key.encode())
    for prefix in ["a/", "a/b", "a", "ab", "a/b/", "", "\u043f"]:
        expected = byte_order([k for k in NESTED if k.startswith(prefix)])
        got = await kv.range(prefix)
        assert [g.key for g in got] == expected, prefix
        assert all(g.value == g.key.encode() for g in got)
    assert await kv.range("zzz") == []


async def test_range_prefix_does_not_leak_into_sibling_prefixes(kv: KV) -> None:
    for key in ["a/", "a/b", "ab", "a/b/c", "a0"]:
        await kv.put(key, b"x")
    assert [k.key for k in await kv.range("a/")] == ["a/", "a/b", "a/b/c"]
    assert [k.key for k in await kv.range("a/b")] == ["a/b", "a/b/c"]
    assert [k.key for k in await kv.range("ab")] == ["ab"]


async def test_range_start_key_is_inclusive_and_clamped_to_the_prefix(kv: KV) -> None:
    for key in ["p/a", "p/b", "p/c", "q/a", "o/z"]:
        await kv.put(key, b"x")
    assert [k.key for k in await kv.range("p/", start="p/b")] == ["p/b", "p/c"]
    assert [k.key for k in await kv.range("p/", start="p/bb")] == ["p/c"]
    assert [k.key for k in await kv.range("p/", start="a")] == ["p/a", "p/b", "p/c"]  # before the prefix
    assert await kv.range("p/", start="p/d") == []
    assert await kv.range("p/", start="q/") == []  # beyond the prefix


async def _page_through(kv: KV, prefix: str, limit: int) -> list[str]:
    found: list[str] = []
    start: str | None = None
    for _ in range(10_000):
        page = await kv.range(prefix, start=start, limit=limit)
        found += [item.key for item in page]
        if len(page) < limit:
            return found
        start = page[-1].key + "\0"
    raise AssertionError("paging did not end")


async def test_paging_through_uneven_keys_never_skips_or_repeats_one(kv: KV) -> None:
    rng = random.Random(7)
    prefix = "pages/"
    # Dense runs, long shared stretches (a repository's links), sparse outliers, odd characters.
    wanted = {f"{prefix}team/app@sha256:{rng.getrandbits(256):064x}" for _ in range(700)}
    wanted |= {f"{prefix}a{n:05d}" for n in range(300)}
    wanted |= {f"{prefix}{'z' * rng.randint(1, 90)}{n}" for n in range(40)}
    wanted |= {f"{prefix}ü{n}" for n in range(5)} | {f"{prefix}\u00ff{n}" for n in range(5)}
    ordered = sorted(wanted, key=lambda k: k.encode())
    for start in range(0, len(ordered), 100):
        await kv.txn([], [Put(k, b"v") for k in ordered[start : start + 100]])
    for limit in (1, 7, 100, 1000):
        assert await _page_through(kv, prefix, limit) == ordered
    # Keys added between pages, before and after the position: those after it come, none twice.
    first = await kv.range(prefix, limit=50)
    assert [k.key for k in first] == ordered[:50]
    extra = [f"{prefix}0first", f"{prefix}team/app@sha256:{'f' * 64}x", f"{prefix}zzzzzzzz-last"]
    await kv.txn([], [Put(k, b"v") for k in extra])
    seen = [k.key for k in first]
    start: str | None = first[-1].key + "\0"
    while start is not None:
        page = await kv.range(prefix, start=start, limit=50)
        seen += [k.key for k in page]
        start = page[-1].key + "\0" if len(page) == 50 else None
    after = [k for k in sorted(wanted | set(extra), key=lambda k: k.encode()) if k.encode() > first[-1].key.encode()]
    assert seen == ordered[:50] + after


async def test_range_paginates_with_start_key_and_limit(kv: KV) -> None:
    keys = [f"page/{i:03d}" for i in range(23)] + ["page/\u00e9t\u00e9", "page0", "pagf"]
    for key in keys:
        await kv.put(key, b"x")
    expected = byte_order([k for k in keys if k.startswith("page/")])
    seen: list[str] = []
    start: str | None = None
    pages = 0
    while True:
        page = await kv.range("page/", start=start, limit=7)
        assert len(page) <= 7
        if not page:
            break
        pages += 1
        seen.extend(k.key for k in page)
        start = page[-1].key + "\0"  # the smallest key after the last one seen
    assert seen == expected
    assert pages == 4
    assert len(await kv.range("page/", limit=0)) == 24


async def test_count_counts_only_keys_under_the_prefix(kv: KV) -> None:
    for key in NESTED:
        await kv.put(key, b"x")
    for prefix in ["a/", "a/b", "a", "ab", "nothing", "\u043f", ""]:
        assert await kv.count(prefix) == len([k for k in NESTED if k.startswith(prefix)]), prefix


async def test_delete_by_prefix_removes_only_keys_under_that_prefix(kv: KV) -> None:
    for key in NESTED:
        await kv.put(key, b"x")
    gone = [k for k in NESTED if k.startswith("a/")]
    assert await kv.delete("a/", prefix=True) == len(gone)
    assert [k.key for k in await kv.range("")] == byte_order([k for k in NESTED if k not in gone])
    assert await kv.delete("a/", prefix=True) == 0


# -- transactions --------------------------------------------------------------------------


async def test_create_if_absent_succeeds_once(kv: KV) -> None:
    first = await kv.txn([Compare.absent("lock")], [Put("lock", b"me")])
    second = await kv.txn([Compare.absent("lock")], [Put("lock", b"you")])
    assert first.succeeded and not second.succeeded
    assert (await kv.get("lock")).value == b"me"  # type: ignore[union-attr]
    assert first.revision == (await kv.get("lock")).mod_revision  # type: ignore[union-attr]


async def test_unchanged_with_revision_zero_means_still_absent(kv: KV) -> None:
    assert (await kv.txn([Compare.unchanged("k", 0)], [Put("k", b"1")])).succeeded
    assert not (await kv.txn([Compare.unchanged("k", 0)], [Put("k", b"2")])).succeeded
    assert (await kv.get("k")).value == b"1"  # type: ignore[union-attr]


async def test_cas_on_mod_revision_fails_after_a_concurrent_write(backend: Backend) -> None:
    mine, theirs = await backend.open(), await backend.open()
    await mine.put("record", b"v1")
    seen = await mine.get("record")
    assert seen is not None
    await theirs.put("record", b"theirs")  # lands between my read and my write
    result = await mine.txn([Compare.unchanged("record", seen.mod_revision)], [Put("record", b"mine")])
    assert not result.succeeded
    assert (await mine.get("record")).value == b"theirs"  # type: ignore[union-attr]
    fresh = await mine.get("record")
    assert fresh is not None
    assert (await mine.txn([Compare.unchanged("record", fresh.mod_revision)], [Put("record", b"mine")])).succeeded
    assert (await theirs.get("record")).value == b"mine"  # type: ignore[union-attr]


async def test_present_guard_fails_for_missing_key_and_holds_for_existing_one(kv: KV) -> None:
    assert not (await kv.txn([Compare.present("k")], [Put("k", b"x")])).succeeded
    assert await kv.get("k") is None
    await kv.put("k", b"1")
    assert (await kv.txn([Compare.present("k")], [Put("k", b"2")])).succeeded


async def test_value_comparisons(kv: KV) -> None:
    await kv.put("k", b"bbb")
    assert (await kv.txn([Compare("k", "value", "==", b"bbb")], [])).succeeded
    assert not (await kv.txn([Compare("k", "value", "==", b"bb")], [])).succeeded
    assert (await kv.txn([Compare("k", "value", "!=", b"aaa")], [])).succeeded
    assert (await kv.txn([Compare("k", "value", ">", b"aaa")], [])).succeeded
    assert (await kv.txn([Compare("k", "value", "<", b"c")], [])).succeeded
    assert not (await kv.txn([Compare("k", "value", "<", b"bbb")], [])).succeeded


async def test_value_comparison_on_a_missing_key_never_holds(kv: KV) -> None:
    for op in ("==", "!=", "<", ">"):
        assert not (await kv.txn([Compare("missing", "value", op, b"")], [])).succeeded, op  # type: ignore[arg-type]


async def test_version_and_create_revision_comparisons(kv: KV) -> None:
    created = await kv.put("k", b"1")
    await kv.put("k", b"2")
    assert (await kv.txn([Compare("k", "version", "==", 2)], [])).succeeded
    assert (await kv.txn([Compare("k", "version", ">", 1), Compare("k", "version", "<", 3)], [])).succeeded
    assert (await kv.txn([Compare("k", "create_revision", "==", created)], [])).succeeded
    assert (await kv.txn([Compare("k", "mod_revision", ">", created)], [])).succeeded
    assert (await kv.txn([Compare("missing", "create_revision", "==", 0)], [])).succeeded
    assert (await kv.txn([Compare("missing", "mod_revision", "<", 1)], [])).succeeded


async def test_every_compare_must_hold_for_the_success_branch(kv: KV) -> None:
    await kv.put("a", b"1")
    result = await kv.txn(
        [Compare.present("a"), Compare.present("b")], [Put("out", b"success")], [Put("out", b"failure")]
    )
    assert not result.succeeded
    assert (await kv.get("out")).value == b"failure"  # type: ignore[union-attr]


async def test_failed_guard_runs_only_the_failure_branch(kv: KV) -> None:
    await kv.put("k", b"taken")
    await kv.put("doomed", b"x")
    result = await kv.txn(
        [Compare.absent("k")],
        [Put("k", b"mine"), Put("won", b"1")],
        [Delete("doomed"), Put("lost", b"1"), Get("k")],
    )
    assert not result.succeeded
    assert [g.value if g else None for g in result.gets] == [b"taken"]
    assert await kv.get("doomed") is None
    assert await kv.get("won") is None
    assert (await kv.get("lost")).value == b"1"  # type: ignore[union-attr]
    assert (await kv.get("k")).value == b"taken"  # type: ignore[union-attr]


async def test_many_gets_at_once_each_get_their_own_key(kv: KV) -> None:
    """Gets in flight together (the etcd client sends them as shared round trips) keep their keys apart."""
    for i in range(40):
        await kv.put(f"many/{i}", str(i).encode())
    wanted = [f"many/{i % 45}" for i in range(400)]  # repeats, and a few keys that do not exist
    found = await asyncio.gather(*(kv.get(key) for key in wanted))
    for key, record in zip(wanted, found, strict=True):
        if int(key.split("/")[1]) >= 40:
            assert record is None
        else:
            assert record is not None and (record.key, record.value) == (key, key.split("/")[1].encode())


async def test_a_get_always_sees_a_write_acknowledged_before_it_began(backend: Backend) -> None:
    """No answer from the past, however many gets are in flight: a tag moved through one node is
    seen by the next read on any other."""
    writer, reader = await backend.open(), await backend.open()
    await writer.put("moving", b"0")
    acknowledged = 0
    stale: list[tuple[int, int]] = []

    async def write() -> None:
        nonlocal acknowledged
        for i in range(1, 151):
            await writer.put("moving", str(i).encode())
            acknowledged = i

    async def read() -> None:
        while acknowledged < 150:
            floor = acknowledged
            record = await reader.get("moving")
            assert record is not None
            if int(record.value) < floor:
                stale.append((int(record.value), floor))
            await asyncio.sleep(0)  # the embedded store answers on the loop thread: let the writer run

    await asyncio.wait_for(asyncio.gather(write(), *(read() for _ in range(12))), timeout=120)
    assert stale == []


async def test_get_ops_in_a_transaction_return_records_in_order(kv: KV) -> None:
    rev_a = await kv.put("a", b"1")
    await kv.put("b", b"2")
    result = await kv.txn([], [Get("b"), Get("missing"), Get("a")])
    assert result.succeeded
    b, missing, a = result.gets
    assert missing is None
    assert a is not None and (a.key, a.value, a.version, a.mod_revision) == ("a", b"1", 1, rev_a)
    assert b is not None and b.value == b"2"
    assert result.revision == b.mod_revision  # no write: the current revision


async def test_transaction_reads_its_own_writes_and_commits_at_one_revision(kv: KV) -> None:
    await kv.put("gone", b"x")
    result = await kv.txn(
        [Compare.absent("new")],
        [Put("new", b"1"), Put("other", b"2"), Delete("gone"), Get("new"), Get("gone")],
    )
    assert result.succeeded
    new, gone = result.gets
    assert new is not None and new.value == b"1" and new.mod_revision == result.revision
    assert gone is None
    assert (await kv.get("other")).mod_revision == result.revision  # type: ignore[union-attr]


async def test_count_ops_in_a_transaction_count_where_they_stand_in_the_branch(kv: KV) -> None:
    for key in ["s/1", "s/2", "s0", "t/1"]:
        await kv.put(key, b"x")
    result = await kv.txn(
        [Compare.absent("s/3")],
        [Count("s/"), Put("s/3", b"x"), Delete("s/1"), Put("s/4", b"x"), Count("s/"), Count("none/"), Get("s/3")],
    )
    assert result.succeeded and result.counts == [2, 3, 0]
    assert result.gets[0] is not None and result.gets[0].value == b"x"
    # The branch that runs is the one counted; a transaction of reads alone writes nothing.
    failed = await kv.txn([Compare.absent("s/3")], [Count("s/")], [Count("t/"), Count("s/")])
    assert not failed.succeeded and failed.counts == [1, 3]
    assert failed.revision == result.revision
    assert await kv.count("s/") == 3


async def test_delete_by_prefix_inside_a_transaction(kv: KV) -> None:
    for key in ["t/1", "t/2", "t0"]:
        await kv.put(key, b"x")
    assert (await kv.txn([Compare.present("t/1")], [Delete("t/", prefix=True)])).succeeded
    assert [k.key for k in await kv.range("t")] == ["t0"]


async def test_a_transaction_writing_one_key_twice_is_refused_and_changes_nothing(kv: KV) -> None:
    with pytest.raises(Exception, match="(?i)duplicate|only once"):
        await kv.txn([], [Put("d/k", b"1"), Put("d/k", b"2")])
    assert await kv.get("d/k") is None


async def test_concurrent_cas_increments_of_one_counter_lose_no_update(backend: Backend) -> None:
    clients = [await backend.open(), await backend.open()]
    tasks = 50
    conflicts = 0

    async def increment(client: KV) -> None:
        nonlocal conflicts
        while True:
            current = await client.get("counter")
            value = int(current.value) if current else 0
            guard = Compare.unchanged("counter", current.mod_revision if current else 0)
            if (await client.txn([guard], [Put("counter", str(value + 1).encode())])).succeeded:
                return
            conflicts += 1

    await asyncio.wait_for(asyncio.gather(*(increment(clients[i % 2]) for i in range(tasks))), 60)
    final = await clients[0].get("counter")
    assert final is not None
    assert int(final.value) == tasks
    assert final.version == tasks


# -- leases --------------------------------------------------------------------------------


async def test_keys_attached_to_a_lease_go_when_it_is_revoked(kv: KV) -> None:
    lease = await kv.grant_lease(30)
    await kv.put("leased/1", b"x", lease=lease)
    await kv.put("leased/2", b"x", lease=lease)
    await kv.put("kept", b"x")
    assert (await kv.get("leased/1")).lease == lease  # type: ignore[union-attr]
    await kv.revoke_lease(lease)
    assert await kv.range("leased/") == []
    assert await kv.get("kept") is not None
    assert await kv.refresh_lease(lease) is False


async def test_keys_attached_to_a_lease_expire_after_its_ttl_without_refresh(kv: KV) -> None:
    lease = await kv.grant_lease(TTL)
    await kv.put("ephemeral", b"x", lease=lease)
    await kv.put("durable", b"x")
    started = time.monotonic()

    async def gone() -> bool:
        return await kv.get("ephemeral") is None

    await wait_for(gone, timeout=TTL + 4)
    assert time.monotonic() - started >= TTL * 0.5
    assert await kv.get("durable") is not None
    assert await kv.refresh_lease(lease) is False


async def test_refreshing_a_lease_keeps_its_keys_alive(kv: KV) -> None:
    lease = await kv.grant_lease(TTL)
    await kv.put("ephemeral", b"x", lease=lease)
    until = time.monotonic() + 2.5 * TTL
    while time.monotonic() < until:
        assert await kv.refresh_lease(lease) is True
        assert await kv.get("ephemeral") is not None
        await asyncio.sleep(TTL / 4)

    async def gone() -> bool:
        return await kv.get("ephemeral") is None

    await wait_for(gone, timeout=TTL + 4)  # and once refreshes stop, it expires


async def test_kept_lease_keeps_a_key_alive_across_several_ttls_then_revokes_it(kv: KV) -> None:
    async with KeptLease(kv, TTL) as kept:
        await kv.put("member/me", b"alive", lease=kept.id)
        until = time.monotonic() + 2.5 * TTL
        while time.monotonic() < until:
            assert await kv.get("member/me") is not None
            assert not kept.lost.is_set()
            await asyncio.sleep(0.2)
    assert await kv.get("member/me") is None


async def test_put_with_an_unknown_lease_is_refused(kv: KV) -> None:
    lease = await kv.grant_lease(30)
    await kv.revoke_lease(lease)
    with pytest.raises(LeaseGone):
        await kv.put("k", b"x", lease=lease)
    with pytest.raises(LeaseGone):
        await kv.txn([], [Put("k", b"x", lease=lease)])
    assert await kv.get("k") is None


async def test_a_lease_id_is_never_given_again_after_its_lease_ended(kv: KV) -> None:
    """Else a late write naming an ended lease would attach to whoever took the number."""
    seen = set()
    for _ in range(3):
        lease = await kv.grant_lease(30)
        assert lease not in seen
        seen.add(lease)
        await kv.revoke_lease(lease)
    with pytest.raises(LeaseGone):
        await kv.put("k", b"x", lease=lease)


async def test_an_embedded_file_from_before_the_lease_counter_gives_ids_past_every_one_in_use(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    kv = EmbeddedKV(str(path))
    try:
        held = await kv.grant_lease(30)
        await kv.put("claim", b"x", lease=held)
        ended = await kv.grant_lease(30)
        await kv.revoke_lease(ended)
        with sqlite3.connect(path) as db:  # as a file written before the counter was kept
            db.execute("DELETE FROM meta WHERE name = 'lease'")
            db.execute("DELETE FROM leases")
        assert await kv.grant_lease(30) > held  # past the one a key still names
    finally:
        await kv.close()


async def test_a_node_lease_the_store_ended_unnoticed_is_replaced_at_the_next_write(kv: KV) -> None:
    """A starved process's lease can expire in the store before its refresh task notices; the write
    that names it is refused, and the node's lease is renewed and the write made once more."""
    node = NodeLease(kv, 600)  # refreshes every 200 s: none runs during the test
    try:
        first = await node.id()
        await kv.revoke_lease(first)  # what the store's expiry does
        tried: list[int] = []

        async def write(lease: int) -> int:
            tried.append(lease)
            await kv.put("claim", b"x", lease=lease)
            return lease

        second = await node.attached(write)
        assert tried == [first, second] and second != first
        assert (await kv.get("claim")).lease == second  # type: ignore[union-attr]
        assert node.holds(second) and not node.holds(first)
        assert await node.attached(write) == second  # a live lease is used as it is, once
        assert tried[2:] == [second]
    finally:
        await node.close()


# -- watch ---------------------------------------------------------------------------------


async def test_watch_sees_puts_and_deletes_under_its_prefix_in_order(kv: KV) -> None:
    await kv.put("w/existing", b"old")
    watch = await kv.watch("w/")
    events = aiter(watch)
    try:
        r1 = await kv.put("w/a", b"1")
        await kv.put("wx", b"outside")  # shares the first letter, not the prefix
        await kv.put("v/a", b"outside")
        await kv.put("w/a", b"2")
        await kv.delete("w/existing")
        await kv.txn([], [Put("w/b", b"3"), Put("w/c", b"4")])
        await kv.delete("w/", prefix=True)
        await kv.put("w/end", b"")
        got = await next_events(events, 9)
    finally:
        await watch.close()
    assert summary(got) == [
        ("put", "w/a", b"1"),
        ("put", "w/a", b"2"),
        ("delete", "w/existing", b""),
        ("put", "w/b", b"3"),
        ("put", "w/c", b"4"),
        ("delete", "w/a", b""),
        ("delete", "w/b", b""),
        ("delete", "w/c", b""),
        ("put", "w/end", b""),
    ]
    assert got[0].mod_revision == r1
    revs = [e.mod_revision for e in got]
    assert revs == sorted(revs)
    assert got[3].mod_revision == got[4].mod_revision  # one transaction, one revision


async def test_watch_without_start_revision_sees_only_later_events(kv: KV) -> None:
    await kv.put("w/before", b"x")
    watch = await kv.watch("w/")
    try:
        await kv.put("w/after", b"y")
        (event,) = await next_events(aiter(watch), 1)
    finally:
        await watch.close()
    assert (event.type, event.key) == ("put", "w/after")


async def test_watch_from_a_start_revision_replays_history_then_follows(kv: KV) -> None:
    await kv.put("h/0", b"before")
    first = await kv.put("h/1", b"a")
    await kv.put("h/2", b"b")
    await kv.delete("h/1")
    watch = await kv.watch("h/", start_revision=first)
    events = aiter(watch)
    try:
        replayed = await next_events(events, 3)
        await kv.put("h/3", b"c")
        (live,) = await next_events(events, 1)
    finally:
        await watch.close()
    assert summary(replayed) == [("put", "h/1", b"a"), ("put", "h/2", b"b"), ("delete", "h/1", b"")]
    assert replayed[0].mod_revision == first
    assert (live.key, live.value) == ("h/3", b"c")


async def test_watch_reports_lease_expiry_as_deletes(kv: KV) -> None:
    lease = await kv.grant_lease(30)
    await kv.put("svc/node1", b"x", lease=lease)
    watch = await kv.watch("svc/")
    try:
        await kv.revoke_lease(lease)
        (event,) = await next_events(aiter(watch), 1)
    finally:
        await watch.close()
    assert (event.type, event.key, event.value) == ("delete", "svc/node1", b"")


async def test_closing_a_watch_ends_its_iteration(kv: KV) -> None:
    watch = await kv.watch("c/")
    received: list[WatchEvent] = []

    async def consume() -> None:
        async for event in watch:
            received.append(event)

    consumer = asyncio.create_task(consume())
    await kv.put("c/1", b"x")

    async def got_one() -> bool:
        return bool(received)

    await wait_for(got_one)
    await watch.close()
    await asyncio.wait_for(consumer, EVENT_TIMEOUT)
    assert [e.key for e in received] == ["c/1"]


async def test_two_watches_on_nested_prefixes_each_get_their_own_events(kv: KV) -> None:
    outer, inner = await kv.watch("n/"), await kv.watch("n/in/")
    try:
        await kv.put("n/x", b"1")
        await kv.put("n/in/y", b"2")
        outer_events = await next_events(aiter(outer), 2)
        (inner_event,) = await next_events(aiter(inner), 1)
    finally:
        await outer.close()
        await inner.close()
    assert [e.key for e in outer_events] == ["n/x", "n/in/y"]
    assert inner_event.key == "n/in/y"


# -- durability ----------------------------------------------------------------------------


async def test_data_and_revisions_survive_closing_and_reopening_the_store(backend: Backend) -> None:
    first = await backend.open()
    await first.put("durable/a", b"1")
    rev = await first.put("durable/b", b"2")
    await first.close()
    backend.clients.remove(first)
    second = await backend.open()
    assert [(k.key, k.value) for k in await second.range("durable/")] == [("durable/a", b"1"), ("durable/b", b"2")]
    assert await second.put("durable/c", b"3") == rev + 1
    await second.ping()


# -- snapshots -------------------------------------------------------------------------------


async def test_snapshot_reads_the_store_as_of_its_revision_while_writes_go_on(backend: Backend) -> None:
    kv, writer = await backend.open(), await backend.open()
    for i in range(20):
        await kv.put(f"s/{i:02d}", b"old")
    last = await kv.put("s/last", b"old")
    async with kv.snapshot() as snap:
        assert snap.revision == last
        assert snap.backend == backend.name
        await writer.put("s/00", b"new")
        await writer.delete("s/01")
        await writer.put("s/new", b"new")
        await writer.txn([], [Put("s/02", b"new"), Delete("s/03")])
        seen = await snap.range("s/")
        assert [(k.key, k.value) for k in seen] == [(f"s/{i:02d}", b"old") for i in range(20)] + [("s/last", b"old")]
        assert all(k.mod_revision <= last for k in seen)
        assert await snap.count("s/") == 21
    async with kv.snapshot() as later:
        assert later.revision > last
        assert (await later.range("s/00"))[0].value == b"new"
        assert await later.count("s/") == 20


async def test_snapshot_pages_in_byte_order_with_start_key_and_limit(kv: KV) -> None:
    for key in reversed(NESTED):
        await kv.put(key, key.encode())
    async with kv.snapshot() as snap:
        for prefix in ["", "a/", "\u043f"]:
            seen: list[str] = []
            start: str | None = None
            while True:
                page = await snap.range(prefix, start=start, limit=3)
                assert len(page) <= 3
                if not page:
                    break
                seen.extend(k.key for k in page)
                start = page[-1].key + "\0"
            assert seen == byte_order([k for k in NESTED if k.startswith(prefix)]), prefix
            assert await snap.count(prefix) == len(seen)
        assert await snap.range("p/", start="q/") == []


async def test_a_transaction_is_never_seen_half_done_by_a_snapshot(backend: Backend) -> None:
    kv, writer = await backend.open(), await backend.open()
    await kv.txn([], [Put("pair/a", b"0"), Put("pair/b", b"0")])
    stop = asyncio.Event()

    async def write_pairs() -> int:
        n = 0
        while not stop.is_set() and n < 2000:
            n += 1
            value = str(n).encode()
            await writer.txn([], [Put("pair/a", value), Put("pair/b", value)])
        return n

    task = asyncio.create_task(write_pairs())
    try:
        for _ in range(5):
            async with kv.snapshot() as snap:
                (a,) = await snap.range("pair/", limit=1)
                await asyncio.sleep(0.02)  # the writer moves on between the two pages
                (b,) = await snap.range("pair/", start="pair/a\0", limit=1)
                assert (a.key, b.key) == ("pair/a", "pair/b")
                assert a.value == b.value
                assert a.mod_revision == b.mod_revision <= snap.revision
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 60) > 0


async def test_writes_are_not_held_up_while_a_snapshot_is_open(backend: Backend) -> None:
    kv, writer = await backend.open(), await backend.open()
    for i in range(50):
        await kv.put(f"busy/{i:02d}", b"x")
    async with kv.snapshot() as snap:
        first = await snap.range("busy/", limit=10)
        started = time.monotonic()
        # The embedded writer would wait out SQLite's 30 s lock timeout if the snapshot held a lock.
        await asyncio.wait_for(asyncio.gather(*(writer.put(f"busy/new{i}", b"y") for i in range(100))), 10)
        assert (await writer.txn([Compare.present("busy/00")], [Put("busy/00", b"z")])).succeeded
        await kv.put("busy/mine", b"from the snapshot's own client")
        assert time.monotonic() - started < 10
        rest = await snap.range("busy/", start=first[-1].key + "\0")
        assert len(first) + len(rest) == 50


async def test_snapshot_shows_which_keys_belong_to_a_lease(kv: KV) -> None:
    lease = await kv.grant_lease(30)
    await kv.put("l/leased", b"x", lease=lease)
    await kv.put("l/durable", b"x")
    async with kv.snapshot() as snap:
        assert {k.key: k.lease for k in await snap.range("l/")} == {"l/durable": 0, "l/leased": lease}
    await kv.revoke_lease(lease)


async def test_snapshot_of_an_empty_store_holds_no_keys(kv: KV) -> None:
    async with kv.snapshot() as snap:
        assert await snap.range("") == []
        assert await snap.count("") == 0
        assert snap.revision >= 0


async def test_a_snapshot_cannot_be_read_once_its_context_ends(kv: KV) -> None:
    await kv.put("k", b"v")
    async with kv.snapshot() as snap:
        assert len(await snap.range("")) == 1
    with pytest.raises(RuntimeError):
        await snap.range("")


# -- space: size against quota, compaction, defragmentation ------------------------------------


async def test_space_reports_size_in_use_quota_and_revision_of_every_member(backend: Backend) -> None:
    kv = await backend.open()
    revision = await kv.put("k", b"v" * 1000)
    space = await kv.space()
    assert space.backend == backend.name
    assert space.members and all(not m.error for m in space.members)
    for member in space.members:
        assert 0 < member.in_use <= member.size < member.quota
        assert member.revision >= revision
        assert member.alarms == ()
    assert sum(m.leader for m in space.members) == 1
    assert space.fullest is not None and 0 < space.fullest.used < 1
    assert space.revision >= revision and space.alarms == ()


async def test_compaction_and_defragmentation_keep_the_current_state(backend: Backend) -> None:
    kv = await backend.open()
    for n in range(50):
        await kv.put(f"k{n % 5}", str(n).encode() * 100)
    latest = await kv.put("last", b"1")
    await kv.compact(latest)
    await kv.compact(latest)  # again: nothing to do, no error
    for member in (await kv.space()).members:
        await kv.defragment(member.name)
    assert sorted(k.key for k in await kv.range("")) == ["k0", "k1", "k2", "k3", "k4", "last"]
    assert (await kv.get("k4")).value == b"49" * 100  # type: ignore[union-attr]
    assert await kv.disarm() == ()  # no alarm raised
    assert await kv.put("after", b"1") > latest


# -- embedded backend: read-only opens -------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in [root, *root.rglob("*")]}


async def test_embedded_read_only_open_creates_nothing_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "data" / "coordinator.db"
    with pytest.raises(FileNotFoundError):
        EmbeddedKV(str(path), readonly=True)
    assert not (tmp_path / "data").exists()
    writer = EmbeddedKV(str(path))
    await writer.put("k", b"v")
    await writer.close()
    before = _tree(tmp_path)
    reader = EmbeddedKV(str(path), readonly=True)
    try:
        assert (await reader.get("k")).value == b"v"  # type: ignore[union-attr]
        async with reader.snapshot() as snap:
            assert [k.key for k in await snap.range("")] == ["k"]
        with pytest.raises(PermissionError):
            await reader.put("k", b"w")
    finally:
        await reader.close()
    assert _tree(tmp_path) == before


async def test_embedded_read_only_open_sees_a_live_writer(tmp_path: Path) -> None:
    path = str(tmp_path / "coordinator.db")
    writer = EmbeddedKV(path)
    try:
        await writer.put("k", b"1")
        reader = EmbeddedKV(path, readonly=True)
        try:
            async with reader.snapshot() as snap:
                await writer.put("k", b"2")
                assert (await snap.range("k"))[0].value == b"1"
            assert (await reader.get("k")).value == b"2"  # type: ignore[union-attr]
        finally:
            await reader.close()
    finally:
        await writer.close()


async def test_embedded_write_ahead_log_starts_again_under_writes_that_never_pause(tmp_path: Path) -> None:
    """Writers that keep committing never let a passive checkpoint catch up; the log must not grow forever.

    10,000 small commits write about 40,000 log pages (160 MiB) if the log never starts again from
    its beginning. Each checkpoint finds the write lock free (this process's writes queue behind
    it), so the log starts again every 200 commits (about 3.4 MiB) however busy the machine; when
    writers could keep the lock from it, four busy loops beside this test let it reach 30 MiB.
    """
    path = tmp_path / "coordinator.db"
    wal = tmp_path / "coordinator.db-wal"
    kv = EmbeddedKV(str(path))
    try:
        largest = 0
        for n in range(10_000):
            await kv.put(f"tag/team/app@t{n:05d}", b"x" * 120)
            if n % 100 == 99:
                largest = max(largest, wal.stat().st_size)
        assert largest <= 16 << 20
        assert await kv.count("tag/team/app@") == 10_000
    finally:
        await kv.close()


# -- embedded backend: writes on the caller's thread -----------------------------------------


async def test_embedded_write_waits_on_its_thread_while_another_connection_holds_the_lock(tmp_path: Path) -> None:
    path = str(tmp_path / "coordinator.db")
    kv = EmbeddedKV(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await kv.put("k", b"1")
        other.execute("BEGIN IMMEDIATE")  # another worker process writing, say
        put = asyncio.create_task(kv.put("k", b"2"))
        ticks = 0
        for _ in range(5):
            await asyncio.sleep(0.01)  # the event loop goes on while the write waits
            ticks += 1
        assert ticks == 5 and not put.done()
        other.execute("ROLLBACK")
        revision = await asyncio.wait_for(put, 30)
        found = await kv.get("k")
        assert found is not None and found.value == b"2" and found.mod_revision == revision
    finally:
        other.close()
        await kv.close()


async def test_embedded_writes_made_here_reach_the_database_file(tmp_path: Path, monkeypatch: Any) -> None:
    """The log is checkpointed into the file as writes go, though their own connection never does."""
    monkeypatch.setattr(embedded, "_CHECKPOINT_EVERY", 20)
    path = tmp_path / "coordinator.db"
    kv = EmbeddedKV(str(path))
    try:
        await kv.put("first", b"x")
        before = path.stat().st_size
        for n in range(60):
            await kv.put(f"key/{n:03d}", bytes(2000))
        deadline = time.monotonic() + 30
        while path.stat().st_size <= before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert path.stat().st_size > before
        assert len(await kv.range("key/")) == 60
    finally:
        await kv.close()
    assert not (tmp_path / "coordinator.db-wal").exists()


async def test_embedded_counts_exactly_past_what_it_counts_on_the_callers_thread(
    tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(embedded, "_COUNT_HERE", 5)
    kv = EmbeddedKV(str(tmp_path / "coordinator.db"))
    try:
        await kv.txn([], [Put(f"many/{n}", b"") for n in range(8)] + [Put(f"few/{n}", b"") for n in range(3)])
        assert (await kv.count("many/"), await kv.count("few/"), await kv.count("none/")) == (8, 3, 0)
    finally:
        await kv.close()


# -- etcd backend: endpoints and failover ----------------------------------------------------


async def test_etcd_keys_live_under_the_configured_prefix_only(etcd: EtcdCluster) -> None:
    prefix = f"/wharf-test/{uuid.uuid4().hex}/"
    a = await EtcdKV.open(etcd.endpoints, prefix=prefix + "a/")
    b = await EtcdKV.open(etcd.endpoints, prefix=prefix + "b/")
    root = await EtcdKV.open(etcd.endpoints, prefix=prefix, layout="text")  # every stored key, as stored
    try:
        await a.put("k", b"from a")
        assert await b.get("k") is None
        assert await b.range("") == []
        assert [k.key for k in await root.range("")] == ["a/\x02k"]
    finally:
        await root.delete("", prefix=True)
        for client in (a, b, root):
            await client.close()


DIGEST = "sha256:" + "0123456789abcdef" * 4


async def test_etcd_store_created_now_stores_each_digest_of_a_key_in_33_bytes(etcd: EtcdCluster) -> None:
    prefix = f"/wharf-test/{uuid.uuid4().hex}/"
    kv = await EtcdKV.open(etcd.endpoints, prefix=prefix)
    raw = await EtcdKV.open(etcd.endpoints, prefix=prefix, layout="text")
    try:
        assert kv.layout == "compact"
        key = f"link/team/app@{DIGEST}"
        await kv.put(key, b"v")
        [stored] = await raw.range("")
        assert stored.key.encode("utf-8", "surrogateescape") == b"\x02link/team/app@\x01" + bytes.fromhex(DIGEST[7:])
        assert [k.key for k in await kv.range("link/team/app@")] == [key]
        assert [k.key for k in await kv.range(f"link/team/app@{DIGEST}")] == [key]
        # A client opened later finds the layout in the store.
        again = await EtcdKV.open(etcd.endpoints, prefix=prefix)
        try:
            assert again.layout == "compact" and (await again.get(key)) is not None
        finally:
            await again.close()
    finally:
        await raw.delete("", prefix=True)
        await raw.close()
        await kv.close()


@pytest.mark.parametrize("identity", [True, False], ids=["with identity", "without identity"])
async def test_etcd_store_with_the_text_keys_of_earlier_versions_keeps_them(etcd: EtcdCluster, identity: bool) -> None:
    prefix = f"/wharf-test/{uuid.uuid4().hex}/"
    earlier = await EtcdKV.open(etcd.endpoints, prefix=prefix, layout="text")  # the keys every earlier version wrote
    try:
        written = [f"blob/{DIGEST}", f"link/team/app@{DIGEST}", "tag/team/app@v1"]
        await earlier.txn([], [Put(k, b"v") for k in written + (["store/identity"] if identity else [])])
        kv = await EtcdKV.open(etcd.endpoints, prefix=prefix)
        try:
            assert kv.layout == "text"
            assert (await kv.get(f"blob/{DIGEST}")) is not None
            await kv.put(f"manifest/team/app@{DIGEST}", b"m")
            assert [k.key for k in await kv.range("link/")] == [f"link/team/app@{DIGEST}"]
        finally:
            await kv.close()
        assert (await earlier.get(f"manifest/team/app@{DIGEST}")) is not None
        assert all(not k.key.startswith("\x02") for k in await earlier.range(""))
    finally:
        await earlier.delete("", prefix=True)
        await earlier.close()


async def test_etcd_fails_over_to_the_next_endpoint_and_resumes_watches() -> None:
    """Two members die in turn under a client: its requests and its watch go on at the next endpoint.

    Only followers are stopped, so no election runs (pre-vote and a 5 s election timeout keep a member
    the busy machine holds up from starting one): a write in flight during an election may have
    been applied, and the backend rightly refuses to send it twice, so such a write would fail this
    test by chance. Likewise the first write after a crash waits until the client has seen its
    connection close: a write sent into a connection that is dying may have reached the server too.
    """
    with EtcdCluster(3, election_ms=5000, extra_args=("--pre-vote",)) as cluster:
        leader = cluster.leader()
        first, second = (i for i in range(3) if i != leader)
        kv = await EtcdKV.open([cluster.endpoint(i) for i in (first, second, leader)], prefix="/failover/", timeout=5)
        try:
            await kv.put("before", b"1")
            watch = await kv.watch("")
            events = aiter(watch)
            assert kv.endpoint == cluster.endpoint(first)

            cluster.stop_member(first, kill=True)
            await wait_for(lambda: _connection_lost(kv))
            # The dead endpoint refuses connections, so even a write is safely sent to the next one.
            rev = await kv.put("after", b"2")
            assert kv.endpoint == cluster.endpoint(second)
            assert (await kv.get("after")).version == 1  # type: ignore[union-attr]  # sent once
            assert (await kv.txn([Compare.absent("cas")], [Put("cas", b"3")])).succeeded
            got = await next_events(events, 2)
            assert [(e.key, e.mod_revision) for e in got] == [("after", rev), ("cas", rev + 1)]

            cluster.start_member(first)
            cluster.stop_member(second, kill=True)
            # A read goes to the next endpoint whatever the error: no need to wait for the close.
            assert (await kv.get("before")).value == b"1"  # type: ignore[union-attr]
            assert kv.endpoint == cluster.endpoint(leader)
            await kv.put("again", b"4")
            (event,) = await next_events(events, 1)
            assert event.key == "again"
            await watch.close()
            assert cluster.leader() == leader, "an election ran: the test's writes could have met it"
        finally:
            await kv.close()


async def _connection_lost(kv: EtcdKV) -> bool:
    """The client's channel has seen its connection to the current endpoint close."""
    assert kv._conn is not None
    return kv._conn.channel.get_state(try_to_connect=False) != grpc.ChannelConnectivity.READY


async def test_etcd_watch_resumes_when_its_channel_is_retired(etcd: EtcdCluster) -> None:
    kv = await EtcdKV.open(etcd.endpoints, prefix=f"/wharf-test/{uuid.uuid4().hex}/")
    try:
        watch = await kv.watch("")
        events = aiter(watch)
        await kv.put("one", b"1")
        assert [e.key for e in await next_events(events, 1)] == ["one"]
        old = kv._conn
        assert old is not None
        kv._failover(old)  # what a failed request does; then the old channel closes under the watch
        await old.close()
        await kv.put("two", b"2")
        assert [e.key for e in await next_events(events, 1)] == ["two"]
        await watch.close()
        await kv.delete("", prefix=True)
    finally:
        await kv.close()


async def test_etcd_watch_from_a_compacted_revision_fails_loudly(etcd: EtcdCluster) -> None:
    kv = await EtcdKV.open(etcd.endpoints, prefix=f"/wharf-test/{uuid.uuid4().hex}/")
    try:
        first = await kv.put("k", b"1")
        latest = await kv.put("k", b"2")
        compact = rpc.CompactionRequest(revision=latest, physical=True)
        await kv._rpc(lambda c: c.kv.Compact(compact, timeout=5, metadata=c.metadata), idempotent=True)
        watch = await kv.watch("", start_revision=first)
        with pytest.raises(RevisionCompacted) as info:
            await next_events(aiter(watch), 1)
        assert info.value.compact_revision == latest
        await watch.close()
        await kv.delete("", prefix=True)
    finally:
        await kv.close()


async def test_etcd_snapshot_of_a_compacted_revision_is_reported_lost(etcd: EtcdCluster) -> None:
    kv = await EtcdKV.open(etcd.endpoints, prefix=f"/wharf-test/{uuid.uuid4().hex}/")
    try:
        await kv.put("k", b"1")
        async with kv.snapshot() as snap:
            assert len(await snap.range("")) == 1
            latest = await kv.put("k", b"2")
            compact = rpc.CompactionRequest(revision=latest, physical=True)
            await kv._rpc(lambda c: c.kv.Compact(compact, timeout=5, metadata=c.metadata), idempotent=True)
            with pytest.raises(SnapshotLost):
                await snap.range("")
        await kv.delete("", prefix=True)
    finally:
        await kv.close()


async def test_etcd_reconnects_to_a_restarted_single_endpoint() -> None:
    with EtcdCluster(1, heartbeat_ms=50, election_ms=500) as cluster:
        kv = await EtcdKV.open(cluster.endpoints, prefix="/restart/", timeout=3)
        try:
            await kv.put("k", b"1")
            cluster.stop_member(0)
            with pytest.raises(ConnectionError):
                await kv.get("k")
            cluster.start_member(0)
            assert (await kv.get("k")).value == b"1"  # type: ignore[union-attr]
        finally:
            await kv.close()


async def test_etcd_open_fails_clearly_when_no_endpoint_answers() -> None:
    with pytest.raises(ConnectionError):
        await EtcdKV.open(["http://127.0.0.1:1", "http://127.0.0.1:2"], timeout=1)
