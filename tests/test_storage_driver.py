"""The storage driver contract: every driver passes the same cases."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import time
import urllib.request
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from node.storage import layout
from node.storage.driver import StorageDriver, UploadInterrupted
from node.storage.filesystem import FilesystemDriver
from node.storage.s3 import MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE, S3Driver, part_size

MiB = 1024 * 1024


# Every S3 case runs on moto and on a real Ceph RADOS Gateway, which differ from AWS in places.
S3_SERVERS = {"s3-moto": "s3_server", "s3-rgw": "rgw_server"}


@pytest.fixture(params=["filesystem", *S3_SERVERS])
async def driver(request, tmp_path) -> AsyncIterator[StorageDriver]:
    if request.param == "filesystem":
        store: StorageDriver = FilesystemDriver(str(tmp_path / "root"))
        yield store
        await store.close()
        return
    # The smallest part size S3 allows, so small test blobs exercise multipart uploads and copies.
    server = request.getfixturevalue(S3_SERVERS[request.param])
    config = server.storage_config(
        chunksize=MIN_PART_SIZE, multipartcopythresholdsize=MIN_PART_SIZE, multipartcopychunksize=MIN_PART_SIZE
    )
    store = S3Driver(config)
    yield store
    await store.close()
    server.remove_prefix(config.rootdirectory.strip("/") + "/")


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _read_all(store: StorageDriver, key: str, offset: int = 0, length: int | None = None) -> bytes:
    return b"".join([chunk async for chunk in store.read(key, offset, length)])


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def test_small_object_round_trips_and_stat_reports_its_size(driver):
    key = layout.blob_key(_digest(b"manifest"))
    assert await driver.stat(key) is None
    await driver.write_bytes(key, b"manifest")
    assert await driver.stat(key) == 8
    assert await driver.read_bytes(key) == b"manifest"


async def test_read_bytes_of_absent_object_raises_file_not_found(driver):
    with pytest.raises(FileNotFoundError):
        await driver.read_bytes(layout.blob_key(_digest(b"nothing")))


async def test_ranged_read_returns_exactly_the_requested_bytes(driver):
    data = os.urandom(3 * 1024 * 1024 + 17)
    key = layout.blob_key(_digest(data))
    await driver.write_bytes(key, data)
    assert await _read_all(driver, key) == data
    assert await _read_all(driver, key, 5, 10) == data[5:15]
    assert await _read_all(driver, key, len(data) - 3) == data[-3:]
    assert await _read_all(driver, key, 1024 * 1024 - 1, 2 * 1024 * 1024) == data[1024 * 1024 - 1 : 3 * 1024 * 1024 - 1]


async def test_chunked_upload_commits_to_blob_key(driver):
    parts = [os.urandom(n) for n in (1, 70_000, 1 << 20, 5)]
    data = b"".join(parts)
    upload = layout.upload_key("team/app", "11111111-2222-3333-4444-555555555555")
    state = await driver.upload_start(upload)
    offset = 0
    for part in parts:
        written, state = await driver.upload_write(upload, state, offset, _chunks(part[:3], part[3:]))
        assert written == len(part)
        offset += written
    stored = await driver.upload_commit(upload, state, offset, layout.blob_key(_digest(data)))
    assert await driver.stat(stored) == len(data)
    assert await _read_all(driver, stored) == data


async def test_write_after_broken_request_drops_bytes_past_recorded_offset(driver):
    upload = layout.upload_key("team/app", "21111111-2222-3333-4444-555555555555")
    state = await driver.upload_start(upload)
    written, state = await driver.upload_write(upload, state, 0, _chunks(b"abc"))
    # A later request wrote bytes that were never recorded; the session still says offset 3.
    _, state = await driver.upload_write(upload, state, 3, _chunks(b"garbage"))
    written, state = await driver.upload_write(upload, state, 3, _chunks(b"def"))
    stored = await driver.upload_commit(upload, state, 6, layout.blob_key(_digest(b"abcdef")))
    assert await driver.read_bytes(stored) == b"abcdef"


async def test_broken_stream_keeps_what_arrived_and_reports_it(driver):
    upload = layout.upload_key("team/app", "31111111-2222-3333-4444-555555555555")
    state = await driver.upload_start(upload)

    async def breaking() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        yield b"y" * 24
        raise ConnectionResetError("client went away")

    with pytest.raises(UploadInterrupted) as caught:
        await driver.upload_write(upload, state, 0, breaking())
    assert caught.value.written == 1024
    written, state = await driver.upload_write(upload, caught.value.state, 1024, _chunks(b"z"))
    data = b"x" * 1000 + b"y" * 24 + b"z"
    stored = await driver.upload_commit(upload, state, len(data), layout.blob_key(_digest(data)))
    assert await driver.read_bytes(stored) == data


async def test_uncommitted_upload_is_never_visible_at_the_blob_key(driver):
    # Big enough for an S3 multipart upload with a part done and a tail pending.
    data = os.urandom(6 * MiB + 5)
    key = layout.blob_key(_digest(data))
    upload = layout.upload_key("team/app", "41111111-2222-3333-4444-555555555555")
    state = await driver.upload_start(upload)
    written, state = await driver.upload_write(upload, state, 0, _chunks(data[: 3 * MiB]))
    written, state = await driver.upload_write(upload, state, 3 * MiB, _chunks(data[3 * MiB :]))
    assert await driver.stat(key) is None
    assert [k async for k in driver.list(layout.BLOBS)] == []
    # Committed, the object is where upload_commit says (an S3 multipart upload is completed
    # where it began, outside BLOBS; the blob record names that key).
    stored = await driver.upload_commit(upload, state, len(data), key)
    assert await driver.stat(stored) == len(data)
    assert await _read_all(driver, stored) == data
    assert stored == key or await driver.stat(key) is None


async def test_abort_removes_upload_data(driver):
    upload = layout.upload_key("team/app", "51111111-2222-3333-4444-555555555555")
    state = await driver.upload_start(upload)
    await driver.upload_write(upload, state, 0, _chunks(b"data"))
    await driver.upload_abort(upload, state)
    assert [k async for k in driver.list(layout.REPOSITORIES)] == []


async def test_commit_of_existing_content_keeps_one_copy(driver):
    data = b"same bytes"
    key = layout.blob_key(_digest(data))
    for n in range(2):
        upload = layout.upload_key("team/app", f"6111111{n}-2222-3333-4444-555555555555")
        state = await driver.upload_start(upload)
        _, state = await driver.upload_write(upload, state, 0, _chunks(data))
        await driver.upload_commit(upload, state, len(data), key)
    assert await driver.read_bytes(key) == data
    assert [k async for k in driver.list(layout.REPOSITORIES)] == []


async def test_list_and_delete(driver):
    keys = [layout.blob_key(_digest(bytes([n]))) for n in range(3)]
    for n, key in enumerate(keys):
        await driver.write_bytes(key, bytes([n]))
    assert sorted([k async for k in driver.list(layout.BLOBS)]) == sorted(keys)
    await driver.delete(keys[0])
    await driver.delete(keys[0])  # absent is fine
    assert sorted([k async for k in driver.list(layout.BLOBS)]) == sorted(keys[1:])


async def test_delete_many_removes_every_named_object_and_ignores_absent_ones(driver):
    keys = [layout.blob_key(_digest(f"many {n}".encode())) for n in range(5)]
    for n, key in enumerate(keys):
        await driver.write_bytes(key, f"many {n}".encode())
    await driver.delete_many(keys[:3] + [layout.blob_key(_digest(b"never stored"))])
    await driver.delete_many([])
    assert sorted([k async for k in driver.list(layout.BLOBS)]) == sorted(keys[3:])


async def test_list_objects_gives_each_object_its_size_and_modification_time(driver):
    before = time.time()
    keys = {layout.blob_key(_digest(b"x" * n)): n for n in (0, 1, 70_000)}
    for key, size in keys.items():
        await driver.write_bytes(key, b"x" * size)
    await driver.write_bytes(layout.tag_current_key("team/app", "v1"), b"elsewhere")
    found = [item async for item in driver.list_objects(layout.BLOBS)]
    assert sorted((item.key, item.size) for item in found) == sorted(keys.items())
    for item in found:
        # The listing's time is the object's own (S3 keeps whole seconds).
        assert item.modified == pytest.approx(await driver.modified(item.key), abs=1.0)
        assert before - 2 <= item.modified <= time.time() + 2
    assert [item async for item in driver.list_objects(layout.BLOBS + "sha256/00/")] == []


async def test_list_objects_pages_through_more_than_one_listing_request(driver):
    keys = sorted(layout.layer_link_key("team/app", _digest(str(n).encode())) for n in range(1005))
    for start in range(0, len(keys), 100):
        await asyncio.gather(*(driver.write_bytes(key, key.encode()) for key in keys[start : start + 100]))
    found = [item async for item in driver.list_objects(layout.repository_prefix("team/app"))]
    assert sorted(item.key for item in found) == keys
    assert {item.size for item in found} == {len(keys[0])}


@pytest.mark.parametrize("size", [0, 5, 3 * MiB + 1, 11 * MiB + 3])
async def test_a_streamed_object_of_any_size_round_trips(driver, size):
    data = os.urandom(size)
    key = layout.snapshot_key(1_700_000_000.5, size)
    assert await driver.write_stream(key, _odd_chunks(data)) == size
    assert await driver.stat(key) == size
    assert await _read_all(driver, key) == data
    assert [k async for k in driver.list(layout.SNAPSHOTS)] == [key]


async def test_a_streamed_object_replaces_an_older_one_whole(driver):
    key = layout.snapshot_key(1_700_000_000, 1)
    await driver.write_bytes(key, b"old")
    await driver.write_stream(key, _chunks(b"new ", b"bytes"))
    assert await driver.read_bytes(key) == b"new bytes"


async def test_a_stream_that_breaks_leaves_nothing_behind(driver):
    async def breaking(total: int) -> AsyncIterator[bytes]:
        sent = 0
        while sent < total:
            yield b"x" * MiB
            sent += MiB
        raise ConnectionError("the source went away")

    for total in (MiB, 7 * MiB):  # within one part, and after a part went out
        key = layout.snapshot_key(1_700_000_000, total)
        with pytest.raises(ConnectionError):
            await driver.write_stream(key, breaking(total))
        assert await driver.stat(key) is None
        assert [k async for k in driver.list("wharf/")] == []
    if isinstance(driver, FilesystemDriver):
        assert not any(name.startswith(".tmp-") for _, _, files in os.walk(driver.root) for name in files)


async def test_layout_uses_distribution_blob_keys():
    digest = "sha256:" + "ab" * 32
    assert layout.blob_key(digest) == f"docker/registry/v2/blobs/sha256/ab/{'ab' * 32}/data"
    assert layout.digest_from_blob_key(layout.blob_key(digest)) == digest


def test_layout_builds_and_parses_distribution_repository_links():
    digest = "sha256:" + "cd" * 32
    repo = "docker/registry/v2/repositories/team/sub/app"
    cases = {
        layout.layer_link_key("team/sub/app", digest): (f"{repo}/_layers/sha256/{'cd' * 32}/link", "layer", None),
        layout.revision_link_key("team/sub/app", digest): (
            f"{repo}/_manifests/revisions/sha256/{'cd' * 32}/link",
            "revision",
            None,
        ),
        layout.tag_current_key("team/sub/app", "v1.0"): (f"{repo}/_manifests/tags/v1.0/current/link", "tag", "v1.0"),
        layout.tag_index_key("team/sub/app", "v1.0", digest): (
            f"{repo}/_manifests/tags/v1.0/index/sha256/{'cd' * 32}/link",
            "tag_index",
            "v1.0",
        ),
    }
    for key, (expected, kind, tag) in cases.items():
        assert key == expected
        parsed = layout.parse_repository_key(key)
        assert parsed is not None and (parsed.repository, parsed.kind, parsed.tag) == ("team/sub/app", kind, tag)
        assert parsed.digest == (None if kind == "tag" else digest)
    assert layout.repository_prefix("team/sub/app") == repo + "/"
    upload = layout.parse_repository_key(layout.upload_key("team/app", "1234"))
    assert upload is not None and (upload.repository, upload.area, upload.kind) == ("team/app", "_uploads", "other")
    # Left-overs of older Distribution versions belong to the repository but are no link it serves.
    signature = layout.parse_repository_key(f"{repo}/_manifests/revisions/sha256/{'cd' * 32}/signatures/sha256/ab/link")
    assert signature is not None and signature.kind == "other"
    assert layout.parse_repository_key(f"{repo}/README") is None
    assert layout.parse_repository_key(layout.blob_key(digest)) is None


# -- S3: parts from chunks of any size, state that any node can continue ------------------------


@pytest.fixture(params=list(S3_SERVERS))
def s3(request):
    """The S3 server a case runs on: moto, then Ceph RGW."""
    return request.getfixturevalue(S3_SERVERS[request.param])


@pytest.fixture()
def s3_config(s3):
    """A `storage.s3` section with 5 MiB parts under a root directory of its own, removed afterwards."""
    config = s3.storage_config(chunksize=MIN_PART_SIZE)
    yield config
    s3.remove_prefix(config.rootdirectory.strip("/") + "/")


def _recorded(state: dict) -> dict:  # type: ignore[type-arg]
    """The state as the next request gets it: through JSON in the coordinator's session record."""
    return json.loads(json.dumps(state))


