"""Read-only mode, from the file as in Distribution and from the cluster-wide switch.

Writes are refused as Debian's docker-registry (Distribution 2.8.2) refuses them in read-only mode:
405 with `Allow: GET, HEAD` (Wharf adds an OCI error body); pulls are served; nothing is stored. The
switch (`wharf maintenance readonly on|off`) reaches every node of a cluster within two seconds, and
the jobs that delete (GC, retention, the upload purge) stop while it lasts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from inprocess import InProcessRegistry
from oci_client import OCI_MANIFEST, OCIClient, assert_error, digest_of
from registry2 import DockerRegistry, Registry2Client
from services import EtcdCluster
from test_cluster_nodes import _nodes
from wharf_process import WharfProcess

from coordinator import keys
from coordinator.gc import Collector
from coordinator.readonly import Halted, set_switch
from node import gc, retention
from node.maintenance import Maintenance
from node.storage import layout

_ACCEPT = {"Accept": OCI_MANIFEST}
_ROOT = Path(__file__).resolve().parent.parent


def _writes(repo: str, upload: str, digest: str, manifest: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every kind of write a client makes: (method, path or URL, httpx keyword arguments)."""
    blob = b"refused bytes"
    separator = "&" if "?" in upload else "?"
    return [
        ("POST", f"/v2/{repo}/blobs/uploads/", {}),
        ("POST", f"/v2/{repo}/blobs/uploads/?digest={digest_of(blob)}", {"content": blob}),
        ("POST", f"/v2/other/blobs/uploads/?mount={digest}&from={repo}", {}),
        ("PATCH", upload, {"content": blob}),
        ("PUT", f"{upload}{separator}digest={digest_of(blob)}", {"content": blob}),
        ("DELETE", upload, {}),
        ("PUT", f"/v2/{repo}/manifests/v2", {"content": manifest, "headers": {"Content-Type": OCI_MANIFEST}}),
        ("DELETE", f"/v2/{repo}/manifests/{digest_of(manifest.encode())}", {}),
        ("DELETE", f"/v2/{repo}/blobs/{digest}", {}),
    ]


def _pulls(http: httpx.Client, repo: str, digest: str, layer: bytes) -> None:
    assert http.get(f"/v2/{repo}/manifests/v1", headers=_ACCEPT).status_code == 200
    assert http.head(f"/v2/{repo}/manifests/v1", headers=_ACCEPT).status_code == 200
    assert http.get(f"/v2/{repo}/blobs/{digest}").content == layer
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] == ["v1"]
    assert repo in http.get("/v2/_catalog").json()["repositories"]


def _stored(root: Path) -> dict[str, int]:
    """Every file under Distribution's tree with its size (the coordinator's file lives elsewhere)."""
    tree = root / "docker"
    return {str(p.relative_to(root)): p.stat().st_size for p in tree.rglob("*") if p.is_file()}


def _refused(http: httpx.Client, writes: list[tuple[str, str, dict[str, Any]]]) -> list[tuple[int, str | None]]:
    answers = []
    for method, target, kwargs in writes:
        response = http.request(method, target, **kwargs)
        answers.append((response.status_code, response.headers.get("Allow")))
    return answers


@pytest.fixture(scope="module")
def distribution_refusals(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, str | None]]:
    """What Distribution answers to each write once `storage.maintenance.readonly` is on."""
    workdir = tmp_path_factory.mktemp("registry2")
    registry = DockerRegistry.on_filesystem(workdir, workdir / "root")
    with registry, registry.http() as http:
        client = Registry2Client(http)
        layer = b"layer of the read-only test"
        image = client.push_image("team/app", "v1", layers=[layer])
        # Its Location is absolute, with this run's port: keep the path and `_state` only.
        location = urlsplit(http.post("/v2/team/app/blobs/uploads/").headers["Location"])
        upload = f"{location.path}?{location.query}"
    readonly = {"uploadpurging": {"enabled": False}, "readonly": {"enabled": True}}
    registry.extra = {"storage": {**registry.config()["storage"], "maintenance": readonly}}
    with registry, registry.http() as http:
        _pulls(http, "team/app", digest_of(layer), layer)
        return _refused(http, _writes("team/app", upload, digest_of(layer), image.body.decode()))


