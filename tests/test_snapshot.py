"""Coordinator snapshots (coordinator/snapshot.py): dump and restore on both backends, real etcd included."""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import json
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from services import EtcdCluster

from coordinator import keys, snapshot
from coordinator.embedded import EmbeddedKV
from coordinator.etcd import EtcdKV
from coordinator.kv import KV, MAX_TXN_OPS, Compare, Op, Put, TxnResult

Opener = Callable[[str], Awaitable[KV]]


@pytest.fixture
async def open_kv(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """`await open_kv("embedded" | "etcd")`: a fresh, empty coordinator; all closed and removed at the end."""
    opened: list[tuple[KV, str]] = []

    async def opener(backend: str) -> KV:
        if backend == "embedded":
            kv: KV = EmbeddedKV(str(tmp_path / f"{uuid.uuid4().hex}.db"))
        else:
            cluster: EtcdCluster = request.getfixturevalue("etcd")
            kv = await EtcdKV.open(cluster.endpoints, prefix=f"/wharf-test/{uuid.uuid4().hex}/")
        opened.append((kv, backend))
        return kv

    yield opener
    for kv, backend in reversed(opened):
        if backend == "etcd":
            await kv.delete("", prefix=True)
        await kv.close()


class Captured:
    """A snapshot dumped into memory, readable as a `snapshot.Source`."""

    def __init__(self) -> None:
        self.data = b""

    async def sink(self, chunk: bytes) -> None:
        self.data += chunk

    def source(self) -> AsyncIterator[bytes]:
        return _chunks(self.data)


async def _chunks(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def source_of(data: bytes) -> snapshot.Source:
    return lambda: _chunks(data)


async def everything(kv: KV) -> dict[str, bytes]:
    return {item.key: item.value for item in await kv.range("")}


async def dumped(kv: KV) -> Captured:
    captured = Captured()
    await snapshot.dump(kv, captured.sink)
    return captured


SAMPLE = {
    "repo/library/alpine": b"{}",
    "tag/library/alpine@3.20": json.dumps({"digest": "sha256:" + "a" * 64, "pushed": 1.5}).encode(),
    "blob/sha256:" + "b" * 64: json.dumps({"size": 123, "key": "docker/registry/v2/blobs/..."}).encode(),
    "binary": bytes(range(256)),
    "empty": b"",
    "unicodé/ключ/鍵": b"ok",
    "big": b"\x00\xff" * 100_000,
}


async def fill(kv: KV, count: int = 1200) -> dict[str, bytes]:
    """SAMPLE plus `count` numbered keys: several pages and several restore transactions."""
    wanted = dict(SAMPLE)
    wanted.update({f"manifest/team/app@sha256:{i:064x}": f"record {i}".encode() * 3 for i in range(count)})
    items = list(wanted.items())
    for i in range(0, len(items), 100):
        await kv.txn([], [Put(k, v) for k, v in items[i : i + 100]])
    return wanted


@pytest.mark.parametrize(
    "source_backend,target_backend",
    [("embedded", "embedded"), ("etcd", "etcd"), ("embedded", "etcd"), ("etcd", "embedded")],
)
async def test_dump_then_restore_into_an_empty_coordinator_gives_every_key_back(
    open_kv: Opener, source_backend: str, target_backend: str
) -> None:
    source, target = await open_kv(source_backend), await open_kv(target_backend)
    wanted = await fill(source)
    captured = await dumped(source)
    result = await snapshot.restore(target, captured.source)
    assert await everything(target) == wanted
    assert (result.written, result.deleted, result.unchanged) == (len(wanted), 0, 0)
    assert result.header.backend == source_backend
    assert result.transactions >= len(wanted) / MAX_TXN_OPS
    assert await target.get(keys.RESTORING) is None


async def test_a_snapshot_leaves_out_leased_and_ephemeral_keys(open_kv: Opener) -> None:
    kv = await open_kv("etcd")
    lease = await kv.grant_lease(30)
    await kv.put(keys.leader("maintenance"), b"node-1", lease=lease)
    await kv.put("member/node-1", b"alive", lease=lease)
    await kv.put(keys.deleting("sha256:" + "c" * 64), b"{}")
    await kv.put(keys.RESTORING, b"{}")
    await kv.put("repo/kept", b"{}")
    captured = await dumped(kv)
    header, trailer = await snapshot.verify(captured.source)
    assert header.keys_at_revision == 5
    assert (trailer.keys, trailer.left_out) == (1, 4)
    target = await open_kv("embedded")
    await snapshot.restore(target, captured.source)
    assert await everything(target) == {"repo/kept": b"{}"}
    await kv.revoke_lease(lease)


async def test_the_file_reads_without_wharf_as_gzip_json_lines(open_kv: Opener) -> None:
    kv = await open_kv("embedded")
    wanted = await fill(kv, count=10)
    last = await kv.put("repo/last", b"x")
    wanted["repo/last"] = b"x"
    captured = await dumped(kv)
    lines = gzip.decompress(captured.data).split(b"\n")
    assert lines[-1] == b""  # every line ends with a newline
    header, *records, trailer = [json.loads(line) for line in lines[:-1]]
    assert header["format"] == "wharf-coordinator-snapshot" and header["version"] == 1
    assert header["revision"] == last and header["backend"] == "embedded"
    assert header["created"].endswith("Z") and header["keys_at_revision"] == len(wanted)
    assert {r["k"]: base64.b64decode(r["v"]) for r in records} == wanted
    assert [r["k"] for r in records] == sorted(wanted, key=lambda k: k.encode())
    assert trailer == {
        "end": True,
        "keys": len(wanted),
        "left_out": 0,
        "sha256": hashlib.sha256(b"".join(line + b"\n" for line in lines[:-2])).hexdigest(),
    }


def _regzip(lines: list[bytes]) -> bytes:
    return gzip.compress(b"".join(line + b"\n" for line in lines), mtime=0)


async def test_a_damaged_snapshot_is_refused_whole_and_nothing_is_written(open_kv: Opener) -> None:
    kv = await open_kv("embedded")
    await fill(kv, count=300)
    data = (await dumped(kv)).data
    lines = gzip.decompress(data).split(b"\n")[:-1]
    changed = json.loads(lines[5])
    changed["v"] = base64.b64encode(b"tampered").decode()
    damaged = {
        "cut in half": data[: len(data) // 2],
        "last byte missing": data[:-1],
        "gzip trailer missing": data[:-8],
        "no trailer line": _regzip(lines[:-1]),
        "a value changed": _regzip([*lines[:5], json.dumps(changed).encode(), *lines[6:]]),
        "a key line dropped": _regzip([*lines[:5], *lines[6:]]),
        "two keys swapped": _regzip([lines[0], lines[2], lines[1], *lines[3:]]),
        "not gzip": b"{}\n",
        "empty": b"",
        "garbage after the end": data + b"garbage",
        "another format": _regzip([b'{"format": "something-else"}']),
    }
    target = await open_kv("etcd")
    for what, broken in damaged.items():
        with pytest.raises(snapshot.SnapshotError):
            await snapshot.restore(target, source_of(broken))
        assert await target.range("") == [], what
    await snapshot.restore(target, source_of(data))  # and the intact one restores


async def test_restore_refuses_a_coordinator_that_holds_durable_keys(open_kv: Opener) -> None:
    source, target = await open_kv("embedded"), await open_kv("etcd")
    await fill(source, count=5)
    captured = await dumped(source)
    await target.put("tag/other@latest", b"theirs")
    with pytest.raises(snapshot.CoordinatorNotEmpty, match="tag/other@latest"):
        await snapshot.restore(target, captured.source)
    with pytest.raises(snapshot.CoordinatorNotEmpty):
        await snapshot.restore(target, captured.source, dry_run=True)
    assert await everything(target) == {"tag/other@latest": b"theirs"}
    # A running node's leader key is no durable state: a restore goes ahead, and leaves it be.
    await target.delete("tag/other@latest")
    lease = await target.grant_lease(30)
    await target.put(keys.leader("maintenance"), b"node", lease=lease)
    await snapshot.restore(target, captured.source)
    assert (await target.get(keys.leader("maintenance"))).value == b"node"  # type: ignore[union-attr]
    await target.revoke_lease(lease)


async def test_a_forced_restore_makes_the_coordinator_hold_exactly_the_snapshot_and_twice_the_same(
    open_kv: Opener,
) -> None:
    source, target = await open_kv("etcd"), await open_kv("etcd")
    wanted = await fill(source, count=600)
    captured = await dumped(source)
    await fill(target, count=900)  # overlaps: 600 equal, 300 extra
    await target.put("tag/library/alpine@3.20", b"moved since")
    await target.put("zzz/after-everything", b"extra")
    await target.put("aaa/before-everything", b"extra")
    lease = await target.grant_lease(30)
    await target.put(keys.leader("maintenance"), b"node", lease=lease)
    first = await snapshot.restore(target, captured.source, force=True)
    state = await everything(target)
    assert state == {**wanted, keys.leader("maintenance"): b"node"}
    assert (first.written, first.deleted) == (1, 302)
    second = await snapshot.restore(target, captured.source, force=True)
    assert (second.written, second.deleted, second.unchanged) == (0, 0, len(wanted))
    assert await everything(target) == state
    await target.revoke_lease(lease)


async def test_restore_writes_in_transactions_within_etcd_limits(open_kv: Opener) -> None:
    source = await open_kv("embedded")
    big = {f"manifest/big@sha256:{i:064x}": bytes([i]) * 300_000 for i in range(12)}
    for key, value in big.items():
        await source.put(key, value)
    for i in range(0, 1000, 100):
        await source.txn([], [Put(f"link/r@sha256:{j:064x}", b"{}") for j in range(i, i + 100)])
    captured = await dumped(source)
    target = await open_kv("etcd")  # etcd itself refuses more than 128 operations or 1.5 MiB
    counting = CountingKV(target)
    result = await snapshot.restore(counting, captured.source)
    assert await target.count("") == 1012
    assert max(counting.ops) <= MAX_TXN_OPS
    assert result.transactions == len(counting.ops) >= 1000 / MAX_TXN_OPS + 3


class CountingKV:
    """Passes everything through; counts the operations of each transaction; can fail after `fail_after`."""

    def __init__(self, inner: KV, fail_after: int | None = None) -> None:
        self.inner = inner
        self.ops: list[int] = []
        self.fail_after = fail_after

    async def txn(self, compares: list[Compare], success: list[Op], failure: list[Op] = ()) -> TxnResult:  # type: ignore[assignment]
        if self.fail_after is not None and len(self.ops) >= self.fail_after:
            raise ConnectionError("the coordinator went away")
        self.ops.append(len(success))
        return await self.inner.txn(compares, success, failure)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_an_interrupted_restore_is_finished_by_restoring_the_same_snapshot_again(open_kv: Opener) -> None:
    source, other_source, target = await open_kv("embedded"), await open_kv("embedded"), await open_kv("etcd")
    wanted = await fill(source, count=1000)
    captured = await dumped(source)
    await other_source.put("repo/other", b"{}")
    other = await dumped(other_source)
    with pytest.raises(ConnectionError):
        await snapshot.restore(CountingKV(target, fail_after=3), captured.source)  # type: ignore[arg-type]
    assert await target.get(keys.RESTORING) is not None
    with pytest.raises(snapshot.CoordinatorNotEmpty, match="interrupted"):
        await snapshot.restore(target, other.source)
    result = await snapshot.restore(target, captured.source)
    assert result.resumed
    assert await everything(target) == wanted
    assert result.unchanged >= 3 * MAX_TXN_OPS


async def test_a_dry_run_restore_counts_what_it_would_do_and_writes_nothing(open_kv: Opener) -> None:
    source, target = await open_kv("embedded"), await open_kv("embedded")
    wanted = await fill(source, count=50)
    captured = await dumped(source)
    result = await snapshot.restore(target, captured.source, dry_run=True)
    assert (result.dry_run, result.written, result.deleted) == (True, len(wanted), 0)
    assert await target.range("") == []
    await target.put("repo/extra", b"{}")
    await target.put("repo/library/alpine", b"changed")
    forced = await snapshot.restore(target, captured.source, force=True, dry_run=True)
    assert (forced.written, forced.deleted, forced.unchanged) == (len(wanted), 1, 0)
    assert await everything(target) == {"repo/extra": b"{}", "repo/library/alpine": b"changed"}


@pytest.mark.parametrize("backend", ["embedded", "etcd"])
async def test_a_dump_while_transactions_go_on_is_one_consistent_state(open_kv: Opener, backend: str) -> None:
    kv = await open_kv(backend)
    await fill(kv, count=2000)
    await kv.txn([], [Put("pair/a", b"0"), Put("pair/b", b"0"), Put("zpair/c", b"0")])
    writer = kv
    if backend == "embedded":
        assert isinstance(kv, EmbeddedKV)
        writer = EmbeddedKV(kv.path)  # another connection, as another process would be
    stop = asyncio.Event()
    written = 0

    async def write() -> None:
        nonlocal written
        while not stop.is_set() and written < 5000:
            value = str(written + 1).encode()
            await writer.txn([], [Put("pair/a", value), Put("pair/b", value), Put("zpair/c", value)])
            written += 1

    task = asyncio.create_task(write())
    try:
        await asyncio.sleep(0.05)
        before = written
        captured = Captured()
        await snapshot.dump(kv, captured.sink, page=100)
        during = written - before
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        if writer is not kv:
            await writer.close()
    assert during > 0  # the writer went on while the dump read its pages
    target = await open_kv("embedded")
    await snapshot.restore(target, captured.source)
    pair = {k: (await target.get(k)).value for k in ("pair/a", "pair/b", "zpair/c")}  # type: ignore[union-attr]
    assert len(set(pair.values())) == 1, pair


async def test_a_dump_holds_about_a_page_in_memory_not_the_store(tmp_path: Path) -> None:
    kv = EmbeddedKV(str(tmp_path / "big.db"))
    try:
        for i in range(0, 20_000, 500):
            await kv.txn([], [Put(f"manifest/r@sha256:{j:064x}", bytes(2000)) for j in range(i, i + 128)])
            await kv.txn([], [Put(f"manifest/s@sha256:{j:064x}", bytes(2000)) for j in range(i, i + 128)])
        stored = await kv.count("")
        size = 0

        async def count(chunk: bytes) -> None:
            nonlocal size
            size += len(chunk)

        tracemalloc.start()
        try:
            info = await snapshot.dump(kv, count)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert info.keys == stored > 10_000
        assert stored * 2000 > 16 * 1024 * 1024
        assert peak < 8 * 1024 * 1024, f"a dump of {stored} keys peaked at {peak} bytes"
    finally:
        await kv.close()


async def test_read_header_reads_only_the_first_line(open_kv: Opener) -> None:
    kv = await open_kv("embedded")
    await fill(kv, count=10)
    captured = await dumped(kv)
    header = await snapshot.read_header(source_of(captured.data[: len(captured.data) // 2]))
    assert header.backend == "embedded" and header.keys_at_revision == len(SAMPLE) + 10
    buffer = io.BytesIO(captured.data)
    with gzip.open(buffer) as f:
        assert json.loads(f.readline())["revision"] == header.revision