def _odd_chunks(data: bytes, sizes: tuple[int, ...] = (1, 65_521, 7, 300_001)) -> AsyncIterator[bytes]:
    """`data` cut into chunks of awkward, varying sizes, as clients and HTTP servers do."""

    async def gen() -> AsyncIterator[bytes]:
        position, n = 0, 0
        while position < len(data):
            size = sizes[n % len(sizes)]
            yield data[position : position + size]
            position += size
            n += 1

    return gen()


def _bucket_keys(s3, config) -> list[str]:  # type: ignore[no-untyped-def]
    client = s3.client()
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=config.bucket, Prefix=config.rootdirectory.strip("/") + "/"
        )
        return [item["Key"] for page in pages for item in page.get("Contents", [])]
    finally:
        client.close()


def _multipart_uploads(s3, config) -> list[str]:  # type: ignore[no-untyped-def]
    client = s3.client()
    try:
        response = client.list_multipart_uploads(Bucket=config.bucket, Prefix=config.rootdirectory.strip("/") + "/")
        return [upload["Key"] for upload in response.get("Uploads", [])]
    finally:
        client.close()


async def test_s3_parts_are_composed_from_chunks_of_any_size(s3, s3_config):
    data = os.urandom(7 * MiB + 1)
    upload = layout.upload_key("team/app", "a1111111-2222-3333-4444-555555555555")
    store = S3Driver(s3_config)
    try:
        state = _recorded(await store.upload_start(upload))
        offset = 0
        # 3 MiB (a tail), 4 MiB (one 5 MiB part and a 2 MiB tail), 1 byte (a bigger tail).
        for length, parts, tail in ((3 * MiB, 0, 3 * MiB), (4 * MiB, 1, 2 * MiB), (1, 1, 2 * MiB + 1)):
            written, state = await store.upload_write(
                upload, state, offset, _odd_chunks(data[offset : offset + length])
            )
            state = _recorded(state)
            assert written == length
            offset += written
            assert [size for _, _, size in state["parts"]] == [5 * MiB] * parts
            assert state["tailsize"] == tail
        # Each request left at most one segment: none was rewritten.
        assert len([k for k in _bucket_keys(s3, s3_config) if ".tail-" in k]) <= 3
        key = layout.blob_key(_digest(data))
        stored = await store.upload_commit(upload, state, len(data), key)
        # Completed where it began; the blob key stays empty (no server-side copy).
        assert stored == upload
        assert await store.stat(key) is None
        assert await store.stat(stored) == len(data)
        assert await _read_all(store, stored) == data
        # Ranged reads across the part boundary.
        assert await _read_all(store, stored, 5 * MiB - 3, 7) == data[5 * MiB - 3 : 5 * MiB + 4]
        assert await _read_all(store, stored, len(data) - 1) == data[-1:]
        # Nothing else is left: no tails, no multipart upload in progress.
        assert [k async for k in store.list(layout.REPOSITORIES)] == [upload]
        assert _multipart_uploads(s3, s3_config) == []
    finally:
        await store.close()


