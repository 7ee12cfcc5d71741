"""Regions in one process: two regions on filesystem storage sharing one embedded coordinator.

Each region is a registry app with its own storage root and the other region's root under
`regions:`; copies are made by calling the worker directly, so every step is seen. The same code
runs between real Ceph RGW clusters behind HAProxy in tests/test_cluster_regions.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from oci_client import OCI_MANIFEST, digest_of

from coordinator import keys
from coordinator.embedded import EmbeddedKV
from coordinator.kv import KV
from coordinator.quota import QuotaScope
from coordinator.quota import usage as quota_usage
from node import gc
from node.app import create_app
from node.config import Config, load
from node.regions import Region
from node.replication import Bandwidth, CopyRefused, Leader, Worker, report
from node.services import Services
from node.storage import layout
from node.storage.filesystem import FilesystemDriver
from node.store import StoreRefused, check_identity

REPO = "team/app"


def _config(tmp_path: Path, region: str, other: str, **sections: Any) -> Config:
    text = {
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / region)}, "delete": {"enabled": True}},
        "coordinator": {"embedded": {"path": str(tmp_path / "kv.db")}},
        "gc": {"grace": "0s"},
        "http": {"debug": {"addr": ""}},
        "cluster": {"region": region, "node": f"node-{region}"},
        "regions": {other: {"storage": {"filesystem": {"rootdirectory": str(tmp_path / other)}}}},
        **sections,
    }
    path = tmp_path / f"{region}.yml"
    path.write_text(yaml.safe_dump(text))
    return load(str(path), environ={})


@dataclass
class Node:
    services: Services
    http: httpx.AsyncClient
    root: Path

    @property
    def region(self) -> str:
        assert self.services.regions is not None
        return self.services.regions.name

    def has(self, key: str) -> bool:
        return (self.root / key).is_file()


async def _node(tmp_path: Path, kv: KV, region: str, other: str, **sections: Any) -> Node:
    config = _config(tmp_path, region, other, **sections)
    storage = FilesystemDriver(str(tmp_path / region))
    await check_identity(kv, storage, config, "serve")
    services = Services.build(config, kv, storage)
    http = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(config, services=services)), base_url="http://wharf"
    )
    return Node(services, http, tmp_path / region)


@dataclass
class TwoRegions:
    kv: KV
    a: Node
    b: Node


@pytest.fixture()
async def regions(tmp_path: Path) -> AsyncIterator[TwoRegions]:
    kv = EmbeddedKV(str(tmp_path / "kv.db"))
    a = await _node(tmp_path, kv, "a", "b")
    b = await _node(tmp_path, kv, "b", "a")
    yield TwoRegions(kv, a, b)
    for node in (a, b):
        await node.http.aclose()
        await node.services.close()


async def _push_blob(node: Node, data: bytes, repo: str = REPO) -> str:
    digest = digest_of(data)
    response = await node.http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data)
    assert response.status_code == 201, response.text
    return digest


async def _push_image(node: Node, tag: str, layers: list[bytes], repo: str = REPO) -> tuple[str, list[str]]:
    """(manifest digest, [config digest, layer digests...])."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
    blobs = [config, *layers]
    descs = [
        {"mediaType": "application/octet-stream", "digest": await _push_blob(node, b, repo), "size": len(b)}
        for b in blobs
    ]
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {**descs[0], "mediaType": "application/vnd.oci.image.config.v1+json"},
        "layers": descs[1:],
    }
    body = json.dumps(doc).encode()
    response = await node.http.put(f"/v2/{repo}/manifests/{tag}", content=body, headers={"Content-Type": OCI_MANIFEST})
    assert response.status_code == 201, response.text
    return digest_of(body), [d["digest"] for d in descs]


