"""The pull-through cache's coordinator records on the embedded KV: tag checks, fetch claims, counts,
and what an upstream's cache holds, with least-recently-pulled eviction that spares shared blobs."""

from __future__ import annotations

import asyncio

import pytest

from coordinator import keys
from coordinator.cache import CacheCounts, CacheRecords, add_counts, cache_contents, evict, read_counts
from coordinator.embedded import EmbeddedKV
from coordinator.gc import Collector
from coordinator.metadata import ManifestRecord, Metadata, MissingReferences

IMAGE = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"


def _digest(name: str) -> str:
    return "sha256:" + (name * 64)[:64]


BASE, A, B, C = _digest("0"), _digest("a"), _digest("b"), _digest("c")
M1, M2, M3, HOSTED, IDX = _digest("1"), _digest("2"), _digest("3"), _digest("4"), _digest("5")


@pytest.fixture()
async def kv(tmp_path):
    store = EmbeddedKV(str(tmp_path / "kv.db"))
    yield store
    await store.close()


def _manifest(digest: str, blobs: list[str], children: list[str] | None = None, pushed: float = 1.0) -> ManifestRecord:
    return ManifestRecord(
        digest=digest,
        media_type=INDEX if children else IMAGE,
        size=100,
        blobs=blobs,
        manifests=children or [],
        pushed=pushed,
    )


async def _cache(metadata: Metadata, repo: str, tag: str, record: ManifestRecord, sizes: dict[str, int]) -> None:
    """As the cache stores an image: the manifest first, then each blob as a client fetches it."""
    await metadata.put_manifest(repo, record, tag=tag, storage_key=f"m-{record.digest}", references_follow=True)
    for blob in record.blobs:
        await metadata.commit_blob(repo, blob, sizes[blob], f"b-{blob}")


async def test_a_cached_manifest_is_recorded_before_the_blobs_it_names(kv):
    metadata = Metadata(kv)
    with pytest.raises(MissingReferences):
        await metadata.put_manifest("team/app", _manifest(M1, [A]), tag="v1", storage_key="k")
    await metadata.put_manifest("hub/app", _manifest(M1, [A]), tag="v1", storage_key="k", references_follow=True)
    assert (await metadata.get_tag("hub/app", "v1")).digest == M1
    contents = await cache_contents(kv, "hub/")
    assert [(i.repository, i.tags, i.complete) for i in contents.images] == [("hub/app", ["v1"], False)]
    await metadata.commit_blob("hub/app", A, 10, "b")
    contents = await cache_contents(kv, "hub/")
    assert contents.images[0].complete and contents.images[0].size == 110


async def test_tag_check_is_fresh_for_the_ttl_and_for_the_digest_it_confirmed(kv):
    records = CacheRecords(kv)
    metadata = Metadata(kv)
    await metadata.put_manifest("hub/app", _manifest(M1, []), tag="v1", storage_key="k", references_follow=True)
    await records.confirm("hub/app", "v1", M1)
    tag, check = await records.tag("hub/app", "v1")
    assert tag is not None and check is not None
    assert check.fresh(tag.digest, ttl=60) and not check.fresh(M2, ttl=60)
    assert not check.fresh(tag.digest, ttl=60, now=check.checked + 61)


async def test_one_fetch_claim_at_a_time_and_waiters_see_it_go(kv):
    records = CacheRecords(kv)
    lease = await kv.grant_lease(5)
    assert await records.claim_fetch(A, "node0", lease)
    assert not await records.claim_fetch(A, "node1", lease)
    assert await records.fetches() == [(A, "node0")]
    assert not await records.wait_fetched(A, timeout=0.1)
    await records.release_fetch(A, "node1")  # not the holder: nothing happens
    assert await records.fetches() == [(A, "node0")]
    waiting = asyncio.create_task(records.wait_fetched(A, timeout=10))
    await records.release_fetch(A, "node0")
    assert await waiting
    assert await records.claim_fetch(A, "node1", lease)
    await kv.revoke_lease(lease)  # the holder's node died: its claim goes with its lease
    assert await records.wait_fetched(A, timeout=1)