async def test_s3_upload_smaller_than_a_part_is_put_at_the_blob_key(s3, s3_config):
    data = os.urandom(2 * MiB + 3)
    upload = layout.upload_key("team/app", "a2111111-2222-3333-4444-555555555555")
    store = S3Driver(s3_config)
    try:
        state = await store.upload_start(upload)
        _, state = await store.upload_write(upload, _recorded(state), 0, _odd_chunks(data[:MiB]))
        _, state = await store.upload_write(upload, _recorded(state), MiB, _odd_chunks(data[MiB:]))
        key = layout.blob_key(_digest(data))
        assert await store.upload_commit(upload, _recorded(state), len(data), key) == key
        assert await _read_all(store, key) == data
        assert [k async for k in store.list(layout.REPOSITORIES)] == []
        assert _multipart_uploads(s3, s3_config) == []
    finally:
        await store.close()


async def test_s3_one_mib_requests_on_one_node_write_each_byte_once_and_read_nothing_back(s3_config):
    """The request that completes a part takes the earlier requests' segments from this node's cache."""
    data = os.urandom(12 * MiB + 77)
    upload = layout.upload_key("team/app", "a2211111-2222-3333-4444-555555555555")
    store = S3Driver(s3_config)
    reads: list[str] = []
    real_get = store._get_bytes

    def counted_get(full_key: str, length: int | None) -> bytes:
        reads.append(full_key)
        return real_get(full_key, length)

    store._get_bytes = counted_get  # type: ignore[method-assign]
    try:
        state = _recorded(await store.upload_start(upload))
        for offset in range(0, len(data), MiB):
            written, state = await store.upload_write(upload, state, offset, _chunks(data[offset : offset + MiB]))
            state = _recorded(state)
            assert written == min(MiB, len(data) - offset)
            assert len(state["segments"]) <= 4, "segments are consumed by each part they complete"
        assert [size for _, _, size in state["parts"]] == [5 * MiB, 5 * MiB]
        stored = await store.upload_commit(upload, state, len(data), layout.blob_key(_digest(data)))
        assert reads == [], "no segment was read back from S3"
        assert await _read_all(store, stored) == data
    finally:
        await store.close()