async def _replicate(node: Node) -> list[str | None]:
    """Make every copy `node`'s region owes the others, as its worker would; what each copy did."""
    services = node.services
    assert services.regions is not None
    worker = Worker(services)
    done = []
    for target in services.regions.others:
        assert await worker._may_write(target)
        entries, _ = await services.regions.replication.waiting(target.name, limit=1000)
        for entry in entries:
            done.append(await worker.copy(target, entry))
    return done


def _fallbacks(node: Node, region: str) -> float:
    value = node.services.metrics.registry.get_sample_value("wharf_region_fallback_reads_total", {"region": region})
    node.services.metrics.flush()
    return value or 0.0


async def test_a_pull_in_the_other_region_is_served_from_the_pushing_one_until_the_copy_is_made(regions):
    data = os.urandom(200_000)
    manifest, blobs = await _push_image(regions.a, "v1", [data])
    layer = blobs[1]
    assert not regions.b.has(layout.blob_key(layer))
    # Right after the push: region b reads from a (the manifest and the blob), byte-identical.
    got = await regions.b.http.get(f"/v2/{REPO}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert got.status_code == 200 and digest_of(got.content) == manifest
    pulled = await regions.b.http.get(f"/v2/{REPO}/blobs/{layer}")
    assert pulled.status_code == 200 and pulled.content == data
    ranged = await regions.b.http.get(f"/v2/{REPO}/blobs/{layer}", headers={"Range": "bytes=10-19"})
    assert ranged.status_code == 206 and ranged.content == data[10:20]
    regions.b.services.metrics.flush()
    served_from_a = _fallbacks(regions.b, "a")
    assert served_from_a >= 3
    # What b still lacks is queued for it, in the records of the push.
    queued = {e.digest for e in (await regions.a.services.regions.replication.waiting("b", limit=100))[0]}
    assert queued == {manifest, *blobs}
    assert set(await _replicate(regions.a)) == {"copied"}
    assert (await regions.a.services.regions.replication.waiting("b", limit=100))[0] == []
    for digest in (manifest, *blobs):
        assert regions.b.has(layout.blob_key(digest))
        assert {c.region for c in await regions.a.services.regions.replication.copies(digest)} == {"a", "b"}
    # Once copied, b reads its own copy: the pushing region's could even be gone.
    os.remove(regions.a.root / layout.blob_key(layer))
    again = await regions.b.http.get(f"/v2/{REPO}/blobs/{layer}")
    assert again.status_code == 200 and again.content == data
    assert _fallbacks(regions.b, "a") == served_from_a


async def test_a_copy_found_in_the_target_already_is_recorded_without_writing_it_again(regions):
    data = os.urandom(50_000)
    digest = await _push_blob(regions.a, data)
    key = layout.blob_key(digest)
    # A worker that wrote the copy and died before recording it.
    (regions.b.root / key).parent.mkdir(parents=True)
    (regions.b.root / key).write_bytes(data)
    before = os.stat(regions.b.root / key).st_mtime_ns
    assert await _replicate(regions.a) == ["present"]
    assert os.stat(regions.b.root / key).st_mtime_ns == before
    assert {c.region for c in await regions.a.services.regions.replication.copies(digest)} == {"a", "b"}


async def test_bytes_that_do_not_match_their_digest_are_never_committed_in_the_target(regions):
    data = os.urandom(50_000)
    digest = await _push_blob(regions.a, data)
    (regions.a.root / layout.blob_key(digest)).write_bytes(os.urandom(len(data)))  # bit rot in region a
    worker = Worker(regions.a.services)
    target = regions.a.services.regions.others[0]
    entries, _ = await regions.a.services.regions.replication.waiting("b", limit=10)
    with pytest.raises(CopyRefused):
        await worker.copy(target, entries[0])
    assert not regions.b.has(layout.blob_key(digest))
    assert not any(p.name.startswith(".tmp-") for p in (regions.b.root / layout.blob_key(digest)).parent.glob("*"))
    # The claim was given back and the entry stays for a repaired source.
    assert await regions.kv.get(keys.replication_copying(digest, "b")) is None
    assert await regions.kv.get(keys.replication_queued("b", digest)) is not None


async def test_a_claim_whose_node_died_lapses_and_the_copy_is_taken_again(regions):
    digest = await _push_blob(regions.a, os.urandom(10_000))
    replication = regions.a.services.regions.replication
    entry = (await replication.waiting("b", limit=10))[0][0]
    dead = await regions.kv.grant_lease(5)
    claimed = await replication.claim(entry, "a-node-that-dies", dead)
    assert not isinstance(claimed, str)
    assert await replication.claim(entry, "another", await regions.kv.grant_lease(5)) == "busy"
    await regions.kv.revoke_lease(dead)  # its lease ends as a SIGKILLed node's would
    assert await _replicate(regions.a) == ["copied"]
    assert regions.b.has(layout.blob_key(digest))


async def test_gc_deletes_a_blob_from_every_region_and_never_while_a_copy_is_being_made(regions):
    kept_manifest, kept = await _push_image(regions.a, "keep", [os.urandom(30_000)])
    doomed_manifest, doomed = await _push_image(regions.a, "doomed", [os.urandom(30_000)])
    await _replicate(regions.a)
    response = await regions.a.http.delete(f"/v2/{REPO}/manifests/{doomed_manifest}")
    assert response.status_code == 202
    layer = doomed[1]
    # A copy of the doomed layer still under way (queued again and claimed, as after a new push).
    replication = regions.a.services.regions.replication
    await replication.enqueue(layer, 30_000, "a", layout.blob_key(layer), ["b"])
    entry = next(e for e in (await replication.waiting("b", limit=10))[0] if e.digest == layer)
    await regions.kv.delete(keys.region_copy(layer, "b", layout.blob_key(layer)))
    claimed = await replication.claim(entry, "a-node", await regions.kv.grant_lease(30))
    assert not isinstance(claimed, str)
    summary = await gc.collect(regions.a.services, orphans=False)
    assert summary.blobs_saved_by_pushes == 1
    assert regions.a.has(layout.blob_key(layer))
    await replication.release(claimed)
    summary = await gc.collect(regions.b.services, orphans=False)  # any region's leader collects
    assert summary.blobs_deleted >= 1
    for digest in [doomed_manifest, *doomed]:
        if digest == doomed[0]:
            continue  # the config blob of every image here differs, so it went too
        assert not regions.a.has(layout.blob_key(digest)), digest
        assert not regions.b.has(layout.blob_key(digest)), digest
        assert await replication.copies(digest) == []
        assert await regions.kv.get(keys.replication_queued("b", digest)) is None
    for digest in [kept_manifest, *kept]:
        assert regions.a.has(layout.blob_key(digest)) and regions.b.has(layout.blob_key(digest))
    pulled = await regions.b.http.get(f"/v2/{REPO}/manifests/keep", headers={"Accept": OCI_MANIFEST})
    assert pulled.status_code == 200


async def test_a_copy_recorded_after_gc_read_the_copies_stops_that_deletion(regions, monkeypatch):
    digest = await _push_blob(regions.a, os.urandom(20_000))
    assert (await regions.a.http.delete(f"/v2/{REPO}/blobs/{digest}")).status_code == 202
    own_regions = regions.a.services.regions
    original = own_regions.fence

    async def late(d: str) -> Any:
        """b's copy lands between the fence's read of the copies and GC's transaction."""
        found = await original(d)
        await _replicate(regions.a)
        return found

    monkeypatch.setattr(own_regions, "fence", late)
    summary = await gc.collect(regions.a.services, orphans=False)
    assert summary.blobs_deleted == 0 and regions.b.has(layout.blob_key(digest))
    monkeypatch.undo()
    summary = await gc.collect(regions.a.services, orphans=False)
    assert summary.blobs_deleted == 1
    assert not regions.a.has(layout.blob_key(digest)) and not regions.b.has(layout.blob_key(digest))
    assert await own_regions.replication.copies(digest) == []


async def test_quotas_count_a_replicated_blob_once(tmp_path):
    kv = EmbeddedKV(str(tmp_path / "kv.db"))
    quotas = {"quotas": [{"repository": REPO, "limit": "1MiB"}]}
    a = await _node(tmp_path, kv, "a", "b", **quotas)
    b = await _node(tmp_path, kv, "b", "a", **quotas)
    try:
        data = os.urandom(100_000)
        await _push_blob(a, data)
        await _replicate(a)
        await _push_blob(b, data)  # pushed again in the other region: the same link, the same bytes
        scope = QuotaScope(REPO, 1024 * 1024, REPO)
        assert await quota_usage(kv, scope) == len(data)
    finally:
        for node in (a, b):
            await node.http.aclose()
            await node.services.close()


async def test_blobs_from_before_regions_are_served_and_placed_by_the_backfill(tmp_path):
    # One region, as every store was before: no copy records.
    kv = EmbeddedKV(str(tmp_path / "kv.db"))
    single = _config(tmp_path, "a", "b")
    single.regions = {}
    storage = FilesystemDriver(str(tmp_path / "a"))
    await check_identity(kv, storage, single, "serve")
    services = Services.build(single, kv, storage)
    old = Node(
        services,
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(single, services=services)), base_url="http://w"
        ),
        tmp_path / "a",
    )
    manifest, blobs = await _push_image(old, "old", [os.urandom(40_000)])
    assert await kv.range(keys.REGION_COPIES) == []
    await old.http.aclose()
    await old.services.close()
    kv = EmbeddedKV(str(tmp_path / "kv.db"))
    a = await _node(tmp_path, kv, "a", "b")
    b = await _node(tmp_path, kv, "b", "a")  # joins the store: its storage is new and empty
    try:
        pulled = await b.http.get(f"/v2/{REPO}/blobs/{blobs[1]}")
        assert pulled.status_code == 200 and digest_of(pulled.content) == blobs[1]
        assert await Leader(a.services).backfill() == 1 + len(blobs)
        assert await Leader(a.services).backfill() == 0  # placed: nothing more to do
        assert set(await _replicate(a)) == {"copied"}
        for digest in (manifest, *blobs):
            assert b.has(layout.blob_key(digest))
        found = await report(b.services, f"{REPO}:old")
        assert all(row["complete"] for row in found["image"]["regions"])  # type: ignore[index]
    finally:
        for node in (a, b):
            await node.http.aclose()
            await node.services.close()