def test_readonly_from_the_file_refuses_every_write_as_distribution_does_and_serves_pulls(
    tmp_path: Path, distribution_refusals: list[tuple[int, str | None]]
) -> None:
    node = WharfProcess(tmp_path / "node")
    layer = b"layer of the read-only test"
    with node, httpx.Client(base_url=node.url, trust_env=False, timeout=30) as http:
        image = OCIClient(http).push_image("team/app", "v1", layers=[layer])
        upload = http.post("/v2/team/app/blobs/uploads/").headers["Location"]
    node.config["storage"]["maintenance"] = {"readonly": {"enabled": True}}
    node.config_path.write_text(json.dumps(node.config))
    root = Path(node.config["storage"]["filesystem"]["rootdirectory"])
    with node, httpx.Client(base_url=node.url, trust_env=False, timeout=30) as http:
        before = _stored(root)
        _pulls(http, "team/app", digest_of(layer), layer)
        writes = _writes("team/app", upload, digest_of(layer), image.body.decode())
        assert _refused(http, writes) == distribution_refusals == [(405, "GET, HEAD")] * len(writes)
        for method, target, kwargs in writes:
            body = assert_error(http.request(method, target, **kwargs), 405, "UNSUPPORTED")
            assert "storage.maintenance.readonly" in body["detail"]["readonly"]
        assert _stored(root) == before, "nothing was stored"
        _pulls(http, "team/app", digest_of(layer), layer)
        assert "read-only" in http.get("/debug/ready").json()["readonly"]
        # Upload status is a read: still answered.
        assert http.get(upload).status_code == 204
        # registry:2's procedure goes on: read-only in the file, then garbage-collect with that file.
        collected = subprocess.run(
            [sys.executable, "-m", "node.cli", "garbage-collect", str(node.config_path), "--delete-untagged"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(_ROOT),
            env={k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")},
        )
        assert collected.returncode == 0, collected.stderr
        assert "needs no read-only window" in collected.stderr
        _pulls(http, "team/app", digest_of(layer), layer)
        assert json.loads(node.config_path.read_text())["storage"]["maintenance"]["readonly"]["enabled"] is True


def _wharf(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(_ROOT),
        env={k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")},
    )


def _upload_refused(node: WharfProcess) -> bool:
    return httpx.post(node.url + "/v2/team/app/blobs/uploads/", timeout=5, trust_env=False).status_code == 405


def _until_every_node(nodes: list[WharfProcess], predicate: Callable[[WharfProcess], bool]) -> float:
    """Seconds until `predicate` holds on every node (polled every 50 ms, for at most 10 s)."""
    started = time.monotonic()
    pending = list(nodes)
    while pending and time.monotonic() - started < 10:
        pending = [node for node in pending if not predicate(node)]
        if pending:
            time.sleep(0.05)
    assert not pending, f"{len(pending)} node(s) never obeyed"
    return time.monotonic() - started


def test_switch_reaches_three_nodes_within_two_seconds_and_back(tmp_path: Path, etcd: EtcdCluster) -> None:
    nodes = _nodes(tmp_path, etcd, 3)
    layer = os.urandom(5000)
    try:
        for node in nodes:
            node.start()
        with httpx.Client(base_url=nodes[0].url, trust_env=False, timeout=30) as http:
            OCIClient(http).push_image("team/app", "v1", layers=[layer])
        root = Path(tmp_path / "shared-storage")
        before = _stored(root)
        switched = _wharf(nodes[1].config_path, "maintenance", "readonly", "on", "--reason", "storage migration")
        assert switched.returncode == 0, switched.stderr
        assert _until_every_node(nodes, _upload_refused) <= 2.0
        for node in nodes:
            with httpx.Client(base_url=node.url, trust_env=False, timeout=30) as http:
                _pulls(http, "team/app", digest_of(layer), layer)
                body = assert_error(
                    http.put("/v2/team/app/manifests/v2", content=b"{}", headers={"Content-Type": OCI_MANIFEST}),
                    405,
                    "UNSUPPORTED",
                )
                assert "storage migration" in body["detail"]["readonly"]
                ready = http.get("/debug/ready")
                assert ready.status_code == 200 and "switched on" in ready.json()["readonly"]
        assert _stored(root) == before, "nothing was stored"
        status = _wharf(nodes[2].config_path, "maintenance", "readonly", "status", "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["switch"]["enabled"] is True
        refused_gc = subprocess.run(
            [sys.executable, "-m", "node.cli", "gc", str(nodes[0].config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(_ROOT),
        )
        assert refused_gc.returncode == 1 and "read-only" in refused_gc.stderr

        assert _wharf(nodes[0].config_path, "maintenance", "readonly", "off").returncode == 0
        assert _until_every_node(nodes, lambda node: not _upload_refused(node)) <= 2.0
        with httpx.Client(base_url=nodes[2].url, trust_env=False, timeout=30) as http:
            OCIClient(http).push_image("team/app", "v2", layers=[os.urandom(100)])
    finally:
        for node in nodes:
            node.stop()


# -- what deletes waits while read-only --------------------------------------------------------------


@pytest.fixture
async def registry(tmp_path: Path):
    reg = InProcessRegistry(tmp_path, retention={"policies": [{"repositories": ["**"], "keeplast": 0}]})
    try:
        yield reg
    finally:
        await reg.close()


async def _garbage(registry: InProcessRegistry) -> tuple[str, str]:
    """A tagged image (retention would delete its tag) and an unreferenced blob (GC would delete it)."""
    config = await registry.blob("team/app", b'{"os": "linux"}')
    layer = await registry.blob("team/app", b"tagged layer")
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 15},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 12}],
    }
    await registry.put_manifest("team/app", "v1", doc)
    orphan = await registry.blob("team/app", b"no manifest uses me")
    response = await registry.http.post("/v2/team/app/blobs/uploads/")
    assert response.status_code == 202
    return orphan, response.headers["Docker-Upload-UUID"]


async def test_gc_retention_and_upload_purge_delete_nothing_while_switched_read_only(
    registry: InProcessRegistry,
) -> None:
    svc = registry.services
    orphan, upload = await _garbage(registry)
    stored = registry.stored_bytes()
    await set_switch(svc.kv, True, by="test")
    await svc.readonly.switch.refresh()
    with pytest.raises(Halted):
        await gc.collect(svc, delete_untagged=True)
    with pytest.raises(Halted):
        await retention.apply(svc)
    with pytest.raises(Halted):
        await Maintenance(svc).purge_uploads(now=time.time() + 365 * 86400)
    assert registry.stored_bytes() == stored
    assert await svc.metadata.get_tag("team/app", "v1") is not None
    assert await svc.metadata.get_link("team/app", orphan) is not None
    assert await svc.kv.get(keys.upload(upload)) is not None
    # Dry runs change nothing: they still answer.
    assert (await gc.collect(svc, dry_run=True)).blobs_deleted == 1

    await set_switch(svc.kv, False, by="test")
    await svc.readonly.switch.refresh()
    assert (await gc.collect(svc)).blobs_deleted == 1
    assert await Maintenance(svc).purge_uploads(now=time.time() + 365 * 86400) == 1


async def test_gc_that_sees_the_switch_mid_cycle_stops_before_its_next_delete(registry: InProcessRegistry) -> None:
    svc = registry.services
    digests = [await registry.blob("team/app", f"orphan {i}".encode()) for i in range(5)]
    collector = Collector(svc.kv, grace=0, address=svc.metadata.address)
    asked = 0

    def may_delete() -> bool:
        nonlocal asked
        asked += 1
        return asked <= 2  # the switch arrives after two deletions were under way

    collector.may_delete = may_delete
    with pytest.raises(Halted):
        await collector.run(svc.storage.delete)
    kept = [d for d in digests if await svc.metadata.get_blob(d) is not None]
    assert len(kept) == 3
    for digest in digests:
        # Records and bytes go together: nothing is left unaccounted, nothing recorded is missing.
        stored = await svc.storage.stat(layout.blob_key(digest)) is not None
        assert stored == (digest in kept)