async def test_counts_from_every_node_add_up(kv):
    await asyncio.gather(*(add_counts(kv, "hub", CacheCounts(hits=3, misses=1, upstream_bytes=10)) for _ in range(8)))
    total = await read_counts(kv, "hub")
    assert (total.hits, total.misses, total.upstream_bytes) == (24, 8, 80)
    assert total.hit_ratio == 0.75


async def _three_images(kv: EmbeddedKV) -> dict[str, int]:
    """Three cached images sharing a base layer, cached in order 1, 2, 3; a hosted image uses the base too."""
    metadata = Metadata(kv)
    sizes = {BASE: 1000, A: 2000, B: 2000, C: 2000}
    await _cache(metadata, "hub/one", "latest", _manifest(M1, [BASE, A], pushed=1.0), sizes)
    await _cache(metadata, "hub/two", "latest", _manifest(M2, [BASE, B], pushed=2.0), sizes)
    await _cache(metadata, "hub/three", "latest", _manifest(M3, [BASE, C], pushed=3.0), sizes)
    await metadata.commit_blob("team/app", BASE, 1000, f"b-{BASE}")
    await metadata.put_manifest("team/app", _manifest(HOSTED, [BASE]), tag="v1", storage_key="h")
    return sizes


async def test_usage_counts_each_stored_digest_once(kv):
    await _three_images(kv)
    contents = await cache_contents(kv, "hub/")
    assert len(contents.images) == 3
    # Three manifests, the shared base once, three own layers.
    assert contents.usage == 3 * 100 + 1000 + 3 * 2000
    assert {i.repository: i.size for i in contents.images} == {"hub/one": 3100, "hub/two": 3100, "hub/three": 3100}


async def test_eviction_takes_the_least_recently_pulled_first(kv):
    await _three_images(kv)

    async def pulled(wanted):
        # hub/one was cached first but pulled last.
        return {("hub/one", M1): 100.0, ("hub/two", M2): 10.0}

    contents = await cache_contents(kv, "hub/", pulled)
    budget = contents.usage - 1
    assert [i.repository for i in contents.over_budget(budget)] == ["hub/three"]
    assert [i.repository for i in contents.over_budget(5000)] == ["hub/three", "hub/two"]
    # An image's own bytes come back; the shared base stays while any image uses it.
    freed = await evict(kv, contents, contents.over_budget(5000))
    assert freed == 2 * (100 + 2000)
    left = await cache_contents(kv, "hub/", pulled)
    assert [i.repository for i in left.images] == ["hub/one"] and left.usage == 3100
    assert await Metadata(kv).get_tag("hub/two", "latest") is None
    assert await kv.get(keys.cache_tag("hub/two", "latest")) is None


async def test_evicted_blobs_go_with_gc_and_shared_and_hosted_ones_stay(kv):
    await _three_images(kv)
    contents = await cache_contents(kv, "hub/")
    await evict(kv, contents, contents.over_budget(3100))
    deleted: list[str] = []

    async def delete(key: str) -> None:
        deleted.append(key)

    await Collector(kv, grace=3600).run(delete)
    # Never pulled: the first cached went first (hub/one, then hub/two).
    assert sorted(deleted) == sorted([f"b-{A}", f"b-{B}", f"m-{M1}", f"m-{M2}"])
    metadata = Metadata(kv)
    assert await metadata.get_blob(BASE) is not None and await metadata.get_blob(C) is not None
    assert (await metadata.get_tag("team/app", "v1")).digest == HOSTED


async def test_an_index_is_one_image_and_its_children_go_with_it(kv):
    metadata = Metadata(kv)
    sizes = {A: 500, B: 500}
    await _cache(metadata, "hub/multi", "latest", _manifest(IDX, [], [M1, M2]), sizes)
    await _cache(metadata, "hub/multi", "x", _manifest(M1, [A]), sizes)  # a child pulled by digest
    await metadata.delete_tag("hub/multi", "x")
    contents = await cache_contents(kv, "hub/")
    assert [(i.digest, sorted(i.manifests), i.complete) for i in contents.images] == [(IDX, sorted([IDX, M1]), False)]
    await evict(kv, contents, contents.images)
    assert await metadata.get_manifest("hub/multi", IDX) is None
    assert await metadata.get_manifest("hub/multi", M1) is None