async def test_s3_tiny_requests_merge_their_segments_and_commit_byte_identical(s3, s3_config):
    from node.storage.s3 import MAX_SEGMENTS

    data = os.urandom((MAX_SEGMENTS + 5) * 1000 + 3)
    upload = layout.upload_key("team/app", "a2311111-2222-3333-4444-555555555555")
    nodes = [S3Driver(s3_config), S3Driver(s3_config)]  # requests alternate: half the segments are read back
    try:
        state = _recorded(await nodes[0].upload_start(upload))
        for n, offset in enumerate(range(0, len(data), 1000)):
            _, state = await nodes[n % 2].upload_write(upload, state, offset, _chunks(data[offset : offset + 1000]))
            state = _recorded(state)
            assert len(state["segments"]) <= MAX_SEGMENTS
        assert state["tailsize"] == len(data)
        key = layout.blob_key(_digest(data))
        assert await nodes[1].upload_commit(upload, state, len(data), key) == key
        assert await _read_all(nodes[0], key) == data
        assert [k for k in _bucket_keys(s3, s3_config) if ".tail-" in k] == []
    finally:
        for node in nodes:
            await node.close()


async def test_s3_upload_recorded_by_an_earlier_version_with_one_tail_object_continues(s3, s3_config):
    """A session written before segments (one "tail" object, a prefix of it counted) still commits."""
    data = os.urandom(7 * MiB + 9)
    upload = layout.upload_key("team/app", "a2411111-2222-3333-4444-555555555555")
    store = S3Driver(s3_config)
    try:
        await store.write_bytes(f"{upload}.tail-0ld", data[: 3 * MiB] + b"unrecorded")
        old = {"v": 1, "partsize": 5 * MiB, "upload": None, "parts": [], "tail": "0ld", "tailsize": 3 * MiB}
        old["stale"] = []
        written, state = await store.upload_write(upload, old, 3 * MiB, _odd_chunks(data[3 * MiB :]))
        assert written == len(data) - 3 * MiB
        state = _recorded(state)
        assert [size for _, _, size in state["parts"]] == [5 * MiB]
        stored = await store.upload_commit(upload, state, len(data), layout.blob_key(_digest(data)))
        assert await _read_all(store, stored) == data
        assert [k for k in _bucket_keys(s3, s3_config) if ".tail-" in k] == []
    finally:
        await store.close()


