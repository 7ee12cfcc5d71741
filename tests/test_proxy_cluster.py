"""One upstream fetch per missing blob for the whole cluster: three nodes on one etcd and one storage."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
from pullthrough import blob_gets, blob_gets_after, layer, pull, push_image, upstream_registry
from wharf_process import WharfProcess

PULLS = 16


def test_concurrent_pulls_of_one_uncached_image_through_three_nodes_fetch_each_blob_once(tmp_path, etcd):
    upstream = upstream_registry(tmp_path / "upstream").start()
    nodes: list[WharfProcess] = []
    try:
        layers = [layer(f"big-{i}", 3 * 1024 * 1024) for i in range(3)]
        image = push_image(upstream, "library/python", "3.12", layers)
        with upstream.http() as direct:
            expected = pull(direct, "library/python", "3.12")
        before = {digest: blob_gets(upstream, digest) for digest in expected.blobs}
        prefix = f"/wharf-test-{uuid.uuid4().hex[:8]}/"
        for i in range(3):
            nodes.append(
                WharfProcess(
                    tmp_path / f"node{i}",
                    storage={"filesystem": {"rootdirectory": str(tmp_path / "shared")}, "delete": {"enabled": True}},
                    coordinator={"etcd": {"endpoints": etcd.endpoints, "prefix": prefix}},
                    cluster={"node": f"node{i}", "leasettl": 3},
                    proxy={"remoteurl": upstream.url},
                )
            )
        for node in nodes:
            node.start()
        start = threading.Barrier(PULLS)

        def one(i: int) -> dict[str, bytes]:
            node = nodes[i % len(nodes)]
            with httpx.Client(base_url=node.url, timeout=120, trust_env=False) as http:
                start.wait(30)
                got = pull(http, "library/python", "3.12")
            assert got.digest == image.digest
            return {**got.manifests, **got.blobs}

        with ThreadPoolExecutor(PULLS) as pool:
            results = list(pool.map(one, range(PULLS)))
        for result in results:
            assert result == {**expected.manifests, **expected.blobs}
        # Exactly one upstream GET per blob, for 16 pulls through 3 nodes.
        gets = {d: blob_gets_after(upstream, d, before[d] + 1) - before[d] for d in expected.blobs}
        assert gets == {d: 1 for d in expected.blobs}
        fetched = [line for node in nodes for line in node.log_text().splitlines() if '"msg": "fetched sha256:' in line]
        assert len(fetched) == len(expected.blobs), "one node fetched each blob; the others waited and read it"
        assert not etcd.records(prefix, "cache/fetch/"), "every fetch claim went when its fetch ended"
    finally:
        for node in nodes:
            node.stop()
        upstream.stop()