async def test_status_says_in_which_regions_an_image_is_whole(regions):
    _, blobs = await _push_image(regions.a, "v2", [os.urandom(10_000), os.urandom(20_000)])
    found = await report(regions.b.services, f"{REPO}:v2")
    image = found["image"]
    assert isinstance(image, dict) and image["objects"] == 4
    rows = {row["region"]: row for row in image["regions"]}
    assert rows["a"]["complete"] and not rows["b"]["complete"]
    assert rows["b"]["missing"] == 4 and rows["b"]["queued"] == 4
    lag = {row["region"]: row for row in found["regions"]}  # type: ignore[attr-defined]
    assert lag["b"]["waiting"] == 4 and lag["b"]["waiting_bytes"] > 30_000 and lag["a"]["waiting"] == 0
    await _replicate(regions.a)
    found = await report(regions.b.services, f"{REPO}:v2")
    assert all(row["complete"] for row in found["image"]["regions"])  # type: ignore[index]
    assert all(row["waiting"] == 0 for row in found["regions"])  # type: ignore[attr-defined]


async def test_a_region_whose_storage_fails_reads_from_the_other_and_readiness_says_so(regions, monkeypatch):
    data = os.urandom(30_000)
    digest = await _push_blob(regions.b, data)
    await _replicate(regions.b)
    own: Region = regions.b.services.regions.own

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("storage unreachable")

    monkeypatch.setattr(own.storage, "stat", broken)
    monkeypatch.setattr(own.storage, "read", broken)
    await regions.b.services.regions.probe(own)
    ready = await regions.b.http.get("/debug/ready")
    assert ready.status_code == 200, ready.text
    body = ready.json()
    assert "pulls are served from region a" in body["fallback"] and body["regions"]["b"].startswith("unreachable")
    pulled = await regions.b.http.get(f"/v2/{REPO}/blobs/{digest}")
    assert pulled.status_code == 200 and pulled.content == data
    monkeypatch.undo()
    await regions.b.services.regions.probe(own)
    ready = await regions.b.http.get("/debug/ready")
    assert ready.status_code == 200 and "fallback" not in ready.json()