async def test_s3_upload_continues_on_another_node(s3_config):
    """Each request on a fresh driver, as if every PATCH and the PUT landed on a different node."""
    data = os.urandom(11 * MiB + 12_345)
    upload = layout.upload_key("team/app", "a3111111-2222-3333-4444-555555555555")
    cuts = [0, 4 * MiB, 6 * MiB + 1, 6 * MiB + 2, 10 * MiB + 7, len(data)]
    node = S3Driver(s3_config)
    state = _recorded(await node.upload_start(upload))
    await node.close()
    for start, end in zip(cuts, cuts[1:], strict=False):
        node = S3Driver(s3_config)
        try:
            written, new_state = await node.upload_write(upload, state, start, _odd_chunks(data[start:end]))
        finally:
            await node.close()
        assert written == end - start
        state = _recorded(new_state)
    assert len(state["parts"]) == 2
    node = S3Driver(s3_config)
    try:
        stored = await node.upload_commit(upload, state, len(data), layout.blob_key(_digest(data)))
        assert await _read_all(node, stored) == data
    finally:
        await node.close()


async def test_s3_broken_stream_mid_part_resumes_on_another_node(s3, s3_config):
    data = os.urandom(10 * MiB + 99)
    upload = layout.upload_key("team/app", "a4111111-2222-3333-4444-555555555555")

    async def breaking() -> AsyncIterator[bytes]:
        yield data[: 3 * MiB]
        yield data[3 * MiB : 7 * MiB]  # completes part 1 (5 MiB) and starts part 2
        yield data[7 * MiB : 8 * MiB]
        raise ConnectionResetError("client went away")

    first = S3Driver(s3_config)
    try:
        state = _recorded(await first.upload_start(upload))
        with pytest.raises(UploadInterrupted) as caught:
            await first.upload_write(upload, state, 0, breaking())
    finally:
        await first.close()
    assert caught.value.written == 8 * MiB
    assert isinstance(caught.value.cause, ConnectionResetError)
    state = _recorded(caught.value.state)
    assert [size for _, _, size in state["parts"]] == [5 * MiB]
    assert state["tailsize"] == 3 * MiB

    second = S3Driver(s3_config)
    try:
        written, state = await second.upload_write(upload, state, 8 * MiB, _odd_chunks(data[8 * MiB :]))
        assert written == len(data) - 8 * MiB
        stored = await second.upload_commit(upload, _recorded(state), len(data), layout.blob_key(_digest(data)))
        assert await _read_all(second, stored) == data
        assert _multipart_uploads(s3, s3_config) == []
    finally:
        await second.close()


async def test_s3_parts_of_an_unrecorded_request_are_replaced(s3, s3_config):
    """A request that uploaded a part and a tail but whose state was never recorded leaves no trace."""
    good = os.urandom(9 * MiB)
    upload = layout.upload_key("team/app", "a5111111-2222-3333-4444-555555555555")
    store = S3Driver(s3_config)
    try:
        state = await store.upload_start(upload)
        _, recorded = await store.upload_write(upload, _recorded(state), 0, _chunks(good[: 3 * MiB]))
        recorded = _recorded(recorded)

        async def wrong_then_broken() -> AsyncIterator[bytes]:
            yield os.urandom(4 * MiB)  # fills part 1 with other bytes
            yield os.urandom(MiB)
            raise ConnectionResetError("node died before recording")

        with pytest.raises(UploadInterrupted):
            await store.upload_write(upload, recorded, 3 * MiB, wrong_then_broken())
        # The session still holds `recorded`; the client resumes from its offset with the right bytes.
        written, state = await store.upload_write(upload, recorded, 3 * MiB, _odd_chunks(good[3 * MiB :]))
        assert written == 6 * MiB
        stored = await store.upload_commit(upload, _recorded(state), len(good), layout.blob_key(_digest(good)))
        assert await _read_all(store, stored) == good
        assert [k for k in _bucket_keys(s3, s3_config) if ".tail-" in k] == []
    finally:
        await store.close()


