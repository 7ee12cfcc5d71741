"""Tag details, storage figures and whole-repository deletes, in process (fast; real HTTP in test_inventory_http)."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from dataclasses import asdict
from typing import Any

import pytest
from inprocess import InProcessRegistry
from oci_client import OCI_CONFIG, OCI_EMPTY, OCI_INDEX, OCI_LAYER, OCI_MANIFEST, descriptor, digest_of

from coordinator import keys
from coordinator.kv import Op, Put
from coordinator.metadata import TAGS_CHANGED, TagRecord
from coordinator.usage import TOTAL
from node import gc
from node.usage import FigureKeeper

ANY = {"Accept": "*/*"}


class Registry(InProcessRegistry):
    async def image(self, repo: str, tag: str | None, layers: list[bytes], **fields: Any) -> str:
        config = json.dumps({"architecture": "amd64", "os": "linux", "n": os.urandom(4).hex()}).encode()
        for blob in (config, *layers):
            await self.blob(repo, blob)
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
            **fields,
        }
        return (await self.put_manifest(repo, tag, doc))[0]

    async def tags(self, repo: str, **params: Any) -> tuple[list[dict[str, Any]], str | None]:
        response = await self.http.get(f"/wharf/v1/repositories/{repo}/tags", params=params)
        assert response.status_code == 200, response.text
        link = response.headers.get("link")
        return response.json()["tags"], link[1 : link.index(">")] if link else None

    async def every_tag(self, repo: str, **params: Any) -> list[dict[str, Any]]:
        rows, link = await self.tags(repo, **params)
        while link:
            response = await self.http.get(link)
            rows += response.json()["tags"]
            link = response.headers.get("link")
            link = link[1 : link.index(">")] if link else None
        return rows

    async def settle(self) -> None:
        await FigureKeeper(self.services).count()

    async def figures(self, scope: str) -> dict[str, Any]:
        path = (
            "/wharf/v1/usage"
            if scope == TOTAL
            else (
                f"/wharf/v1/namespaces/{scope}/usage"
                if scope.endswith("/")
                else f"/wharf/v1/repositories/{scope}/usage"
            )
        )
        response = await self.http.get(path)
        assert response.status_code == 200, response.text
        return dict(response.json())


@pytest.fixture()
async def registry(tmp_path):
    reg = Registry(tmp_path, inventory={"pullinterval": "1h"})
    await reg.services.usage.build()
    yield reg
    await reg.close()


async def pulled_size(reg: Registry, repo: str, reference: str, seen: set[str] | None = None) -> int:
    """What a client downloads for `reference`: every manifest and blob it names, each once."""
    seen = set() if seen is None else seen
    response = await reg.http.get(f"/v2/{repo}/manifests/{reference}", headers=ANY)
    assert response.status_code == 200
    digest = response.headers["docker-content-digest"]
    if digest in seen:
        return 0
    seen.add(digest)
    doc = response.json()
    total = len(response.content)
    for child in doc.get("manifests", []):
        total += await pulled_size(reg, repo, child["digest"], seen)
    for blob in [doc["config"], *doc.get("layers", [])] if "config" in doc else []:
        if blob["digest"] not in seen:
            seen.add(blob["digest"])
            total += len((await reg.http.get(f"/v2/{repo}/blobs/{blob['digest']}")).content)
    return total


async def test_tag_details_match_what_a_client_pulls_for_an_image_an_index_and_an_artifact(registry):
    shared = os.urandom(3000)
    amd = await registry.image("team/app", None, [shared, os.urandom(1000)])
    arm = await registry.image("team/app", None, [shared, os.urandom(2000)])
    await registry.image("team/app", "single", [os.urandom(500), os.urandom(700)])
    children = []
    for digest, arch in ((amd, "amd64"), (arm, "arm64")):
        body = (await registry.http.get(f"/v2/team/app/manifests/{digest}", headers=ANY)).content
        children.append({**descriptor(OCI_MANIFEST, body), "platform": {"architecture": arch, "os": "linux"}})
    index, _ = await registry.put_manifest(
        "team/app", "multi", {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
    )
    payload = b'{"sbom": true}'
    await registry.blob("team/app", payload)
    await registry.blob("team/app", b"{}")
    await registry.put_manifest(
        "team/app",
        "sbom",
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": "application/spdx+json",
            "config": descriptor(OCI_EMPTY, b"{}"),
            "layers": [descriptor("application/spdx+json", payload)],
        },
    )
    rows = {row["tag"]: row for row in (await registry.tags("team/app"))[0]}
    assert list(rows) == ["multi", "sbom", "single"]
    for tag, row in rows.items():
        assert row["size"] == await pulled_size(registry, "team/app", tag), tag
        head = await registry.http.head(f"/v2/team/app/manifests/{tag}", headers=ANY)
        assert row["digest"] == head.headers["docker-content-digest"]
        assert row["mediaType"] == head.headers["content-type"]
        assert row["pushed"].endswith("Z") and row["pulled"] is None
    assert rows["multi"]["digest"] == index and rows["multi"]["mediaType"] == OCI_INDEX
    platforms = rows["multi"]["platforms"]
    assert [p["platform"]["architecture"] for p in platforms] == ["amd64", "arm64"]
    assert [p["digest"] for p in platforms] == [amd, arm]
    for p in platforms:
        assert p["size"] == await pulled_size(registry, "team/app", p["digest"])
    assert rows["sbom"]["artifactType"] == "application/spdx+json"
    assert rows["single"]["artifactType"] == OCI_CONFIG and "platforms" not in rows["single"]


async def test_sorting_and_paging_hold_while_tags_are_added_and_moved(registry):
    layer = os.urandom(64)
    for n in range(30):
        await registry.image("team/app", f"t{n:02d}", [layer])
    for sort in ("name", "pushed", "pulled"):
        seen: list[dict[str, Any]] = []
        moved: set[str] = set()
        rows, link = await registry.tags("team/app", n=7, sort=sort)
        step = 0
        while True:
            seen += rows
            # Between pages: a new tag, and an old one pushed again (it moves in push order).
            await registry.image("team/app", f"new-{sort}-{step}", [layer])
            victim = f"t{(step * 7 + 3) % 30:02d}"
            await registry.image("team/app", victim, [layer])
            moved |= {victim, f"new-{sort}-{step}"}
            step += 1
            if not link:
                break
            response = await registry.http.get(link)
            rows = response.json()["tags"]
            link = response.headers.get("link")
            link = link[1 : link.index(">")] if link else None
        names = [row["tag"] for row in seen]
        assert len(names) == len(set(names)), f"{sort}: a tag came twice"
        unchanged = {f"t{n:02d}" for n in range(30)} - moved
        assert unchanged <= set(names), f"{sort}: an unchanged tag was missed"
        if sort == "name":
            assert names == sorted(names)
    everything = await registry.every_tag("team/app", sort="pushed", n=5)
    pushed = [row["pushed"] for row in everything]
    assert pushed == sorted(pushed, reverse=True), "newest first"


async def test_pulled_order_and_pattern_filter(registry):
    layer = os.urandom(64)
    for tag in ("v1.0", "v1.1", "v2.0", "latest", "dev"):
        await registry.image("team/app", tag, [layer])
    for tag in ("v1.0", "dev", "v2.0"):
        assert (await registry.http.get(f"/v2/team/app/manifests/{tag}", headers=ANY)).status_code == 200
        await asyncio.sleep(0.002)  # distinct pull times
    await registry.services.pulls.flush()
    rows = await registry.every_tag("team/app", sort="pulled", n=2)
    assert [row["tag"] for row in rows] == ["v2.0", "dev", "v1.0", "latest", "v1.1"]
    assert rows[0]["pulled"] is not None and rows[-1]["pulled"] is None
    matching = await registry.every_tag("team/app", pattern="v1.*", n=1)
    assert [row["tag"] for row in matching] == ["v1.0", "v1.1"]
    assert (await registry.tags("team/app", pattern="nothing*"))[0] == []
    bad = await registry.http.get("/wharf/v1/repositories/team/app/tags", params={"sort": "size"})
    assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == "UNSUPPORTED"
    unknown = await registry.http.get("/wharf/v1/repositories/nobody/here/tags")
    assert unknown.status_code == 404 and unknown.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    # The OCI tag list stays as the spec says.
    listed = await registry.http.get("/v2/team/app/tags/list")
    assert listed.json() == {"name": "team/app", "tags": ["dev", "latest", "v1.0", "v1.1", "v2.0"]}


async def test_figures_count_shared_layers_once_and_exclusive_bytes_are_what_gc_frees(registry):
    base = os.urandom(20_000)
    await registry.image("team/app", "v1", [base, os.urandom(5_000)])
    await registry.image("team/web", "v1", [base, os.urandom(7_000)])
    await registry.image("other/x", "v1", [os.urandom(3_000)])
    await registry.settle()
    app = await registry.figures("team/app")
    assert app["current"] and app["shared"] == len(base)
    assert app["linked"] == app["exclusive"] + app["shared"]
    team = await registry.figures("team/")
    assert team["shared"] == 0 and team["exclusive"] == team["unique"]
    assert team["linked"] == team["unique"] + len(base), "a namespace's linked bytes count each repository's link"
    total = await registry.figures(TOTAL)
    other = await registry.figures("other/x")
    assert total["unique"] == team["unique"] + other["exclusive"]

    before = registry.stored_bytes()
    deleted = await registry.http.delete("/wharf/v1/repositories/team/app")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["tags"] == 1 and deleted.json()["manifests"] == 1
    await gc.collect(registry.services)
    assert before - registry.stored_bytes() == app["exclusive"], "GC frees exactly the exclusive bytes"
    await registry.settle()
    web = await registry.figures("team/web")
    assert web["shared"] == 0 and web["exclusive"] == web["linked"], "the base layer is the survivor's own now"
    assert (await registry.http.get("/v2/team/web/manifests/v1", headers=ANY)).status_code == 200


async def test_repository_delete_takes_everything_and_the_catalog_forgets_it(registry):
    digest = await registry.image("team/app", "v1", [os.urandom(100)])
    await registry.image("team/app", "v2", [os.urandom(100)])
    await registry.image("team/app-two", "v1", [os.urandom(100)])
    assert (await registry.http.get(f"/v2/team/app/manifests/{digest}", headers=ANY)).status_code == 200
    deleted = await registry.http.delete("/wharf/v1/repositories/team/app")
    assert deleted.json() == {
        "repository": "team/app",
        "tags": 2,
        "manifests": 2,
        "links": 4,
        "linked_bytes": deleted.json()["linked_bytes"],
    }
    catalog = await registry.http.get("/v2/_catalog")
    assert catalog.json()["repositories"] == ["team/app-two"]
    assert (await registry.http.get("/v2/team/app/tags/list")).status_code == 404
    assert (await registry.http.get(f"/v2/team/app/manifests/{digest}", headers=ANY)).status_code == 404
    again = await registry.http.delete("/wharf/v1/repositories/team/app")
    assert again.status_code == 404 and again.json()["errors"][0]["code"] == "NAME_UNKNOWN"
    # Pushed again, it is a new repository, in the catalog again.
    await registry.image("team/app", "v3", [os.urandom(100)])
    assert (await registry.http.get("/v2/_catalog")).json()["repositories"] == ["team/app", "team/app-two"]


async def test_repositories_emptied_by_manifest_deletes_leave_the_catalog(registry):
    digest = await registry.image("team/app", "v1", [os.urandom(100)])
    await registry.image("team/keep", "v1", [os.urandom(100)])
    assert (await registry.http.delete(f"/v2/team/app/manifests/{digest}")).status_code == 202
    await registry.settle()
    assert (await registry.http.get("/v2/_catalog")).json()["repositories"] == ["team/keep"]
    # Its blobs are still linked until GC takes them, which it does as for any repository.
    await gc.collect(registry.services)
    await registry.settle()
    assert not (await registry.services.usage.scope("team/app"))


async def test_namespace_delete_takes_every_repository_under_it_and_nothing_else(registry):
    for repo in ("team/a", "team/b/c", "teamwork/x", "other/y"):
        await registry.image(repo, "v1", [os.urandom(100)])
    deleted = await registry.http.delete("/wharf/v1/namespaces/team")
    assert deleted.status_code == 200, deleted.text
    assert [r["repository"] for r in deleted.json()["repositories"]] == ["team/a", "team/b/c"]
    assert (await registry.http.get("/v2/_catalog")).json()["repositories"] == ["other/y", "teamwork/x"]


async def test_immutable_tags_stop_a_whole_repository_delete(tmp_path):
    reg = Registry(tmp_path, immutability=[{"repositories": ["team/**"], "tags": ["v.*"], "name": "releases"}])
    try:
        await reg.image("team/app", "v1", [os.urandom(100)])
        refused = await reg.http.delete("/wharf/v1/repositories/team/app")
        assert refused.status_code == 403 and "releases" in refused.json()["errors"][0]["message"]
        refused = await reg.http.delete("/wharf/v1/namespaces/team/")
        assert refused.status_code == 403
        assert (await reg.http.get("/v2/team/app/manifests/v1", headers=ANY)).status_code == 200
    finally:
        await reg.close()


async def test_pushes_into_a_repository_being_deleted_are_refused_not_failed(registry):
    await registry.image("team/app", "v1", [os.urandom(100)])
    layer = os.urandom(100)
    await registry.blob("team/app", layer)
    remover = registry.services.repositories
    started = asyncio.Event()
    release = asyncio.Event()
    original = remover._check_frozen

    async def held(repos: list[str]) -> None:
        started.set()
        await release.wait()
        await original(repos)

    remover._check_frozen = held  # type: ignore[method-assign]
    deleting = asyncio.create_task(registry.http.delete("/wharf/v1/namespaces/team"))
    await asyncio.wait_for(started.wait(), 10)
    refused = await registry.push_blob("team/new", os.urandom(50))
    assert refused.status_code == 403 and "being deleted" in refused.json()["errors"][0]["message"]
    release.set()
    assert (await deleting).status_code == 200
    assert (await registry.push_blob("team/new", os.urandom(50))).status_code == 201
    # A manifest whose blobs went with the repository is refused as any with missing blobs.
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, b"{}"),
        "layers": [descriptor(OCI_LAYER, layer)],
    }
    body = json.dumps(doc).encode()
    put = await registry.http.put(
        f"/v2/team/app/manifests/{digest_of(body)}", content=body, headers={"Content-Type": OCI_MANIFEST}
    )
    assert put.status_code == 400 and put.json()["errors"][0]["code"] == "MANIFEST_BLOB_UNKNOWN"


async def _add_tags(reg: Registry, repo: str, digest: str, count: int) -> None:
    """`count` more tags on one manifest, written straight into the coordinator (pushing 20,000 images
    would only measure the push path)."""
    record = await reg.services.metadata.get_tag(repo, "base")
    assert record is not None
    now = time.time()
    for start in range(0, count, 60):
        ops: list[Op] = []
        for n in range(start, min(start + 60, count)):
            tag = f"t{n:05d}"
            ops += [
                Put(keys.tag(repo, tag), json.dumps(asdict(TagRecord(digest, OCI_MANIFEST, 100, now - n))).encode()),
                Put(keys.tagged(repo, digest, tag), b""),
            ]
        await reg.kv.txn([], [*ops, TAGS_CHANGED(repo)])


async def _cpu_per_request(reg: Registry, repo: str, count: int) -> float:
    """Median CPU seconds of a tag-details page (each sort, at several places) and a figures read."""
    middle = f"t{count // 2:05d}"
    requests = []
    for sort in ("name", "pushed", "pulled"):
        requests += [
            (f"/wharf/v1/repositories/{repo}/tags", {"sort": sort, "n": 50}),
            (f"/wharf/v1/repositories/{repo}/tags", {"sort": sort, "n": 50, "last": middle}),
        ]
    requests.append((f"/wharf/v1/repositories/{repo}/tags", {"pattern": "t0000*", "n": 50}))
    requests.append((f"/wharf/v1/repositories/{repo}/usage", {}))
    for path, params in requests:  # the first read of a tag version builds the node's sorted copy
        assert (await reg.http.get(path, params=params)).status_code == 200
    samples = []
    for _ in range(5):
        for path, params in requests:
            started = time.process_time()
            response = await reg.http.get(path, params=params)
            samples.append(time.process_time() - started)
            assert response.status_code == 200
    return statistics.median(samples)


async def test_tag_details_and_figures_cost_the_same_per_request_from_100_to_20000_tags(registry):
    cost = {}
    for count in (100, 20_000):
        repo = f"big/app{count}"
        digest = await registry.image(repo, "base", [os.urandom(100)])
        await _add_tags(registry, repo, digest, count)
        await registry.http.get(f"/v2/{repo}/manifests/t00001", headers=ANY)
        await registry.services.pulls.flush()
        await registry.settle()
        cost[count] = await _cpu_per_request(registry, repo, count)
    print(f"CPU per request: 100 tags {cost[100] * 1000:.2f} ms, 20,000 tags {cost[20_000] * 1000:.2f} ms")
    # Flat: a page costs what it returns (a sorted copy kept per tag version), never what the repository holds.
    assert cost[20_000] <= cost[100] * 2 + 0.002, cost


async def test_storage_metrics_name_the_largest_repositories_and_sum_the_rest(tmp_path):
    reg = Registry(tmp_path, inventory={"pullinterval": "1h", "metricstop": 2})
    try:
        await reg.services.usage.build()
        for n, repo in enumerate(("a/one", "a/two", "b/three", "c/four", "d/five")):
            await reg.image(repo, "v1", [os.urandom(1000 * (n + 1))])
        keeper = FigureKeeper(reg.services)
        await keeper.count()
        await keeper.publish()
        text = reg.services.metrics.exposition().decode()
        series = [line for line in text.splitlines() if line.startswith("wharf_storage_repository_bytes{")]
        named = {line.split('repository="')[1].split('"')[0] for line in series}
        assert named == {"d/five", "c/four", "_other"}, named
        assert len(series) == 3 * 3, "linked, exclusive and shared for each"
        total = await reg.services.usage.scope(TOTAL)
        assert f'wharf_storage_bytes{{kind="unique"}} {float(total.unique)}' in text
        namespaces = {
            line.split('namespace="')[1].split('"')[0]
            for line in text.splitlines()
            if line.startswith("wharf_storage_namespace_bytes{")
        }
        assert namespaces == {"d/", "c/", "_other"}
    finally:
        await reg.close()