async def test_a_new_region_joins_only_with_empty_storage_and_a_joined_one_must_keep_its_identity(tmp_path):
    kv = EmbeddedKV(str(tmp_path / "kv.db"))
    try:
        a = _config(tmp_path, "a", "b")
        await check_identity(kv, FilesystemDriver(str(tmp_path / "a")), a, "serve")
        b = _config(tmp_path, "b", "a")
        stray = tmp_path / "b" / layout.blob_key(digest_of(b"x"))
        stray.parent.mkdir(parents=True)
        stray.write_bytes(b"x")
        with pytest.raises(StoreRefused, match="not empty"):
            await check_identity(kv, FilesystemDriver(str(tmp_path / "b")), b, "serve")
        stray.unlink()
        await check_identity(kv, FilesystemDriver(str(tmp_path / "b")), b, "serve")
        assert (tmp_path / "b" / layout.STORE_IDENTITY).is_file()
        (tmp_path / "b" / layout.STORE_IDENTITY).unlink()
        with pytest.raises(StoreRefused, match="region b is part of store"):
            await check_identity(kv, FilesystemDriver(str(tmp_path / "b")), b, "serve")
    finally:
        await kv.close()


async def test_bandwidth_spreads_a_copy_over_time():
    limit = Bandwidth(4 * 1024 * 1024)
    started = time.monotonic()
    for _ in range(8):
        await limit.take(256 * 1024)
    # 2 MiB at 4 MiB/s, less the burst of a quarter second.
    assert 0.2 < time.monotonic() - started < 2.0
    unlimited = Bandwidth(None)
    started = time.monotonic()
    await asyncio.gather(*(unlimited.take(1 << 30) for _ in range(4)))
    assert time.monotonic() - started < 0.1


