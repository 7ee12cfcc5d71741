"""A small blob's closing PUT into an empty session: staged, synced, recorded, then moved into place.

The filesystem writes and syncs the whole body in one step beside the upload's file, before the
transaction that takes the session records the commit intent; only then does anything reach the
blob's key, and the blob record is written after the directory that names it is synced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from inprocess import InProcessRegistry
from oci_client import OCI_MANIFEST, assert_error, digest_of

from coordinator.quota import QuotaScope, usage
from node.storage import layout

REPO = "team/app"


@pytest.fixture()
async def registry(tmp_path):
    reg = InProcessRegistry(tmp_path, quotas=[{"repository": REPO, "limit": "10000"}])
    yield reg
    await reg.close()


def _files(registry: InProcessRegistry) -> list[str]:
    root = registry.root / "registry"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _upload_dirs(registry: InProcessRegistry) -> list[Path]:
    return [p for p in (registry.root / "registry").rglob("_uploads/*") if p.is_dir()]


def _blob_path(registry: InProcessRegistry, data: bytes) -> Path:
    return registry.root / "registry" / layout.blob_key(digest_of(data))


async def _start(registry: InProcessRegistry, repo: str = REPO) -> str:
    started = await registry.http.post(f"/v2/{repo}/blobs/uploads/")
    assert started.status_code == 202, started.text
    return started.headers["location"]


async def _put(registry: InProcessRegistry, location: str, data: bytes, digest: str | None = None):
    return await registry.http.put(
        location, params={"digest": digest or digest_of(data)}, content=data, headers={"Content-Type": "x/y"}
    )


async def test_whole_small_blob_is_synced_and_recorded_as_committing_before_it_reaches_its_key(registry, monkeypatch):
    svc = registry.services
    data = os.urandom(4096)
    blob = _blob_path(registry, data)
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append("fsync dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")

    def replace(source, target) -> None:  # type: ignore[no-untyped-def]
        real_replace(source, target)
        events.append("rename")

    real_advance, real_commit = svc.sessions.advance, svc.metadata.commit_blob

    async def advance(session, *args, **kwargs):  # type: ignore[no-untyped-def]
        moved = await real_advance(session, *args, **kwargs)
        if moved.commit is not None:
            assert not blob.exists() and not events, "bytes written before the intent that names them"
            events.append("intent")
        return moved

    async def commit_blob(*args, **kwargs):  # type: ignore[no-untyped-def]
        assert blob.read_bytes() == data
        events.append("record")
        return await real_commit(*args, **kwargs)

    location = await _start(registry)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(svc.sessions, "advance", advance)
    monkeypatch.setattr(svc.metadata, "commit_blob", commit_blob)
    response = await _put(registry, location, data)
    assert response.status_code == 201, response.text
    assert events == ["intent", "fsync file", "rename", "fsync dir", "record"]
    assert blob.read_bytes() == data
    assert not _upload_dirs(registry), "the upload's directory went with the commit"
    assert (await registry.http.get(f"/v2/{REPO}/blobs/{digest_of(data)}")).content == data
    assert await svc.metadata.get_link(REPO, digest_of(data)) is not None


async def test_whole_small_blob_already_stored_is_linked_without_a_second_copy(registry):
    data = os.urandom(3000)
    assert (await registry.push_blob("other/app", data)).status_code == 201
    before = _files(registry)
    location = await _start(registry)
    response = await _put(registry, location, data)
    assert response.status_code == 201, response.text
    assert _files(registry) == before, "one copy, nothing left beside it"
    assert not _upload_dirs(registry)
    assert (await registry.http.get(f"/v2/{REPO}/blobs/{digest_of(data)}")).content == data
    assert await usage(registry.kv, QuotaScope(REPO, 0, REPO)) == 3000


async def test_whole_small_blob_with_the_wrong_digest_leaves_nothing(registry):
    location = await _start(registry)
    data = os.urandom(2000)
    response = await _put(registry, location, data, digest_of(b"something else"))
    assert_error(response, 400, "DIGEST_INVALID")
    assert not _blob_path(registry, data).exists() and not _upload_dirs(registry)
    assert assert_error(await registry.http.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert await registry.services.sessions.count() == 0


async def test_whole_small_blob_refused_by_its_quota_leaves_nothing(registry):
    assert (await registry.push_blob(REPO, os.urandom(8000))).status_code == 201
    before = _files(registry)
    location = await _start(registry)
    data = os.urandom(4000)
    assert_error(await _put(registry, location, data), 403, "DENIED")
    assert _files(registry) == before and not _upload_dirs(registry)
    assert await usage(registry.kv, QuotaScope(REPO, 0, REPO)) == 8000
    assert await registry.services.sessions.count() == 0


async def test_whole_small_blob_refused_by_its_quota_at_the_record_takes_back_what_it_moved(registry, monkeypatch):
    # Room seemed to be there when the request began; another push took it before the record.
    assert (await registry.push_blob(REPO, os.urandom(8000))).status_code == 201
    before = _files(registry)

    async def room(*args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        return None

    monkeypatch.setattr(registry.services.uploader, "check_room", room)
    location = await _start(registry)
    data = os.urandom(4000)
    assert_error(await _put(registry, location, data), 403, "DENIED")
    assert not _blob_path(registry, data).exists()
    assert _files(registry) == before and not _upload_dirs(registry)
    assert await registry.services.metadata.get_blob(digest_of(data)) is None
    assert await registry.services.sessions.count() == 0


async def test_whole_small_blob_whose_commit_fails_after_the_rename_leaves_nothing(registry, monkeypatch):
    # As a crash there would leave it for the purge: bytes at the blob's key that no record names,
    # which the intent (nothing stood there before) proves this upload's.
    from node.storage import filesystem

    data = os.urandom(1500)
    location = await _start(registry)

    def broken_sync(path: str) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(filesystem, "_fsync_dir", broken_sync)
    assert (await _put(registry, location, data)).status_code == 500
    monkeypatch.undo()
    assert not _blob_path(registry, data).exists() and not _upload_dirs(registry)
    assert await registry.services.metadata.get_blob(digest_of(data)) is None
    assert await registry.services.sessions.count() == 0
    # And the digest can be pushed again at once.
    assert (await registry.push_blob(REPO, data)).status_code == 201
    assert _blob_path(registry, data).read_bytes() == data


def _refused_manifest() -> bytes:
    config = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(b"absent"), "size": 6}
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": []}
    return json.dumps(doc).encode()


async def test_a_new_manifest_is_looked_for_once_and_refused_leaves_nothing(registry, monkeypatch):
    looked: list[str] = []
    real_stat, real_stat_now = registry.services.storage.stat, registry.services.storage.stat_now

    async def stat(key: str) -> int | None:
        looked.append(key)
        return await real_stat(key)

    def stat_now(key: str) -> int | None:
        looked.append(key)
        return real_stat_now(key)

    monkeypatch.setattr(registry.services.storage, "stat", stat)
    monkeypatch.setattr(registry.services.storage, "stat_now", stat_now)
    body = _refused_manifest()
    response = await registry.http.put(f"/v2/{REPO}/manifests/v1", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    key = layout.blob_key(digest_of(body))
    assert looked.count(key) == 1, "once: the intent takes what the write's look found"
    assert not (registry.root / "registry" / key).exists(), "its intent said nothing stood there"
    assert await registry.services.sessions.count() == 0


async def test_a_refused_manifest_keeps_an_object_that_stood_at_its_key_before(registry):
    # Bytes Wharf cannot prove it wrote (here: another length than the manifest's) are never taken back.
    body = _refused_manifest()
    key = layout.blob_key(digest_of(body))
    await registry.services.storage.write_bytes(key, b"not these bytes")
    response = await registry.http.put(f"/v2/{REPO}/manifests/v1", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    assert (registry.root / "registry" / key).exists()
    assert await registry.services.sessions.count() == 0
