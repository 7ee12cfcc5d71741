"""Cached content is ordinary content of its repository: quotas, retention and GC apply by hosted rules.

One `wharf serve` caches `hub/` from Debian's docker-registry, with a quota on `hub/quota/` and a
retention policy on `hub/library/**`. A fetch that would cross the quota is refused before any byte
is sent (403 DENIED naming the quota, nothing stored); retention removes a cached tag as it would a
pushed one, GC then deletes the layer only that image used (a layer another cached image shares
stays), and the next pull of the removed tag fetches it from the upstream again.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from oci_client import assert_error, digest_of
from pullthrough import ACCEPT, blob_gets, blob_gets_after, layer, pull, push_image, upstream_registry
from secure_registry import wharf_cli
from wharf_process import WharfProcess

KIB = 1024


def _stored(root: Path, digest: str) -> bool:
    return any((root / "docker/registry/v2/blobs").rglob(digest.split(":", 1)[1]))


def test_cached_content_follows_quotas_retention_and_gc_as_hosted_content(tmp_path):
    upstream = upstream_registry(tmp_path / "upstream").start()
    try:
        big = layer("big", 400 * KIB)
        push_image(upstream, "quota/big", "1", [big])
        small = push_image(upstream, "quota/small", "1", [layer("small", 100 * KIB)])
        base, own1, own2 = layer("base", 64 * KIB), layer("own-1", 64 * KIB), layer("own-2", 64 * KIB)
        first = push_image(upstream, "library/app", "1", [base, own1])
        second = push_image(upstream, "library/app", "2", [base, own2])
        wharf = WharfProcess(
            tmp_path / "wharf",
            proxy={"upstreams": [{"prefix": "hub/", "remoteurl": upstream.url}]},
            quotas=[{"namespace": "hub/quota/", "limit": "300KiB"}],
            retention={"policies": [{"name": "cache", "repositories": ["hub/library/**"], "keeplast": 1}]},
        )
        config = str(wharf.config_path)
        root = wharf.data_dir / "registry"
        with wharf, httpx.Client(base_url=wharf.url, timeout=60, trust_env=False) as http:
            # Quotas: the manifest is cached, the layer that would cross the limit is refused up front.
            assert http.get("/v2/hub/quota/big/manifests/1", headers={"Accept": ACCEPT}).status_code == 200
            refused = http.get(f"/v2/hub/quota/big/blobs/{digest_of(big)}")
            assert_error(refused, 403, "DENIED")
            assert refused.json()["errors"][0]["detail"]["quota"] == "hub/quota/"
            assert not _stored(root, digest_of(big))
            assert pull(http, "hub/quota/small", "1").digest == small.digest

            # Retention and GC: tag 1 was fetched first, so keeplast 1 keeps only tag 2.
            assert pull(http, "hub/library/app", "1").digest == first.digest
            assert pull(http, "hub/library/app", "2").digest == second.digest
            wharf_cli("retention", "apply", config)
            # The tag is gone from the cache (tags/list still names it: the upstream has it).
            listed = json.loads(wharf_cli("cache", "ls", "--json", config).stdout)
            kept = {row["digest"]: row["tags"] for row in listed if row["repository"] == "hub/library/app"}
            assert kept == {first.digest: [], second.digest: ["2"]}
            wharf_cli("gc", "--delete-untagged", config)
            assert not _stored(root, digest_of(own1))
            assert _stored(root, digest_of(own2)) and _stored(root, digest_of(base))
            fetched = blob_gets(upstream, digest_of(own1))
            assert pull(http, "hub/library/app", "1").digest == first.digest
            assert blob_gets_after(upstream, digest_of(own1), fetched + 1) == fetched + 1
            assert blob_gets(upstream, digest_of(base)) == 1  # still stored: never fetched again
    finally:
        upstream.stop()
