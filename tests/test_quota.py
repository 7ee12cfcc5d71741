"""Quotas: a push that would cross a limit is refused and changes nothing; nodes never overshoot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import pytest
from inprocess import InProcessRegistry
from oci_client import OCI_MANIFEST, assert_error, digest_of
from wharf_process import WharfProcess

from coordinator.quota import QuotaScope, usage
from node import gc

ROOT = Path(__file__).resolve().parent.parent


class Registry(InProcessRegistry):
    def __init__(self, root: Path, quotas: list[dict]) -> None:
        super().__init__(root, quotas=quotas)

    async def used(self, scope: str) -> int:
        return await usage(self.kv, QuotaScope(scope, 0, scope))


@pytest.fixture()
async def registry(tmp_path):
    reg = Registry(tmp_path, [{"repository": "team/app", "limit": "10000"}, {"namespace": "ns", "limit": "15000"}])
    yield reg
    await reg.close()


async def test_blob_that_would_cross_the_limit_is_refused_and_usage_stays(registry):
    assert (await registry.push_blob("team/app", os.urandom(6000))).status_code == 201
    before = await registry.used("team/app")
    refused = await registry.push_blob("team/app", os.urandom(5000))
    error = assert_error(refused, 403, "DENIED")
    assert "team/app" in error["message"] and "quota" in error["message"]
    assert await registry.used("team/app") == before == 6000
    # The same blob again takes no more room.
    same = os.urandom(3000)
    assert (await registry.push_blob("team/app", same)).status_code == 201
    assert (await registry.push_blob("team/app", same)).status_code == 201
    assert await registry.used("team/app") == 9000


async def test_chunked_upload_is_refused_at_commit_and_leaves_no_session(registry):
    await registry.push_blob("team/app", os.urandom(9000))
    started = await registry.http.post("/v2/team/app/blobs/uploads/")
    assert started.status_code == 202
    location = started.headers["location"]
    data = os.urandom(4000)
    assert (await registry.http.patch(location, content=data)).status_code == 202
    done = await registry.http.put(location, params={"digest": digest_of(data)})
    assert_error(done, 403, "DENIED")
    assert_error(await registry.http.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert await registry.used("team/app") == 9000


async def test_full_repository_refuses_new_upload_sessions(registry):
    await registry.push_blob("team/app", os.urandom(10000))
    assert_error(await registry.http.post("/v2/team/app/blobs/uploads/"), 403, "DENIED")


async def test_namespace_quota_counts_every_repository_under_it(registry):
    assert (await registry.push_blob("ns/a", os.urandom(8000))).status_code == 201
    assert (await registry.push_blob("ns/b", os.urandom(6000))).status_code == 201
    assert_error(await registry.push_blob("ns/c/deep", os.urandom(2000)), 403, "DENIED")
    assert (await registry.push_blob("other/x", os.urandom(20000))).status_code == 201
    assert await registry.used("ns/") == 14000


async def test_mount_into_a_full_repository_is_refused(registry):
    data = os.urandom(7000)
    assert (await registry.push_blob("other/src", data)).status_code == 201
    await registry.push_blob("team/app", os.urandom(5000))
    mounted = await registry.http.post(
        "/v2/team/app/blobs/uploads/", params={"mount": digest_of(data), "from": "other/src"}
    )
    assert_error(mounted, 403, "DENIED")
    assert await registry.used("team/app") == 5000


async def test_usage_after_deletes_and_gc_equals_what_remaining_images_use(registry):
    base = os.urandom(2000)
    images = []
    for n in range(3):
        own = os.urandom(1000 + n)
        config = json.dumps({"n": n}).encode()
        for blob in (base, own, config):
            assert (await registry.push_blob("team/app", blob)).status_code == 201
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest_of(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": "application/octet-stream", "digest": digest_of(base), "size": len(base)},
                {"mediaType": "application/octet-stream", "digest": digest_of(own), "size": len(own)},
            ],
        }
        body = json.dumps(doc).encode()
        r = await registry.http.put(
            f"/v2/team/app/manifests/v{n}", content=body, headers={"Content-Type": OCI_MANIFEST}
        )
        assert r.status_code == 201
        images.append((digest_of(body), len(config) + len(own)))
    # The base layer is also used in another repository, so GC keeps the blob but drops the link.
    other_config = b'{"other": true}'
    for blob in (base, other_config):
        assert (await registry.push_blob("other/app", blob)).status_code == 201
    other = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": digest_of(other_config),
            "size": len(other_config),
        },
        "layers": [{"mediaType": "application/octet-stream", "digest": digest_of(base), "size": len(base)}],
    }
    r = await registry.http.put(
        "/v2/other/app/manifests/v1", content=json.dumps(other).encode(), headers={"Content-Type": OCI_MANIFEST}
    )
    assert r.status_code == 201
    for digest, _ in images:
        assert (await registry.http.delete(f"/v2/team/app/manifests/{digest}")).status_code == 202
    await gc.collect(registry.services)
    assert await registry.used("team/app") == 0
    assert await registry.used("other/app") == len(base) + len(other_config)
    assert await registry.services.metadata.get_blob(digest_of(base)) is not None


def test_quota_ls_shows_usage_and_limits(tmp_path):
    node = WharfProcess(tmp_path / "w", quotas=[{"repository": "team/app", "limit": "1MiB"}])
    with node:
        data = os.urandom(4096)
        r = httpx.post(f"{node.url}/v2/team/app/blobs/uploads/", params={"digest": digest_of(data)}, content=data)
        assert r.status_code == 201
    out = subprocess.run(
        [sys.executable, "-m", "node.cli", "quota", "ls", "--json", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [
        {"scope": "team/app", "kind": "repository", "used": 4096, "limit": 1048576, "percent": 0.4}
    ]
    table = subprocess.run(
        [sys.executable, "-m", "node.cli", "quota", "ls", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert "team/app" in table.stdout and "4.0 KiB" in table.stdout and "1.0 MiB" in table.stdout


def test_two_nodes_pushing_into_one_namespace_never_overshoot(tmp_path, etcd):
    prefix = f"/wharf-quota-{uuid.uuid4().hex[:8]}/"
    limit = 200_000
    settings = {
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "shared")}, "delete": {"enabled": True}},
        "coordinator": {"etcd": {"endpoints": etcd.endpoints, "prefix": prefix}},
        "quotas": [{"namespace": "team/", "limit": str(limit)}],
    }
    nodes = [WharfProcess(tmp_path / f"n{i}", **settings) for i in range(2)]
    accepted: list[int] = []
    refused: list[int] = []
    lock = threading.Lock()

    def pusher(url: str, repo: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(15):
                data = os.urandom(9_000)
                r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest_of(data)}, content=data)
                with lock:
                    (accepted if r.status_code == 201 else refused).append(r.status_code)

    try:
        for node in nodes:
            node.start()
        threads = [threading.Thread(target=pusher, args=(nodes[i % 2].url, f"team/app{i % 3}")) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert refused and set(refused) == {403}
        assert len(accepted) * 9_000 <= limit, f"{len(accepted)} blobs of 9000 bytes accepted under {limit}"
        assert len(accepted) == limit // 9_000, "every blob that fit was accepted"
    finally:
        for node in nodes:
            node.stop()


def test_sixteen_pushers_into_one_quota_never_overshoot_and_never_see_a_5xx(tmp_path, etcd):
    prefix = f"/wharf-quota-{uuid.uuid4().hex[:8]}/"
    size, limit = 5_000, 300_000
    settings = {
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "shared")}, "delete": {"enabled": True}},
        "coordinator": {"etcd": {"endpoints": etcd.endpoints, "prefix": prefix}},
        "quotas": [{"namespace": "team/", "limit": str(limit)}],
    }
    nodes = [WharfProcess(tmp_path / f"n{i}", **settings) for i in range(2)]
    statuses: list[int] = []
    accepted: list[int] = []
    lock = threading.Lock()

    def pusher(url: str, repo: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            for _ in range(8):
                data = os.urandom(size)
                for _attempt in range(20):  # as clients do: honour 429 with Retry-After, then give up
                    r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest_of(data)}, content=data)
                    with lock:
                        statuses.append(r.status_code)
                    if r.status_code != 429:
                        break
                    assert r.headers.get("retry-after")
                if r.status_code == 201:
                    with lock:
                        accepted.append(1)

    try:
        for node in nodes:
            node.start()
        threads = [threading.Thread(target=pusher, args=(nodes[i % 2].url, f"team/app{i % 4}")) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(180)
        assert all(code < 500 for code in statuses), sorted(set(statuses))
        assert set(statuses) <= {201, 403, 429}
        assert len(accepted) * size <= limit, f"{len(accepted)} blobs of {size} bytes accepted under {limit}"
        assert len(accepted) == limit // size, "every blob that fit was accepted"
        listed = subprocess.run(
            [sys.executable, "-m", "node.cli", "quota", "ls", "--json", str(nodes[0].config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert json.loads(listed.stdout)[0]["used"] == len(accepted) * size, "the counter equals the links"
    finally:
        for node in nodes:
            node.stop()
        etcd.delete_prefix(prefix)
