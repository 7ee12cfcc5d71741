"""What is stored, over real HTTP on two nodes sharing etcd and a filesystem store: last-pulled times
seen through every node, a namespace delete racing pushes, and `wharf ls`, `du` and `rm` on the
cluster with references as docker prints them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from oci_client import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, OCIClient, descriptor, digest_of, manifest_bytes
from services import EtcdCluster, wait_until
from wharf_process import WharfProcess, running

REPO_ROOT = Path(__file__).resolve().parent.parent
PULL_INTERVAL = 1.0
_ANY = {"Accept": "*/*"}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdCluster):
    """Two nodes for the module; each test works in namespaces of its own."""
    tmp_path = tmp_path_factory.mktemp("inventory")
    prefix = f"/wharf-test-{uuid.uuid4().hex[:8]}/"
    storage = {"filesystem": {"rootdirectory": str(tmp_path / "shared-storage")}, "delete": {"enabled": True}}
    nodes = [
        WharfProcess(
            tmp_path / f"node{i}",
            storage=storage,
            coordinator={"etcd": {"endpoints": etcd.endpoints, "prefix": prefix}},
            cluster={"node": f"node{i}", "leasettl": 3},
            inventory={"pullinterval": f"{PULL_INTERVAL}s"},
            # No scheduled collection: what a collection would free stays put between the tests' looks.
            gc={"enabled": False, "grace": "0s"},
        )
        for i in range(2)
    ]
    with running(nodes):
        yield nodes


def _client(node: WharfProcess) -> httpx.Client:
    return httpx.Client(base_url=node.url, timeout=30)


def _tag_rows(http: httpx.Client, repo: str) -> dict[str, dict[str, Any]]:
    response = http.get(f"/wharf/v1/repositories/{repo}/tags")
    assert response.status_code == 200, response.text
    return {row["tag"]: row for row in response.json()["tags"]}


def _pulled_at(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_a_pull_through_one_node_shows_as_last_pulled_on_every_node_within_the_interval(two_nodes):
    a, b = two_nodes
    with _client(a) as http_a, _client(b) as http_b:
        client = OCIClient(http_a)
        client.push_image("pulls/app", "pulled", layers=[os.urandom(500)])
        client.push_image("pulls/app", "idle", layers=[os.urandom(500)])
        assert _tag_rows(http_b, "pulls/app")["pulled"]["pulled"] is None
        before = time.time()
        assert http_b.get("/v2/pulls/app/manifests/pulled", headers=_ANY).status_code == 200
        pulled = time.monotonic()
        for http in (http_a, http_b):
            wait_until(
                lambda http=http: _tag_rows(http, "pulls/app")["pulled"]["pulled"] is not None,
                timeout=PULL_INTERVAL + 10,
                what="last-pulled time written and seen",
            )
        seen_after = time.monotonic() - pulled
        for http in (http_a, http_b):
            rows = _tag_rows(http, "pulls/app")
            assert _pulled_at(rows["pulled"]["pulled"]) >= before - 1
            assert rows["idle"]["pulled"] is None
        # Within the batching interval, with room for a busy machine.
        assert seen_after < PULL_INTERVAL + 8, seen_after


def _push_loop(node: WharfProcess, repos: list[str], stop: threading.Event, statuses: list[int], pushed: list[str]):
    """Push small images into `repos` over and over until `stop`; every status seen is kept."""
    with _client(node) as http:
        n = 0
        while not stop.is_set() and n < 500:
            repo = repos[n % len(repos)]
            n += 1
            blobs = [json.dumps({"architecture": "amd64", "os": "linux", "n": n}).encode(), os.urandom(300)]
            ok = True
            for blob in blobs:
                response = http.post(
                    f"/v2/{repo}/blobs/uploads/",
                    params={"digest": digest_of(blob)},
                    content=blob,
                    headers={"Content-Type": "application/octet-stream"},
                )
                statuses.append(response.status_code)
                ok = ok and response.status_code == 201
            if not ok:
                continue
            doc = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, blobs[0]),
                "layers": [descriptor(OCI_LAYER, blobs[1])],
            }
            response = OCIClient(http).put_manifest(repo, f"v{n}", manifest_bytes(doc), OCI_MANIFEST)
            statuses.append(response.status_code)
            if response.status_code == 201:
                pushed.append(f"{repo}:v{n}")


def _assert_complete(http: httpx.Client, repo: str, tag: str) -> None:
    """The image pulls whole: its manifest and every blob it names."""
    response = http.get(f"/v2/{repo}/manifests/{tag}", headers=_ANY)
    assert response.status_code == 200, (repo, tag, response.text)
    doc = response.json()
    for blob in [doc["config"], *doc["layers"]]:
        got = http.get(f"/v2/{repo}/blobs/{blob['digest']}")
        assert got.status_code == 200, (repo, tag, blob["digest"], got.status_code)
        assert len(got.content) == blob["size"]


def test_namespace_delete_racing_pushes_leaves_whole_repositories_or_none_and_no_5xx(two_nodes):
    a, b = two_nodes
    repos = [f"race/r{i}" for i in range(4)]
    stop = threading.Event()
    statuses: list[int] = []
    pushed: list[str] = []
    loops = [
        threading.Thread(target=_push_loop, args=(node, repos, stop, statuses, pushed), daemon=True) for node in (a, b)
    ]
    deletes: list[int] = []
    with _client(b) as http:
        OCIClient(http).push_image("keep/app", "v1", layers=[os.urandom(200)])
        for loop in loops:
            loop.start()
        try:
            wait_until(lambda: len(pushed) >= 4, timeout=60, what="pushes landing")
            for _ in range(4):
                response = http.delete("/wharf/v1/namespaces/race/", timeout=60)
                deletes.append(response.status_code)
                assert response.status_code < 500, response.text
                done = len(pushed)
                wait_until(lambda done=done: len(pushed) > done, timeout=60, what="pushes landing again")
        finally:
            stop.set()
            for loop in loops:
                loop.join(60)
        assert 200 in deletes, deletes
        assert not [s for s in statuses if s >= 500], sorted(set(statuses))
        # Refused pushes are refused as a client can act on: DENIED (being deleted), MANIFEST_BLOB_UNKNOWN.
        assert set(statuses) <= {201, 400, 403, 404}, sorted(set(statuses))
        # Every repository left is whole: each tag pulls completely, through either node.
        catalog = http.get("/v2/_catalog").json()["repositories"]
        assert "keep/app" in catalog
        for repo in [r for r in catalog if r.startswith("race/")]:
            tags = http.get(f"/v2/{repo}/tags/list").json().get("tags") or []
            for tag in tags:
                _assert_complete(http, repo, tag)
        _assert_complete(http, "keep/app", "v1")
        # Deleted whole once more, with nothing pushing: the namespace leaves the catalog.
        assert http.delete("/wharf/v1/namespaces/race/").status_code in (200, 404)
        wait_until(
            lambda: not [r for r in http.get("/v2/_catalog").json()["repositories"] if r.startswith("race/")],
            timeout=30,
            what="the namespace leaving the catalog",
        )


def _cli(node: WharfProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "AWS_"))}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args, "-c", str(node.config_path)],
        cwd=str(REPO_ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ls_du_and_rm_take_references_as_docker_prints_them_and_json_parses(two_nodes):
    a, b = two_nodes
    shared = os.urandom(4000)
    with _client(a) as http:
        client = OCIClient(http)
        configs = [json.dumps({"architecture": "amd64", "os": "linux", "n": n}).encode() for n in range(3)]
        v1 = client.push_image("cli/app", "v1", layers=[shared, os.urandom(1000)], config=configs[0])
        client.push_image("cli/app", "v2", layers=[shared, os.urandom(1000)], config=configs[1])
        client.push_image("cli/web", "v1", layers=[shared], config=configs[2])
        host = a.host
        listing = _cli(a, "ls", f"{host}/cli/app:v1", "--json")
        assert listing.returncode == 0, listing.stderr
        rows = json.loads(listing.stdout)["tags"]
        assert [(r["tag"], r["digest"]) for r in rows] == [("v1", v1.digest)]
        assert rows[0]["size"] == _tag_rows(http, "cli/app")["v1"]["size"]
        everything = _cli(a, "ls", f"{host}/cli/app", "--sort", "pushed", "--json")
        assert [r["tag"] for r in json.loads(everything.stdout)["tags"]] == ["v2", "v1"]
        repositories = json.loads(_cli(a, "ls", f"{host}/cli/", "--json").stdout)["repositories"]
        assert [r["repository"] for r in repositories] == ["cli/app", "cli/web"]
        text = _cli(a, "ls", f"{host}/cli/app")
        assert text.returncode == 0 and "v1" in text.stdout and "v2" in text.stdout

        du = _cli(a, "du", f"{host}/cli/app", "--json")
        assert du.returncode == 0, du.stderr
        figures = json.loads(du.stdout)
        assert figures["scope"] == "cli/app" and figures["shared"] == len(shared)
        assert figures["linked"] == figures["exclusive"] + figures["shared"]
        assert figures["gc_reclaimable_here"] == 0
        reclaimable = figures["gc_reclaimable"]
        team = json.loads(_cli(a, "du", f"{host}/cli/", "--json").stdout)
        assert {p["scope"] for p in team["parts"]} == {"cli/app", "cli/web"}
        assert _cli(a, "du", f"{host}/cli/app:v1").returncode == 1, "an image is not a scope"

        removed = _cli(a, "rm", f"{host}/cli/app:v1")
        assert removed.returncode == 0, removed.stderr
        assert http.get("/v2/cli/app/tags/list").json()["tags"] == ["v2"]
        whole = _cli(a, "rm", "--repository", f"{host}/cli/app")
        assert whole.returncode == 0, whole.stderr
        assert "deleted repository cli/app" in whole.stdout
        assert http.get("/v2/cli/app/tags/list").status_code == 404
        assert [r for r in http.get("/v2/_catalog").json()["repositories"] if r.startswith("cli/")] == ["cli/web"]
        # What deleting it freed is what GC would free now (the shared layer stays with cli/web).
        after = json.loads(_cli(a, "du", "--json").stdout)
        assert after["gc_reclaimable"] - reclaimable == figures["exclusive"]
        assert _cli(a, "rm", "--repository", f"{host}/cli/app").returncode == 1
