"""Online garbage collection: what goes, what stays, and pushes that race a cycle."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from inprocess import InProcessRegistry
from oci_client import OCI_INDEX, OCI_MANIFEST, digest_of

from coordinator import gc as coordinator_gc
from coordinator import keys
from coordinator.gc import Collector
from coordinator.quota import QuotaScope
from coordinator.quota import usage as quota_usage
from coordinator.runlock import run_lock
from coordinator.uploads import CommitIntent
from node import exporter, gc
from node.config import load
from node.maintenance import Maintenance
from node.storage import layout
from node.storage.s3 import S3Driver
from node.store import open_store

ANY = {"Accept": "*/*"}


class Registry(InProcessRegistry):
    def __init__(self, root: Path, grace: str = "0s", delete_untagged: bool = False, **kwargs: Any) -> None:
        super().__init__(root, gc={"grace": grace, "deleteuntagged": delete_untagged}, **kwargs)

    async def image(self, repo: str, tag: str | None, layers: list[bytes], **fields) -> tuple[str, bytes]:
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "n": [digest_of(layer) for layer in layers]}
        ).encode()
        descs = []
        for blob in [config, *layers]:
            descs.append(
                {"mediaType": "application/octet-stream", "digest": await self.blob(repo, blob), "size": len(blob)}
            )
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {**descs[0], "mediaType": "application/vnd.oci.image.config.v1+json"},
            "layers": descs[1:],
            **fields,
        }
        return await self.manifest(repo, tag, doc)

    async def manifest(self, repo: str, tag: str | None, doc: dict) -> tuple[str, bytes]:
        return await self.put_manifest(repo, tag, doc)

    async def blob_status(self, repo: str, digest: str) -> int:
        return (await self.http.head(f"/v2/{repo}/blobs/{digest}")).status_code


@pytest.fixture()
async def registry(tmp_path):
    reg = Registry(tmp_path)
    yield reg
    await reg.close()


async def _snapshot(reg: Registry) -> tuple[list, list]:
    kv = [(k.key, k.value) for k in await reg.kv.range("")]
    files = sorted(str(p.relative_to(reg.root)) for p in (reg.root / "registry").rglob("*") if p.is_file())
    return kv, files


async def test_deleting_half_the_images_reclaims_their_bytes_and_keeps_shared_layers(registry):
    base = os.urandom(50_000)
    own = {n: os.urandom(20_000 + n) for n in range(4)}
    digests = {}
    for n in range(4):
        digests[n], _ = await registry.image("team/app", f"v{n}", [base, own[n]])
    before = registry.stored_bytes()
    for n in (0, 1):
        assert (await registry.http.delete(f"/v2/team/app/manifests/{digests[n]}")).status_code == 202
    summary = await gc.collect(registry.services)
    assert summary.manifests_deleted == 0
    assert summary.blobs_deleted == 2 + 2 + 2  # own layers, configs and manifest blobs of v0, v1
    assert before - registry.stored_bytes() == summary.bytes_freed
    assert summary.bytes_freed >= len(own[0]) + len(own[1])
    for n in (2, 3):
        r = await registry.http.get(f"/v2/team/app/manifests/v{n}", headers=ANY)
        assert r.status_code == 200
        for layer in json.loads(r.content)["layers"]:
            assert await registry.blob_status("team/app", layer["digest"]) == 200
    assert await registry.blob_status("team/app", digest_of(base)) == 200
    assert await registry.blob_status("team/app", digest_of(own[0])) == 404


@pytest.mark.parametrize("server", ["s3_server", "rgw_server"], ids=["moto", "rgw"])
async def test_deleting_half_the_images_on_s3_drops_the_bucket_bytes_and_keeps_shared_layers(tmp_path, request, server):
    s3_server = request.getfixturevalue(server)
    storage = s3_server.storage_config()
    reg = Registry(tmp_path, storage=S3Driver(storage))
    client = s3_server.client()

    def bucket_bytes() -> int:
        total = 0
        prefix = storage.rootdirectory.strip("/") + "/"
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket, Prefix=prefix):
            total += sum(item["Size"] for item in page.get("Contents", []))
        return total

    try:
        base = os.urandom(60_000)
        own = {n: os.urandom(30_000 + n) for n in range(4)}
        digests = {n: (await reg.image("team/app", f"v{n}", [base, own[n]]))[0] for n in range(4)}
        before = bucket_bytes()
        expected = 0
        for n in (0, 1):
            manifest = await reg.http.get(f"/v2/team/app/manifests/{digests[n]}", headers=ANY)
            doc = json.loads(manifest.content)
            expected += len(manifest.content) + doc["config"]["size"] + len(own[n])
            assert (await reg.http.delete(f"/v2/team/app/manifests/{digests[n]}")).status_code == 202
        summary = await gc.collect(reg.services)
        assert before - bucket_bytes() == expected == summary.bytes_freed
        for n in (2, 3):
            assert (await reg.http.get(f"/v2/team/app/manifests/v{n}", headers=ANY)).status_code == 200
        assert (await reg.http.get(f"/v2/team/app/blobs/{digest_of(base)}")).status_code in (200, 307)
    finally:
        await reg.close()
        s3_server.remove_prefix(storage.rootdirectory)


async def test_sweep_sends_storage_deletes_in_batches(registry):
    for n in range(40):
        await registry.blob("team/app", os.urandom(100 + n))
    batches: list[int] = []
    storage = registry.services.storage

    async def counting(keys: list[str]) -> None:
        batches.append(len(keys))
        await storage.delete_many(keys)

    summary = await Collector(registry.kv, grace=0, address=registry.services.metadata.address).run(
        storage.delete, counting
    )
    assert summary.blobs_deleted == 40 and sum(batches) == 40
    assert len(batches) < 10, batches
    assert registry.stored_bytes() == 0


async def test_a_blob_linked_from_more_repositories_than_one_transaction_holds_goes_with_every_link(tmp_path):
    reg = Registry(tmp_path, quotas=[{"namespace": "team", "limit": "100MiB"}])
    try:
        layer = os.urandom(1000)
        repositories = 300  # more links than a transaction holds operations (kv.MAX_TXN_OPS)
        for n in range(repositories):
            await reg.blob(f"team/r{n}", layer)
        scope = QuotaScope("team/", 0, "team/")
        assert await quota_usage(reg.kv, scope) == repositories * len(layer)
        summary = await gc.collect(reg.services)
        assert summary.blobs_deleted == 1 and summary.bytes_freed == len(layer)
        assert await reg.kv.range(keys.LINKS) == []
        assert await quota_usage(reg.kv, scope) == 0
        assert reg.stored_bytes() == 0
    finally:
        await reg.close()


async def test_dry_run_changes_nothing_and_reports_what_a_real_run_deletes(registry):
    digest, _ = await registry.image("team/app", "v1", [os.urandom(1000)])
    await registry.image("team/app", "v2", [os.urandom(1000)])
    await registry.http.delete(f"/v2/team/app/manifests/{digest}")
    await registry.blob("team/app", os.urandom(500))  # linked, never used
    before = await _snapshot(registry)
    dry = await gc.collect(registry.services, dry_run=True)
    assert await _snapshot(registry) == before
    real = await gc.collect(registry.services)
    assert sorted(dry.deleted) == sorted(real.deleted)
    assert dry.bytes_freed == real.bytes_freed


async def test_blobs_within_the_grace_period_are_kept(tmp_path):
    reg = Registry(tmp_path, grace="1h")
    try:
        digest = await reg.blob("team/app", b"just uploaded, no manifest yet")
        summary = await gc.collect(reg.services)
        assert summary.blobs_deleted == 0
        assert await reg.blob_status("team/app", digest) == 200
    finally:
        await reg.close()


async def test_a_manifest_push_that_uses_a_pending_blob_wins_over_the_collection(registry):
    layer = os.urandom(1000)
    digest = await registry.blob("team/app", layer)
    collector = Collector(registry.kv, grace=0, address=registry.services.metadata.address)
    pushed = False

    async def delete_object(key: str) -> None:
        raise AssertionError(f"deleted {key} that a push used")

    original = collector._delete_blob

    async def push_then_delete(candidate, delete):
        nonlocal pushed
        if not pushed:
            pushed = True
            await registry.image("team/app", "v1", [layer])
        return await original(candidate, delete)

    collector._delete_blob = push_then_delete  # type: ignore[method-assign]
    summary = await collector.run(delete_object)
    assert pushed and summary.blobs_saved_by_pushes >= 1
    assert await registry.blob_status("team/app", digest) == 200
    assert await registry.kv.get(keys.pending_blob(digest)) is None


async def test_a_blob_head_after_mark_saves_it_from_deletion(registry):
    digest = await registry.blob("team/app", os.urandom(1000))
    collector = Collector(registry.kv, grace=0, address=registry.services.metadata.address)
    original = collector._delete_blob

    async def head_then_delete(candidate, delete):
        await registry.services.metadata.touch(candidate.digest)
        return await original(candidate, delete)

    collector._delete_blob = head_then_delete  # type: ignore[method-assign]

    async def delete_object(key: str) -> None:
        raise AssertionError("a touched blob was deleted")

    await collector.run(delete_object)
    assert await registry.blob_status("team/app", digest) == 200


async def test_a_manifest_written_between_mark_and_pending_marks_is_seen_by_the_rescan(registry):
    layer = os.urandom(1000)
    digest = await registry.blob("team/app", layer)
    collector = Collector(registry.kv, grace=0, address=registry.services.metadata.address)
    original = collector._pend_blob

    async def push_then_pend(candidate):
        await registry.image("team/app", "v1", [layer])  # before the mark exists: nothing to delete
        await original(candidate)

    collector._pend_blob = push_then_pend  # type: ignore[method-assign]

    async def delete_object(key: str) -> None:
        raise AssertionError("a blob used by a new manifest was deleted")

    await collector.run(delete_object)
    assert await registry.blob_status("team/app", digest) == 200


async def test_untagged_manifests_go_only_with_delete_untagged_and_index_children_stay(tmp_path):
    reg = Registry(tmp_path, delete_untagged=True)
    try:
        amd, amd_body = await reg.image("team/app", None, [os.urandom(100)])
        arm, arm_body = await reg.image("team/app", None, [os.urandom(100)])
        index = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": amd,
                    "size": len(amd_body),
                    "platform": {"architecture": "amd64", "os": "linux"},
                },
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": arm,
                    "size": len(arm_body),
                    "platform": {"architecture": "arm64", "os": "linux"},
                },
            ],
        }
        await reg.manifest("team/app", "multi", index)
        loose, _ = await reg.image("team/app", None, [os.urandom(100)])
        summary = await gc.collect(reg.services)
        assert summary.manifests_deleted == 1
        assert (await reg.http.head(f"/v2/team/app/manifests/{loose}", headers=ANY)).status_code == 404
        for child in (amd, arm):
            assert (await reg.http.head(f"/v2/team/app/manifests/{child}", headers=ANY)).status_code == 200
    finally:
        await reg.close()


async def test_referrers_follow_their_subject_unless_tagged(registry):
    subject, subject_body = await registry.image("team/app", "v1", [os.urandom(100)])
    subject_desc = {"mediaType": OCI_MANIFEST, "digest": subject, "size": len(subject_body)}
    signature, _ = await registry.image(
        "team/app", None, [os.urandom(100)], subject=subject_desc, artifactType="application/vnd.dev.sigstore"
    )
    sbom, _ = await registry.image("team/app", None, [os.urandom(100)], subject=subject_desc, artifactType="x/sbom")
    await registry.http.put(
        "/v2/team/app/manifests/sbom-keep",
        content=(await registry.http.get(f"/v2/team/app/manifests/{sbom}", headers=ANY)).content,
        headers={"Content-Type": OCI_MANIFEST},
    )
    summary = await gc.collect(registry.services)
    assert summary.manifests_deleted == 0, "referrers of a live subject stay"
    await registry.http.delete(f"/v2/team/app/manifests/{subject}")
    summary = await gc.collect(registry.services)
    assert f"team/app@{signature}" in summary.deleted
    assert f"team/app@{sbom}" not in summary.deleted, "a tagged referrer stays"


async def test_bytes_of_a_refused_manifest_are_reclaimed_at_once_through_their_intent(registry):
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest_of(b"nope"), "size": 4},
        "layers": [],
    }
    r = await registry.http.put(
        "/v2/team/app/manifests/v1", content=json.dumps(doc).encode(), headers={"Content-Type": OCI_MANIFEST}
    )
    assert r.status_code == 400
    assert registry.stored_bytes() == 0, "the refused manifest's bytes went with its intent record"
    assert await registry.kv.range(keys.UPLOADS) == [], "and so did the intent"
    summary = await gc.collect(registry.services)
    assert summary.unaccounted_objects == 0


async def test_explain_names_the_tags_that_keep_a_blob(registry):
    layer = os.urandom(100)
    await registry.image("team/app", "v1", [layer])
    collector = Collector(registry.kv, grace=3600, address=registry.services.metadata.address)
    report = await collector.explain("team/app", digest_of(layer))
    assert report["retained"]
    assert any("team/app@" in reason for reason in report["reasons"])


def test_gc_command_runs_a_cycle_with_dry_run_and_explain(tmp_path):
    root = tmp_path / "registry"
    config = tmp_path / "config.yml"
    config.write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n"
        "gc:\n  grace: 0s\nhttp:\n  debug:\n    addr: ''\n"
    )

    def wharf(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parent.parent,
        )

    nothing = wharf("gc", "--dry-run", str(config))
    assert nothing.returncode == 2 and "no Wharf store" in nothing.stderr
    assert not root.exists(), "a dry run on nothing creates nothing"
    asyncio.run(_create_store(config))
    dry = wharf("gc", "--dry-run", str(config))
    assert dry.returncode == 0, dry.stderr
    assert "would delete" in dry.stdout and "dry run: nothing was changed" in dry.stdout
    # registry:2's flags as Go spells them in cron jobs: `--dry-run=true`, `--delete-untagged=false`.
    go_dry = wharf("garbage-collect", "--dry-run=true", "--delete-untagged=false", str(config))
    assert go_dry.returncode == 0, go_dry.stderr
    assert "dry run: nothing was changed" in go_dry.stdout
    assert wharf("gc", "--dry-run=maybe", str(config)).returncode == 2  # refused, not taken as a real run
    real = wharf("garbage-collect", "-m", str(config))
    assert real.returncode == 0, real.stderr
    assert "deleted: 0 manifests, 0 blobs, 0 unaccounted objects" in real.stdout
    explained = wharf("gc", "--explain", "team/app@sha256:" + "a" * 64, str(config))
    assert explained.returncode == 0 and "unknown here" in explained.stdout


async def test_gc_command_waits_for_a_cycle_another_process_runs_and_gives_up_only_when_told(tmp_path):
    root = tmp_path / "registry"
    config = tmp_path / "config.yml"
    config.write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}\n  delete:\n    enabled: true\n"
        "gc:\n  grace: 0s\nhttp:\n  debug:\n    addr: ''\n"
    )
    command = [sys.executable, "-m", "node.cli", "gc", "--json"]
    cwd = Path(__file__).resolve().parent.parent
    store = await open_store(load(str(config), environ={}), "serve")
    try:
        async with run_lock(store.kv, "gc", "other-node", ttl=30, busy=gc.CycleRunning):
            refused = await asyncio.to_thread(
                subprocess.run,
                [*command, "--wait", "0", str(config)],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=cwd,
            )
            assert refused.returncode == 1 and "already running on other-node" in refused.stderr, refused.stderr
            waiting = subprocess.Popen(
                [*command, "--wait", "120", str(config)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=cwd,
            )
            # It says it waits, and keeps waiting while the other cycle holds the lock.
            line = await asyncio.to_thread(waiting.stderr.readline)
            assert "a cycle is running on other-node; waiting for it to end" in line, line
            assert waiting.poll() is None
        out, err = await asyncio.to_thread(waiting.communicate, timeout=60)
        assert waiting.returncode == 0, err
        assert json.loads(out)["dry_run"] is False
    finally:
        await store.close()


async def _create_store(config: Path) -> None:
    store = await open_store(load(str(config), environ={}), "serve")
    await store.close()


async def test_deleted_images_space_comes_back_at_the_next_cycle_despite_the_grace(tmp_path):
    reg = Registry(tmp_path, grace="1h")
    try:
        base = os.urandom(40_000)
        kept, _ = await reg.image("team/app", "keep", [base, os.urandom(1000)])
        gone, _ = await reg.image("team/app", "gone", [base, os.urandom(30_000)])
        in_flight = await reg.blob("team/app", os.urandom(5000))  # uploaded, no manifest yet
        before = reg.stored_bytes()
        assert (await reg.http.delete(f"/v2/team/app/manifests/{gone}")).status_code == 202
        summary = await gc.collect(reg.services)
        assert summary.blobs_deleted == 3, "the deleted image's own layer, config and manifest go at once"
        assert before - reg.stored_bytes() == summary.bytes_freed > 30_000
        held = {h.reason: h for h in summary.held_back.values()}
        young = held[coordinator_gc.HELD_YOUNG]
        assert young.count == 1 and young.bytes == 5000 and young.until is not None
        assert young.until > summary.started + 3500, "held until the grace ends, and the summary says when"
        assert await reg.blob_status("team/app", in_flight) == 200
        assert (await reg.http.get("/v2/team/app/manifests/keep", headers=ANY)).status_code == 200
        del kept
    finally:
        await reg.close()


async def test_objects_no_record_names_are_reported_and_kept_unless_asked_by_name(registry):
    await registry.image("team/app", "v1", [os.urandom(2000)])
    stray = os.urandom(3000)
    path = registry.root / "registry" / layout.blob_key(digest_of(stray))
    path.parent.mkdir(parents=True)
    path.write_bytes(stray)
    old = path.stat().st_mtime - 7 * 86400
    os.utime(path, (old, old))
    summary = await gc.collect(registry.services)
    assert (summary.unaccounted_objects, summary.unaccounted_bytes) == (1, 3000)
    assert path.read_bytes() == stray, "never deleted: Wharf cannot prove it wrote it"
    report = await Collector(registry.kv, grace=0, address=registry.services.metadata.address).explain(
        None, digest_of(stray)
    )
    assert any("no Wharf record names it" in reason for reason in report["reasons"])
    dry = await gc.collect(registry.services, dry_run=True, delete_unaccounted=True)
    assert dry.orphans_deleted == 1 and path.exists()
    asked = await gc.collect(registry.services, delete_unaccounted=True)
    assert asked.orphans_deleted == 1 and not path.exists()
    assert (await registry.http.get("/v2/team/app/manifests/v1", headers=ANY)).status_code == 200


async def test_an_export_reports_a_blob_whose_bytes_are_gone_and_goes_on(registry):
    # A blob kept where a large S3 upload left it is copied to its content-addressed key by the
    # export; if its bytes are gone, the export names it and writes every other repository's links.
    lost = os.urandom(3000)
    await registry.image("team/lost", "v1", [lost])
    await registry.image("team/fine", "v1", [os.urandom(2000)])
    digest = digest_of(lost)
    addressed = layout.blob_key(digest)
    upload_key = layout.upload_key("team/lost", "4f1c5d2e-0000-4000-8000-00000000000a")
    assert await registry.services.metadata.move_blob(digest, addressed, upload_key)
    (registry.root / "registry" / addressed).unlink()
    dry = await exporter.run_export(registry.services, dry_run=True)
    assert dry.missing == [digest] and dry.blobs_copied == 0
    done = await exporter.run_export(registry.services)
    assert done.missing == [digest] and done.repositories == 2
    fine_tag = registry.root / "registry" / layout.tag_current_key("team/fine", "v1")
    assert fine_tag.exists(), "the other repository's links are written"


async def test_unaccounted_upload_folders_are_registry2s_only(registry):
    # A large S3 upload commits its blob at its upload key; committed after a cycle's mark, no record
    # the mark saw names it and its session is gone. Such bytes, in Wharf's own upload layout, are
    # never judged unaccounted: only registry:2's upload folders (with their `startedat`) are.
    root = registry.root / "registry"
    ours = root / layout.upload_key("team/app", "4f1c5d2e-0000-4000-8000-000000000001")
    theirs = root / layout.upload_key("team/app", "4f1c5d2e-0000-4000-8000-000000000002")
    for path in (ours, theirs):
        path.parent.mkdir(parents=True)
        path.write_bytes(os.urandom(2500))
    (theirs.parent / "startedat").write_text("2024-01-01T00:00:00Z")
    (theirs.parent / "hashstates" / "sha256").mkdir(parents=True)
    (theirs.parent / "hashstates" / "sha256" / "0").write_bytes(b"state")
    summary = await gc.collect(registry.services)
    assert summary.unaccounted_objects == 3, "registry:2's data, startedat and hash state"
    asked = await gc.collect(registry.services, delete_unaccounted=True)
    assert asked.orphans_deleted == 3
    assert ours.exists(), "Wharf's upload bytes are its session's or its record's to account for"
    assert not (theirs.parent / "startedat").exists() and not theirs.exists()


async def test_a_commit_cut_short_is_reclaimed_through_its_intent_and_a_prior_object_is_kept(registry):
    services = registry.services
    mine, theirs = os.urandom(4000), os.urandom(4100)
    for data, existed in ((mine, False), (theirs, True)):
        digest = digest_of(data)
        key = layout.blob_key(digest)
        session = await services.sessions.create(
            services.sessions.new_id(), "team/app", {}, commit=CommitIntent(digest, key, existed)
        )
        # The node died after the bytes reached their key and before the blob record was written.
        await services.storage.write_bytes(key, data)
        assert await services.sessions.get(session.id) is not None
    purged = await Maintenance(services).purge_uploads(now=time.time() + 365 * 86400)
    assert purged == 2
    assert await services.storage.stat(layout.blob_key(digest_of(mine))) is None, "our own bytes went"
    assert await services.storage.stat(layout.blob_key(digest_of(theirs))) == 4100, "an object from before stays"
    assert await registry.kv.range(keys.UPLOADS) == []
