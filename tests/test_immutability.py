"""Tag immutability: protected tags never move or go, on any node, and retention never removes them."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from oci_client import OCIClient, assert_error
from services import EtcdCluster
from test_retention import HOUR, _remove_prefix, sig_tag
from wharf_process import WharfProcess

ANY = {"Accept": "*/*"}
RULES = [
    {"name": "releases", "repositories": ["team/**"], "tags": [r"v\d+\.\d+\.\d+"]},
    {"repositories": ["base/*"], "tags": ["stable"]},
]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdCluster) -> Iterator[list[httpx.Client]]:
    """Two `wharf serve` nodes from the same settings, sharing etcd and storage; a client for each."""
    base = tmp_path_factory.mktemp("immutability")
    prefix = f"/wharf-immutability-{uuid.uuid4().hex[:8]}/"
    processes = [
        WharfProcess(
            base / f"node{i}",
            storage={"filesystem": {"rootdirectory": str(base / "storage")}, "delete": {"enabled": True}},
            coordinator={"etcd": {"endpoints": etcd.endpoints, "prefix": prefix}},
            cluster={"node": f"node{i}", "leasettl": 3},
            immutability=RULES,
        )
        for i in range(2)
    ]
    clients: list[httpx.Client] = []
    try:
        for process in processes:
            process.start()
            clients.append(httpx.Client(base_url=process.url, timeout=30))
        yield clients
    finally:
        for client in clients:
            client.close()
        for process in processes:
            process.stop()
        _remove_prefix(etcd, prefix)


def _repo(prefix: str = "team") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:10]}"


def _digest(client: httpx.Client, repo: str, tag: str) -> str:
    response = client.head(f"/v2/{repo}/manifests/{tag}", headers=ANY)
    assert response.status_code == 200, response.status_code
    return response.headers["docker-content-digest"]


def test_moving_a_protected_tag_is_refused_on_every_node(nodes):
    repo = _repo()
    first = OCIClient(nodes[0]).push_image(repo, "v1.2.3", layers=[os.urandom(32)])
    for client in nodes:
        oci = OCIClient(client)
        other = oci.push_image(repo, None, layers=[os.urandom(32)])
        error = assert_error(oci.put_manifest(repo, "v1.2.3", other.body, other.media_type), 403, "DENIED")
        assert "releases" in error["message"] and "immutable" in error["message"]
        assert error["detail"]["rule"] == "releases"
    for client in nodes:
        assert _digest(client, repo, "v1.2.3") == first.digest


def test_deleting_a_protected_tag_is_refused_on_every_node(nodes):
    repo = _repo()
    OCIClient(nodes[1]).push_image(repo, "v2.0.0", layers=[os.urandom(32)])
    for client in nodes:
        error = assert_error(client.delete(f"/v2/{repo}/manifests/v2.0.0"), 403, "DENIED")
        assert "releases" in error["message"]
    for client in nodes:
        assert _digest(client, repo, "v2.0.0")


def test_deleting_by_digest_a_manifest_with_a_protected_tag_is_refused(nodes):
    repo = _repo()
    image = OCIClient(nodes[0]).push_image(repo, "dev", layers=[os.urandom(32)])
    OCIClient(nodes[1]).put_manifest(repo, "v3.0.0", image.body, image.media_type)
    for client in nodes:
        error = assert_error(client.delete(f"/v2/{repo}/manifests/{image.digest}"), 403, "DENIED")
        assert error["detail"] == {"tag": "v3.0.0", "rule": "releases"}
    for client in nodes:
        assert client.get(f"/v2/{repo}/manifests/{image.digest}", headers=ANY).status_code == 200
        assert sorted(client.get(f"/v2/{repo}/tags/list").json()["tags"]) == ["dev", "v3.0.0"]


def test_pushing_new_tags_is_allowed_and_unprotected_tags_still_move(nodes):
    repo = _repo()
    a, b = (OCIClient(client) for client in nodes)
    a.push_image(repo, "v1.0.0", layers=[os.urandom(32)])
    b.push_image(repo, "v1.0.1", layers=[os.urandom(32)])
    a.push_image(repo, "latest", layers=[os.urandom(32)])
    moved = b.push_image(repo, "latest", layers=[os.urandom(32)])
    assert _digest(nodes[0], repo, "latest") == moved.digest
    # The rule covers whole tags only: a pre-release suffix is not protected.
    a.push_image(repo, "v1.0.0-rc1", layers=[os.urandom(32)])
    b.push_image(repo, "v1.0.0-rc1", layers=[os.urandom(32)])
    assert nodes[1].delete(f"/v2/{repo}/manifests/latest").status_code == 202
    assert sorted(nodes[0].get(f"/v2/{repo}/tags/list").json()["tags"]) == ["v1.0.0", "v1.0.0-rc1", "v1.0.1"]


def test_pushing_the_same_content_to_a_protected_tag_again_is_allowed(nodes):
    repo = _repo()
    image = OCIClient(nodes[0]).push_image(repo, "v4.0.0", layers=[os.urandom(32)])
    for client in nodes:
        response = OCIClient(client).put_manifest(repo, "v4.0.0", image.body, image.media_type)
        assert response.status_code == 201, response.text
        assert _digest(client, repo, "v4.0.0") == image.digest


def test_a_rule_without_a_name_is_named_by_its_patterns(nodes):
    repo = _repo("base")
    OCIClient(nodes[0]).push_image(repo, "stable", layers=[os.urandom(32)])
    error = assert_error(nodes[1].delete(f"/v2/{repo}/manifests/stable"), 403, "DENIED")
    assert error["detail"]["rule"] == "base/* tags stable"
    assert "team" not in error["detail"]["rule"]


def test_protection_is_per_repository_pattern(nodes):
    repo = _repo("elsewhere")
    a = OCIClient(nodes[0])
    a.push_image(repo, "v1.0.0", layers=[os.urandom(32)])
    moved = a.push_image(repo, "v1.0.0", layers=[os.urandom(32)])
    assert _digest(nodes[1], repo, "v1.0.0") == moved.digest
    assert nodes[1].delete(f"/v2/{repo}/manifests/v1.0.0").status_code == 202


async def test_retention_never_removes_an_immutable_tag(tmp_path):
    from test_retention import Registry

    root = tmp_path / "registry"
    root.mkdir()
    reg = Registry(
        root,
        immutability=RULES,
        retention={"policies": [{"name": "nothing-stays", "keeplast": 0, "olderthan": "1s", "untaggedafter": "1s"}]},
    )
    try:
        release = await reg.image("team/app", "v1.0.0")
        await reg.image("team/app", sig_tag(release))
        base = await reg.image("base/os", "v1.0.0")  # not protected in base/*
        children = [await reg.image("base/os", None) for _ in range(2)]
        multi = await reg.index("base/os", "stable", children)
        for n in range(3):
            await reg.image("team/app", f"build-{n}")
        run = await reg.apply(now=time.time() + HOUR)
        assert await reg.tags("team/app") == sorted(["v1.0.0", sig_tag(release)])
        assert await reg.tags("base/os") == ["stable"]
        for digest in (multi, *children):
            assert await reg.has("base/os", digest), "an immutable tag keeps its index and children"
        assert not await reg.has("base/os", base)
        kept = {(k.repository, k.tag): k.reason for k in run.plan.kept}
        assert kept[("team/app", "v1.0.0")] == "immutable (rule: releases)"
        assert kept[("base/os", "stable")] == "immutable (rule: base/* tags stable)"
        assert kept[("team/app", sig_tag(release))].startswith("its subject")
    finally:
        await reg.close()


def test_immutability_ls_lists_protected_tags_as_a_table_and_as_json(tmp_path) -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    node = WharfProcess(
        tmp_path / "w", immutability=[{"repositories": ["prod/**"], "tags": [r"v\d+"], "name": "releases"}]
    )
    with node, httpx.Client(base_url=node.url, timeout=30) as http:
        oci = OCIClient(http)
        image = oci.push_image("prod/app", "v1")
        oci.push_image("prod/app", "latest")

    def wharf(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", "immutability", "ls", *args, str(node.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=Path(__file__).resolve().parent.parent,
        )

    listed = wharf("--json")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == {
        "rules": ["releases"],
        "protected": [{"repository": "prod/app", "tag": "v1", "digest": image.digest, "rule": "releases"}],
    }
    table = wharf()
    assert "prod/app:v1" in table.stdout and "releases" in table.stdout and "latest" not in table.stdout