def _registry2_image(root: Path, repo: str, tag: str, layer: bytes) -> tuple[str, list[str]]:
    """An image as registry:2 writes it into its filesystem tree: blobs, layer links, revision, tag."""
    config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest_of(config),
            "size": len(config),
        },
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest_of(layer), "size": len(layer)}
        ],
    }
    manifest = json.dumps(doc).encode()

    def put(key: str, data: bytes) -> None:
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)

    for data in (config, layer, manifest):
        put(layout.blob_key(digest_of(data)), data)
    for data in (config, layer):
        put(layout.layer_link_key(repo, digest_of(data)), digest_of(data).encode())
    put(layout.revision_link_key(repo, digest_of(manifest)), digest_of(manifest).encode())
    put(layout.tag_current_key(repo, tag), digest_of(manifest).encode())
    put(layout.tag_index_key(repo, tag, digest_of(manifest)), digest_of(manifest).encode())
    return digest_of(manifest), [digest_of(config), digest_of(layer)]


async def test_an_adopted_registry2_store_is_replicated_into_every_region(tmp_path):
    from node import importer

    manifest, blobs = _registry2_image(tmp_path / "a", REPO, "adopted", os.urandom(30_000))
    kv = EmbeddedKV(str(tmp_path / "kv.db"))
    a = await _node(tmp_path, kv, "a", "b")  # first start on a registry:2 tree: adoption pending
    b = await _node(tmp_path, kv, "b", "a")
    try:
        await importer.import_if_pending(a.services)
        assert (await a.services.metadata.import_state()).state == "done"  # type: ignore[union-attr]
        assert await Leader(a.services).backfill() == 1 + len(blobs)
        assert set(await _replicate(a)) == {"copied"}
        for digest in (manifest, *blobs):
            assert b.has(layout.blob_key(digest))
        pulled = await b.http.get(f"/v2/{REPO}/manifests/adopted", headers={"Accept": OCI_MANIFEST})
        assert pulled.status_code == 200 and digest_of(pulled.content) == manifest
    finally:
        for node in (a, b):
            await node.http.aclose()
            await node.services.close()


