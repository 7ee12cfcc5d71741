"""The storage driver contract: every driver passes the same cases."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator

import pytest

from node.storage import layout
from node.storage.driver import StorageDriver, UploadInterrupted
from node.storage.filesystem import FilesystemDriver


@pytest.fixture(params=["filesystem"])
async def driver(request, tmp_path) -> AsyncIterator[StorageDriver]:
    if request.param == "filesystem":
        store: StorageDriver = FilesystemDriver(str(tmp_path / "root"))
    yield store
    await store.close()


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
    key = layout.blob_key(_digest(data))
    await driver.upload_commit(upload, state, offset, key)
    assert await driver.stat(key) == len(data)
    assert await _read_all(driver, key) == data


async def test_write_after_broken_request_drops_bytes_past_recorded_offset(driver):
    upload = layout.upload_key("team/app", "21111111-2222-3333-4444-555555555555")
    state = await driver.upload_start(upload)
    written, state = await driver.upload_write(upload, state, 0, _chunks(b"abc"))
    # A later request wrote bytes that were never recorded; the session still says offset 3.
    _, state = await driver.upload_write(upload, state, 3, _chunks(b"garbage"))
    written, state = await driver.upload_write(upload, state, 3, _chunks(b"def"))
    key = layout.blob_key(_digest(b"abcdef"))
    await driver.upload_commit(upload, state, 6, key)
    assert await driver.read_bytes(key) == b"abcdef"


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
    key = layout.blob_key(_digest(data))
    await driver.upload_commit(upload, state, len(data), key)
    assert await driver.read_bytes(key) == data


async def test_uncommitted_upload_is_never_visible_at_the_blob_key(driver):
    data = b"partial"
    key = layout.blob_key(_digest(data))
    upload = layout.upload_key("team/app", "41111111-2222-3333-4444-555555555555")
    state = await driver.upload_start(upload)
    await driver.upload_write(upload, state, 0, _chunks(data))
    assert await driver.stat(key) is None
    assert key not in [k async for k in driver.list(layout.BLOBS)]


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


async def test_layout_uses_distribution_blob_keys():
    digest = "sha256:" + "ab" * 32
    assert layout.blob_key(digest) == f"docker/registry/v2/blobs/sha256/ab/{'ab' * 32}/data"
    assert layout.digest_from_blob_key(layout.blob_key(digest)) == digest