async def test_s3_commit_retried_after_it_completed_returns_the_same_object(s3_config):
    """A node may die after completing the upload but before the blob record was written."""
    data = os.urandom(6 * MiB + 1)
    upload = layout.upload_key("team/app", "a6111111-2222-3333-4444-555555555555")
    key = layout.blob_key(_digest(data))
    store = S3Driver(s3_config)
    try:
        state = await store.upload_start(upload)
        _, state = await store.upload_write(upload, state, 0, _chunks(data))
        state = _recorded(state)
        stored = await store.upload_commit(upload, state, len(data), key)
        assert await store.upload_commit(upload, state, len(data), key) == stored
        assert await _read_all(store, stored) == data
        with pytest.raises(ValueError):
            await store.upload_commit(upload, state, len(data) - 1, key)
    finally:
        await store.close()


async def test_s3_commit_retried_after_completing_but_before_removing_the_tail_returns_the_same_object(s3, s3_config):
    """A node may die between completing the multipart upload and deleting the tail object.

    The retry then finds the tail still there and a multipart upload that no longer exists, which
    servers report differently (NoSuchUpload from AWS and Ceph RGW, a bare 500 from moto).
    """
    data = os.urandom(6 * MiB + 1)
    upload = layout.upload_key("team/app", "a6211111-2222-3333-4444-555555555555")
    key = layout.blob_key(_digest(data))
    store = S3Driver(s3_config)
    try:
        _, state = await store.upload_write(upload, await store.upload_start(upload), 0, _chunks(data))
        state = _recorded(state)
        assert len(state["parts"]) == 1 and state["tailsize"] == MiB + 1
        stored = await store.upload_commit(upload, state, len(data), key)
        # What the dead node would have left: the tail object the commit had not yet removed.
        tail = f"{upload}.tail-{state['segments'][0][0]}"
        await store.write_bytes(tail, data[5 * MiB :])
        assert await store.upload_commit(upload, state, len(data), key) == stored
        assert await _read_all(store, stored) == data
        assert await store.stat(tail) is None
    finally:
        await store.close()


async def test_s3_part_rewritten_after_its_state_was_recorded_is_refused_at_commit(s3, s3_config):
    """A late write from an abandoned request cannot slip other bytes into a blob.

    The commit names each part by the ETag recorded in the upload state, and S3 (moto and Ceph RGW
    alike) refuses a part whose stored ETag differs; nothing appears at the upload or blob key.
    """
    from botocore.exceptions import ClientError

    data = os.urandom(6 * MiB)
    upload = layout.upload_key("team/app", "a6311111-2222-3333-4444-555555555555")
    key = layout.blob_key(_digest(data))
    store = S3Driver(s3_config)
    client = s3.client()
    try:
        _, state = await store.upload_write(upload, await store.upload_start(upload), 0, _chunks(data))
        state = _recorded(state)
        client.upload_part(
            Bucket=s3_config.bucket,
            Key=s3_config.rootdirectory.strip("/") + "/" + upload,
            UploadId=state["upload"],
            PartNumber=1,
            Body=os.urandom(5 * MiB),
        )
        with pytest.raises(ClientError) as refused:
            await store.upload_commit(upload, state, len(data), key)
        assert refused.value.response["Error"]["Code"] == "InvalidPart"
        assert await store.stat(upload) is None
        assert await store.stat(key) is None
        await store.upload_abort(upload, state)
    finally:
        client.close()
        await store.close()


async def test_s3_abort_removes_parts_and_tails(s3, s3_config):
    upload = layout.upload_key("team/app", "a7111111-2222-3333-4444-555555555555")
    store = S3Driver(s3_config)
    try:
        state = await store.upload_start(upload)
        _, state = await store.upload_write(upload, state, 0, _chunks(os.urandom(6 * MiB)))
        assert _multipart_uploads(s3, s3_config) == [s3_config.rootdirectory.strip("/") + "/" + upload]
        await store.upload_abort(upload, _recorded(state))
        await store.upload_abort(upload, _recorded(state))  # twice is fine
        assert _multipart_uploads(s3, s3_config) == []
        assert _bucket_keys(s3, s3_config) == []
    finally:
        await store.close()


async def test_s3_write_below_completed_parts_is_refused(s3_config):
    upload = layout.upload_key("team/app", "a8111111-2222-3333-4444-555555555555")
    store = S3Driver(s3_config)
    try:
        state = await store.upload_start(upload)
        _, state = await store.upload_write(upload, state, 0, _chunks(os.urandom(6 * MiB)))
        with pytest.raises(ValueError):
            await store.upload_write(upload, state, 4 * MiB, _chunks(b"x"))
        with pytest.raises(ValueError):
            await store.upload_write(upload, state, 6 * MiB + 1, _chunks(b"x"))
        await store.upload_abort(upload, state)
    finally:
        await store.close()