async def test_the_leaders_snapshots_go_into_every_regions_storage(regions):
    from node import backup

    await _push_image(regions.a, "snap", [os.urandom(5_000)])
    task = asyncio.get_running_loop().create_task(backup.scheduled(regions.a.services))
    try:
        snapshots = regions.b.root / layout.SNAPSHOTS

        async def copied() -> list[Path]:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                found = list(snapshots.glob("*.jsonl.gz")) if snapshots.is_dir() else []
                if found:
                    return found
                await asyncio.sleep(0.1)
            raise TimeoutError("no snapshot in region b's storage")

        found = await copied()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    own = list((regions.a.root / layout.SNAPSHOTS).glob("*.jsonl.gz"))
    assert [p.name for p in found] == [p.name for p in own]
    assert found[0].read_bytes() == own[0].read_bytes()


async def test_immutability_and_retention_act_once_for_every_region(tmp_path):
    from node import retention

    rules = {
        "immutability": [{"repositories": [REPO], "tags": ["v.*"], "name": "releases"}],
        "retention": {"enabled": False, "policies": [{"repositories": [REPO], "keeplast": 1, "untaggedafter": "0s"}]},
    }
    kv = EmbeddedKV(str(tmp_path / "kv.db"))
    a = await _node(tmp_path, kv, "a", "b", **rules)
    b = await _node(tmp_path, kv, "b", "a", **rules)
    try:
        release, _ = await _push_image(a, "v1", [os.urandom(10_000)])
        # The tag pushed in a is immutable in b too: neither moved nor deleted there.
        with pytest.raises(AssertionError, match="DENIED"):
            await _push_image(b, "v1", [os.urandom(10_000)])
        assert (await b.http.delete(f"/v2/{REPO}/manifests/v1")).status_code == 403
        old, old_blobs = await _push_image(a, "old", [os.urandom(20_000)])
        await _push_image(b, "new", [os.urandom(20_000)])
        for node in (a, b):
            await _replicate(node)
        assert all(b.has(layout.blob_key(d)) for d in old_blobs)
        # Retention applied from region b removes the tag pushed in a; applied again from a, nothing is left to do.
        first = await retention.apply(b.services)
        assert first.result is not None and [(t.repository, t.tag) for t in first.plan.tags] == [(REPO, "old")]
        again = await retention.apply(a.services)
        assert again.plan.rows() == []
        for node in (a, b):
            got = await node.http.get(f"/v2/{REPO}/manifests/old", headers={"Accept": OCI_MANIFEST})
            assert got.status_code == 404
            kept = await node.http.get(f"/v2/{REPO}/manifests/v1", headers={"Accept": OCI_MANIFEST})
            assert kept.status_code == 200 and digest_of(kept.content) == release
        # What retention removed goes from both regions' storage in one collection.
        await gc.collect(a.services, orphans=False)
        for node in (a, b):
            assert not node.has(layout.blob_key(old_blobs[1])) and not node.has(layout.blob_key(old))
    finally:
        for node in (a, b):
            await node.http.aclose()
            await node.services.close()
