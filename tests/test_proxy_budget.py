"""An upstream's byte budget: least recently pulled images evicted, every remaining cached image whole."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from oci_client import assert_error, digest_of
from pullthrough import ACCEPT, blob_gets, blob_gets_after, layer, pull, push_image, upstream_registry
from secure_registry import wharf_cli
from services import wait_until
from wharf_process import WharfProcess

KIB = 1024
BUDGET = 800 * KIB
BASE = layer("base", 100 * KIB)


def _own(i: int) -> bytes:
    return layer(f"own-{i}", 300 * KIB)


def _stored_blob_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "docker/registry/v2/blobs").rglob("data"))


def _sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample, whatever the order of its labels; 0 when absent."""
    for line in metrics.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{", 1)[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    return 0.0


def test_budget_evicts_least_recently_pulled_and_every_remaining_image_stays_whole(tmp_path):
    upstream = upstream_registry(tmp_path / "upstream").start()
    wharf = WharfProcess(
        tmp_path / "wharf",
        proxy={"upstreams": [{"prefix": "hub/", "remoteurl": upstream.url, "maxbytes": BUDGET}]},
        inventory={"pullinterval": "0.2s"},
    )
    config = str(wharf.config_path)

    def listing() -> dict[str, dict]:
        return {r["repository"]: r for r in json.loads(wharf_cli("cache", "ls", "--json", config).stdout)}

    def status() -> dict:
        return json.loads(wharf_cli("cache", "status", "--json", config).stdout)["upstreams"][0]

    def settled(images: int) -> dict:
        """Wait for the budget to be met with `images` cached and their evicted blobs collected."""

        def met() -> dict | None:
            row = status()
            return row if row["images"] == images and row["used"] <= BUDGET else None

        row = wait_until(met, timeout=60, interval=0.5, what="usage within the budget")
        wait_until(lambda: _stored_blob_bytes(wharf.data_dir / "registry") <= BUDGET, timeout=60, what="GC")
        return row

    def all_cached_pull_whole(http: httpx.Client) -> list[str]:
        """With the upstream stopped, every image the cache lists pulls whole (nothing evicted from under it)."""
        cached = listing()
        for repo, row in cached.items():
            assert row["complete"], f"{repo} lost a blob"
            assert pull(http, repo, row["tags"][0]).digest == row["digest"]
        return sorted(cached)

    try:
        images = [push_image(upstream, f"library/app{i}", "1", [BASE, _own(i)]) for i in range(4)]
        with wharf, httpx.Client(base_url=wharf.url, timeout=60, trust_env=False) as http:
            pull(http, "hub/library/app0", "1")
            pull(http, "hub/library/app1", "1")
            assert settled(2)["evictions"] == 0
            # app0 is pulled again: app1 is now the least recently pulled.
            wait_until(lambda: listing()["hub/library/app1"]["last_pulled"], timeout=20, what="app1's pull")
            pull(http, "hub/library/app0", "1")
            wait_until(
                lambda: (
                    (rows := listing())["hub/library/app0"]["last_pulled"] > rows["hub/library/app1"]["last_pulled"]
                ),
                timeout=20,
                what="app0's second pull",
            )
            pull(http, "hub/library/app2", "1")
            settled(2)
            assert sorted(listing()) == ["hub/library/app0", "hub/library/app2"]
            row = wait_until(lambda: (r := status())["evictions"] and r, timeout=20, what="the eviction counted")
            assert row["evictions"] == 1 and row["evicted_bytes"] >= len(_own(1))
            # The shared base layer stays (other images use it); app1's own layer went from storage.
            assert not list((wharf.data_dir / "registry").rglob(digest_of(_own(1)).split(":")[1]))
            upstream.stop()
            assert all_cached_pull_whole(http) == ["hub/library/app0", "hub/library/app2"]
            gone = http.get("/v2/hub/library/app1/manifests/1", headers={"Accept": ACCEPT})
            assert_error(gone, 503, "UNAVAILABLE")
            metrics = httpx.get(wharf.metrics_url, timeout=10, trust_env=False).text
            assert _sample(metrics, "wharf_proxy_evictions_total", upstream="hub") == 1
            assert _sample(metrics, "wharf_proxy_upstream_errors_total", upstream="hub", reason="unavailable") >= 1
            assert _sample(metrics, "wharf_proxy_hits_total", upstream="hub", kind="blob") >= 4
            # Back up: the evicted image is fetched again on its next pull, and the budget still holds.
            upstream.start()
            fetched = blob_gets(upstream, digest_of(_own(1)))
            assert pull(http, "hub/library/app1", "1").digest == images[1].digest
            assert blob_gets_after(upstream, digest_of(_own(1)), fetched + 1) == fetched + 1
            pull(http, "hub/library/app3", "1")
            settled(2)
            upstream.stop()
            remaining = all_cached_pull_whole(http)
            assert len(remaining) == 2 and "hub/library/app3" in remaining
            wait_until(lambda: status()["evictions"] >= 2, timeout=20, what="the second eviction counted")
    finally:
        upstream.stop()