def test_s3_part_sizes_reach_the_largest_object_within_10000_parts():
    for base in (MIN_PART_SIZE, 10 * MiB, 64 * MiB):
        sizes = [part_size(base, n) for n in range(1, MAX_PARTS + 1)]
        assert sizes == sorted(sizes)
        assert min(sizes) == base and max(sizes) <= MAX_PART_SIZE
        # 4.88 TiB with the 5 MiB minimum, past S3's 5 TiB object limit from 10 MiB on.
        assert sum(sizes) >= (4.8 if base == MIN_PART_SIZE else 5) * 1024**4
        # A part is never more than a few thousandths of what came before it.
        before = 0
        for size in sizes:
            assert size <= max(base, before // 500)
            before += size
    assert part_size(10 * MiB, 1000) == 10 * MiB and part_size(10 * MiB, 1001) == 20 * MiB


async def test_s3_growing_part_sizes_commit_byte_identical(s3_config):
    data = os.urandom(17 * MiB + 3)
    upload = layout.upload_key("team/app", "a9111111-2222-3333-4444-555555555555")
    store = S3Driver(s3_config)
    store._parts_per_step = 1  # part sizes 5, 10, 20 MiB ... instead of after every 1000 parts
    try:
        state = await store.upload_start(upload)
        _, state = await store.upload_write(upload, state, 0, _odd_chunks(data[: 9 * MiB]))
        _, state = await store.upload_write(upload, _recorded(state), 9 * MiB, _odd_chunks(data[9 * MiB :]))
        assert [size for _, _, size in state["parts"]] == [5 * MiB, 10 * MiB]
        assert state["tailsize"] == 2 * MiB + 3
        stored = await store.upload_commit(upload, _recorded(state), len(data), layout.blob_key(_digest(data)))
        assert await _read_all(store, stored) == data
    finally:
        await store.close()


async def test_s3_redirect_url_serves_the_object(s3_config):
    store = S3Driver(s3_config)
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        data = os.urandom(100_000)
        key = layout.blob_key(_digest(data))
        await store.write_bytes(key, data)
        url = await store.redirect_url(key)
        assert url is not None and "X-Amz-Signature=" in url
        with direct.open(url, timeout=10) as response:
            assert response.read() == data
        assert store.local_path(key) is None
    finally:
        await store.close()


async def test_s3_redirect_url_is_signed_for_the_public_endpoint_only(s3_config, s3):
    # Nodes reach the server by its address, clients by a second name of it (`localhost`): the
    # URL names only the public one, and the server accepts the signature made for that name.
    internal = urlsplit(s3.endpoint)
    public = f"http://localhost:{internal.port}"
    store = S3Driver(dataclasses.replace(s3_config, publicendpoint=public))
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        data = os.urandom(50_000)
        key = layout.blob_key(_digest(data))
        await store.write_bytes(key, data)
        assert await store.read_bytes(key) == data  # the node itself still uses regionendpoint
        url = await store.redirect_url(key)
        assert url is not None and urlsplit(url).netloc == f"localhost:{internal.port}"
        assert internal.hostname not in url
        with direct.open(url, timeout=10) as response:
            assert response.read() == data
    finally:
        await store.close()


async def test_s3_failures_other_than_not_found_are_raised(s3):
    from botocore.exceptions import ClientError

    store = S3Driver(s3.storage_config(bucket="no-such-bucket"))
    try:
        with pytest.raises(ClientError) as caught:
            await store.read_bytes("a/b")
        assert not isinstance(caught.value, FileNotFoundError)
        with pytest.raises(ClientError):
            await store.write_bytes("a/b", b"x")
        with pytest.raises(ClientError):
            [k async for k in store.list("a")]
    finally:
        await store.close()


async def test_s3_a_stream_that_breaks_after_a_part_aborts_its_multipart_upload(s3_server, s3_config):
    store = S3Driver(s3_config)

    async def breaking() -> AsyncIterator[bytes]:
        for _ in range(7):
            yield b"y" * MiB
        raise ConnectionError("the source went away")

    try:
        with pytest.raises(ConnectionError):
            await store.write_stream(layout.snapshot_key(1_700_000_000, 7), breaking())
        assert _multipart_uploads(s3_server, s3_config) == []
        assert _bucket_keys(s3_server, s3_config) == []
    finally:
        await store.close()


def test_snapshot_names_sort_by_time_and_parse_back_exactly():
    times = [1_700_000_000.0, 1_700_000_000.001, 1_700_000_000.999, 1_700_000_001.0, 1_800_000_000.25]
    keys = [layout.snapshot_key(t, 10 ** (5 - i)) for i, t in enumerate(times)]
    assert sorted(keys) == keys
    assert keys[0] == "wharf/snapshots/wharf-coordinator-20231114T221320.000Z-r100000.jsonl.gz"
    for t, key in zip(times, keys, strict=True):
        created, revision = layout.snapshot_from_key(key)  # type: ignore[misc]
        assert abs(created - t) < 0.001 and layout.snapshot_key(created, revision) == key
    assert layout.snapshot_from_key(layout.snapshot_key(1.5, 7, prefix=""), prefix="") == (1.5, 7)
    others = [
        "wharf/snapshots/notes.txt",
        "wharf/snapshots/wharf-coordinator-20231114T221320.000Z-r1.jsonl.gz.tail-abc",
        "wharf/snapshots/old/wharf-coordinator-20231114T221320.000Z-r1.jsonl.gz",
        "wharf/snapshots/wharf-coordinator-20231314T221320.000Z-r1.jsonl.gz",  # month 13
        "wharf/snapshots/.tmp-wharf-coordinator-20231114T221320.000Z-r1.jsonl.gz",
        "docker/registry/v2/wharf-coordinator-20231114T221320.000Z-r1.jsonl.gz",
    ]
    assert [layout.snapshot_from_key(key) for key in others] == [None] * len(others)


@pytest.mark.parametrize("size", [0, 1000, 11 * MiB + 3])
async def test_copy_makes_an_identical_object_and_leaves_the_source(driver, size):
    data = os.urandom(size)
    source = layout.upload_key("team/app", "11111111-2222-3333-4444-00000000c0b1")
    await driver.write_stream(source, _chunks(data))
    key = layout.blob_key(_digest(data))
    assert await driver.copy(source, key) == size
    assert await _read_all(driver, key) == data
    assert await _read_all(driver, source) == data


async def test_copy_of_a_missing_object_raises_file_not_found(driver):
    with pytest.raises(FileNotFoundError):
        await driver.copy(layout.blob_key(_digest(b"gone")), layout.blob_key(_digest(b"elsewhere")))


def _count_fsyncs(monkeypatch) -> list[int]:
    synced: list[int] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


async def test_filesystem_commit_syncs_only_the_directory_when_the_upload_was_synced_whole(tmp_path, monkeypatch):
    # An acknowledged blob survives a power cut: upload_write syncs the bytes it wrote, the commit
    # syncs the directory that the rename changed; the file is not synced a second time.
    store = FilesystemDriver(str(tmp_path / "root"))
    try:
        data = b"one small layer"
        upload = layout.upload_key("team/app", "31111111-2222-3333-4444-555555555555")
        state = await store.upload_start(upload)
        synced = _count_fsyncs(monkeypatch)
        _, state = await store.upload_write(upload, state, 0, _chunks(data))
        assert len(synced) == 1
        stored = await store.upload_commit(upload, state, len(data), layout.blob_key(_digest(data)))
        assert len(synced) == 2
        assert await store.read_bytes(stored) == data
    finally:
        await store.close()


async def test_filesystem_commit_syncs_the_file_again_when_it_cuts_unrecorded_bytes(tmp_path, monkeypatch):
    store = FilesystemDriver(str(tmp_path / "root"))
    try:
        upload = layout.upload_key("team/app", "41111111-2222-3333-4444-555555555555")
        state = await store.upload_start(upload)
        _, state = await store.upload_write(upload, state, 0, _chunks(b"abc"))
        _, state = await store.upload_write(upload, state, 3, _chunks(b"never recorded"))
        synced = _count_fsyncs(monkeypatch)
        stored = await store.upload_commit(upload, state, 3, layout.blob_key(_digest(b"abc")))
        assert len(synced) == 2  # the cut file, then its new directory
        assert await store.read_bytes(stored) == b"abc"
    finally:
        await store.close()


async def test_filesystem_whole_upload_syncs_the_file_then_the_directory_that_names_it(tmp_path, monkeypatch):
    store = FilesystemDriver(str(tmp_path / "root"))
    try:
        data = b"one whole small layer"
        upload = layout.upload_key("team/app", "51111111-2222-3333-4444-555555555555")
        key = layout.blob_key(_digest(data))
        assert store.stat_now(key) is None
        # Bytes of an earlier request that broke before it was recorded are no part of the blob.
        (tmp_path / "root" / upload).parent.mkdir(parents=True)
        (tmp_path / "root" / upload).write_bytes(b"x" * 100)
        synced = _count_fsyncs(monkeypatch)
        assert await store.upload_whole(upload, data, key) == key
        assert len(synced) == 2  # the file, then the blob's directory
        assert await store.read_bytes(key) == data and store.stat_now(key) == len(data)
        assert not (tmp_path / "root" / upload).parent.exists()
    finally:
        await store.close()


async def test_filesystem_whole_upload_of_a_blob_already_stored_writes_nothing(tmp_path):
    store = FilesystemDriver(str(tmp_path / "root"))
    try:
        data = b"stored before"
        key = layout.blob_key(_digest(data))
        await store.write_bytes(key, data)
        upload = layout.upload_key("team/app", "61111111-2222-3333-4444-555555555555")
        assert await store.upload_whole(upload, data, key) == key
        assert not (tmp_path / "root" / upload).parent.exists()
        assert [k async for k in store.list("")] == [key]
    finally:
        await store.close()
