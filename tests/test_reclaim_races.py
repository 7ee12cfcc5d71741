"""A refused upload's reclaim against a twin of the same digest that succeeds, and the purge against a
whole blob still streaming in one request.

Each race is laid out step by step (events in the records' code, never sleeps), so it runs the same
on a busy machine: before, the refused upload deleted the bytes its twin had just written at the
blob's key, and the twin was then acknowledged with 201 for a blob whose bytes were gone.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from inprocess import InProcessRegistry
from oci_client import digest_of

from coordinator import keys
from coordinator.metadata import Metadata
from coordinator.uploads import UploadSessions
from node.maintenance import Maintenance
from node.storage import layout

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[InProcessRegistry]:
    made = InProcessRegistry(tmp_path, quotas=[{"repository": "q/full", "limit": "1KiB"}])
    try:
        yield made
    finally:
        await made.close()


async def _within(awaitable: Any) -> Any:
    return await asyncio.wait_for(awaitable, 60)


def _after_create(monkeypatch: Any, repository: str, made: asyncio.Event, until: asyncio.Event | None = None) -> None:
    """Once a session of `repository` is recorded (its look at the key done), set `made`; then wait for `until`."""
    create = UploadSessions.create

    async def told(self: UploadSessions, upload_id: str, repo: str, *args: Any, **kwargs: Any) -> Any:
        session = await create(self, upload_id, repo, *args, **kwargs)
        if repo == repository:
            made.set()
            if until is not None:
                await until.wait()
        return session

    monkeypatch.setattr(UploadSessions, "create", told)


def _before(monkeypatch: Any, name: str, repository: str, there: asyncio.Event, go: asyncio.Event) -> None:
    """Metadata.`name` for `repository` sets `there`, then waits for `go` before it records anything."""
    original = getattr(Metadata, name)

    async def held(self: Metadata, repo: str, *args: Any, **kwargs: Any) -> Any:
        if repo == repository:
            there.set()
            await go.wait()
        return await original(self, repo, *args, **kwargs)

    monkeypatch.setattr(Metadata, name, held)


async def test_a_refused_upload_leaves_the_bytes_its_twin_wrote(registry: InProcessRegistry, monkeypatch):
    """B (a repository over its quota) looks at D's key first: empty. A (another repository) writes
    D there and stops just before its record. B's commit is refused and reclaimed, then A records."""
    data = bytes(range(256)) * 12  # 3 KiB: over q/full's 1 KiB
    digest = digest_of(data)
    b_intent, a_at_record, a_may_record = asyncio.Event(), asyncio.Event(), asyncio.Event()
    _after_create(monkeypatch, "q/full", b_intent)  # B has looked at D's key (empty), recorded its intent
    _before(monkeypatch, "commit_blob", "keep/y", a_at_record, a_may_record)

    async def slow_body() -> AsyncIterator[bytes]:
        # No Content-Length: the quota cannot refuse B before its bytes are written.
        yield data[:1000]
        await a_at_record.wait()
        yield data[1000:]

    b = asyncio.create_task(
        registry.http.post("/v2/q/full/blobs/uploads/", params={"digest": digest}, content=slow_body())
    )
    await _within(b_intent.wait())
    a = asyncio.create_task(registry.push_blob("keep/y", data))
    refused = await _within(b)
    assert refused.status_code == 403 and refused.json()["errors"][0]["code"] == "DENIED", refused.text
    a_may_record.set()
    accepted = await _within(a)
    assert accepted.status_code == 201, accepted.text
    pulled = await registry.http.get(f"/v2/keep/y/blobs/{digest}")
    assert pulled.status_code == 200, pulled.text
    assert pulled.content == data
    # Both sessions ended, and with them what said they were committing.
    assert await registry.kv.range(keys.UPLOADS) == []
    assert await registry.kv.range(keys.UPLOAD_COMMITS) == []


async def test_a_refused_manifest_leaves_the_bytes_its_twin_wrote(registry: InProcessRegistry, monkeypatch):
    """The same manifest into two repositories: m/bad lacks its layer (MANIFEST_BLOB_UNKNOWN), ok/y has
    it. m/bad records its intent first (D's key empty), ok/y writes D and waits before its record."""
    config = await registry.blob("ok/y", b"{}")
    layer = await registry.blob("ok/y", b"layer bytes")
    await registry.blob("m/bad", b"{}")
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 11}],
    }
    body = json.dumps(doc).encode()
    digest = digest_of(body)
    b_intent, a_at_record, a_may_record = asyncio.Event(), asyncio.Event(), asyncio.Event()
    _after_create(monkeypatch, "m/bad", b_intent, until=a_at_record)
    _before(monkeypatch, "put_manifest", "ok/y", a_at_record, a_may_record)
    headers = {"Content-Type": OCI_MANIFEST}
    b = asyncio.create_task(registry.http.put("/v2/m/bad/manifests/v1", content=body, headers=headers))
    await _within(b_intent.wait())
    a = asyncio.create_task(registry.http.put("/v2/ok/y/manifests/v1", content=body, headers=headers))
    refused = await _within(b)
    assert refused.status_code == 400, refused.text
    assert refused.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"
    a_may_record.set()
    accepted = await _within(a)
    assert accepted.status_code == 201, accepted.text
    # The bytes themselves, not a node's memory of them: another node reads them from storage.
    assert await registry.services.storage.stat(layout.blob_key(digest)) == len(body)
    for reference in ("v1", digest):
        pulled = await registry.http.get(f"/v2/ok/y/manifests/{reference}", headers={"Accept": OCI_MANIFEST})
        assert pulled.status_code == 200, pulled.text
        assert pulled.content == body
    assert await registry.kv.range(keys.UPLOADS) == []
    assert await registry.kv.range(keys.UPLOAD_COMMITS) == []


async def test_the_purge_leaves_a_whole_blob_still_streaming_in_one_request(registry: InProcessRegistry):
    """A POST with ?digest= whose body takes longer than the idle limit is not abandoned."""
    data = b"streamed slowly " * 256
    digest = digest_of(data)
    halfway, go_on = asyncio.Event(), asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield data[:100]
        halfway.set()
        await go_on.wait()
        yield data[100:]

    post = asyncio.create_task(
        registry.http.post("/v2/team/app/blobs/uploads/", params={"digest": digest}, content=slow_body())
    )
    await _within(halfway.wait())
    # A purge a year later: the session is older than any idle limit, but its request holds it.
    assert await Maintenance(registry.services).purge_uploads(now=time.time() + 365 * 86400) == 0
    go_on.set()
    done = await _within(post)
    assert done.status_code == 201, done.text
    pulled = await registry.http.get(f"/v2/team/app/blobs/{digest}")
    assert pulled.status_code == 200 and pulled.content == data
    # The session and its claim are gone with the commit: nothing is left for a purge.
    assert await registry.kv.range(keys.UPLOADS) == []
    assert await registry.kv.range(keys.upload_claim("")) == []
    assert await registry.kv.range(keys.UPLOAD_COMMITS) == []
    assert await Maintenance(registry.services).purge_uploads(now=time.time() + 365 * 86400) == 0
