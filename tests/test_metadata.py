"""Metadata records on the embedded KV: one transaction per change, never a torn state."""

from __future__ import annotations

import asyncio
import json

import pytest

from coordinator import keys
from coordinator.embedded import EmbeddedKV
from coordinator.metadata import ManifestRecord, Metadata, MissingReferences
from coordinator.uploads import SessionChanged, UploadSession

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
M1 = "sha256:" + "1" * 64
M2 = "sha256:" + "2" * 64
IMAGE = "application/vnd.oci.image.manifest.v1+json"


@pytest.fixture()
async def metadata(tmp_path):
    kv = EmbeddedKV(str(tmp_path / "kv.db"))
    yield Metadata(kv)
    await kv.close()


def _record(digest: str, blobs: list[str], subject: str | None = None) -> ManifestRecord:
    return ManifestRecord(
        digest=digest, media_type=IMAGE, size=100, blobs=blobs, subject=subject, artifact_type="x/y", pushed=1.0
    )


async def _link(metadata: Metadata, repo: str, *digests: str) -> None:
    for digest in digests:
        await metadata.commit_blob(repo, digest, 10, f"key-{digest}")


async def test_manifest_with_unlinked_blob_is_refused_and_leaves_nothing(metadata):
    await _link(metadata, "team/app", A)
    with pytest.raises(MissingReferences) as caught:
        await metadata.put_manifest("team/app", _record(M1, [A, B]), tag="v1", storage_key="k")
    assert caught.value.blobs == [B]
    assert await metadata.get_tag("team/app", "v1") is None
    assert await metadata.get_manifest("team/app", M1) is None


async def test_blob_linked_in_another_repository_does_not_count(metadata):
    await _link(metadata, "other/app", A)
    with pytest.raises(MissingReferences):
        await metadata.put_manifest("team/app", _record(M1, [A]), tag="v1", storage_key="k")


async def test_concurrent_puts_of_one_tag_end_with_one_consistent_winner(metadata):
    await _link(metadata, "team/app", A, B)
    await asyncio.gather(
        *(metadata.put_manifest("team/app", _record(d, [A]), tag="latest", storage_key="k") for d in (M1, M2) * 10)
    )
    tag = await metadata.get_tag("team/app", "latest")
    assert tag is not None and tag.digest in (M1, M2)
    assert await metadata.get_manifest("team/app", tag.digest) is not None


async def test_deleting_a_manifest_removes_its_tags_and_referrer_entry(metadata):
    await _link(metadata, "team/app", A)
    await metadata.put_manifest("team/app", _record(M1, [A]), tag="v1", storage_key="k")
    await metadata.put_manifest("team/app", _record(M2, [A], subject=M1), tag="sig", storage_key="k")
    assert [r["digest"] for r in await metadata.list_referrers("team/app", M1)] == [M2]
    assert await metadata.delete_manifest("team/app", M2)
    assert await metadata.get_tag("team/app", "sig") is None
    assert await metadata.list_referrers("team/app", M1) == []
    assert await metadata.get_tag("team/app", "v1") is not None
    assert not await metadata.delete_manifest("team/app", M2)


async def test_tags_and_repositories_page_in_lexical_order(metadata):
    await _link(metadata, "team/app", A)
    for tag in ["b", "a", "C", "a1", "_z"]:
        await metadata.put_manifest("team/app", _record(M1, [A]), tag=tag, storage_key="k")
    assert await metadata.list_tags("team/app") == ["C", "_z", "a", "a1", "b"]
    assert await metadata.list_tags("team/app", limit=2) == ["C", "_z"]
    assert await metadata.list_tags("team/app", last="_z", limit=2) == ["a", "a1"]
    for repo in ["team/app-x", "team/app/sub", "a"]:
        await _link(metadata, repo, A)
    assert await metadata.list_repositories() == ["a", "team/app", "team/app-x", "team/app/sub"]
    assert await metadata.list_repositories(last="team/app", limit=1) == ["team/app-x"]
    # A repository whose name extends another's never leaks into its tags.
    assert await metadata.list_tags("team/app-x") == []


async def test_mount_links_only_what_the_source_has(metadata):
    await _link(metadata, "team/app", A)
    assert await metadata.mount_blob("other/app", A, "team/app") is not None
    assert await metadata.get_link("other/app", A) is not None
    assert await metadata.mount_blob("other/app", B, "team/app") is None


async def test_committing_a_blob_ends_its_upload_session_in_the_same_transaction(metadata):
    kv = metadata.kv
    revision = await kv.put(keys.upload("u1"), b"{}")
    await metadata.commit_blob("team/app", A, 10, "k", upload=UploadSession("u1", "team/app", mod_revision=revision))
    assert await kv.get(keys.upload("u1")) is None
    blob = await kv.get(keys.blob(A))
    assert blob is not None and json.loads(blob.value)["size"] == 10


async def test_a_commit_whose_session_was_cancelled_records_nothing(metadata):
    kv = metadata.kv
    revision = await kv.put(keys.upload("u2"), b"{}")
    await kv.delete(keys.upload("u2"))
    with pytest.raises(SessionChanged):
        await metadata.commit_blob(
            "team/app", B, 10, "k", upload=UploadSession("u2", "team/app", mod_revision=revision)
        )
    assert await kv.get(keys.blob(B)) is None and await metadata.get_link("team/app", B) is None


class _CountingKV:
    """Counts the keys a KV hands out, to show what an operation reads."""

    def __init__(self, kv: EmbeddedKV) -> None:
        self.kv = kv
        self.read = 0

    def __getattr__(self, name: str):
        return getattr(self.kv, name)

    async def range(self, prefix: str, **kwargs):
        found = await self.kv.range(prefix, **kwargs)
        self.read += len(found)
        return found


@pytest.mark.parametrize("others", [10, 2000])
async def test_deleting_a_manifest_reads_only_the_tags_that_point_at_it(tmp_path, others):
    kv = EmbeddedKV(str(tmp_path / "kv.db"))
    await kv.put(keys.TAG_INDEX_BUILT, b"{}")
    counting = _CountingKV(kv)
    metadata = Metadata(counting)  # type: ignore[arg-type]
    try:
        await _link(metadata, "team/app", A)
        await metadata.put_manifest("team/app", _record(M2, [A]), tag="other-0", storage_key="k")
        for n in range(others):
            await metadata.put_manifest("team/app", _record(M2, [A]), tag=f"other-{n}", storage_key="k")
        for tag in ("v1", "v1.0", "latest"):
            await metadata.put_manifest("team/app", _record(M1, [A]), tag=tag, storage_key="k")
        # A tag that pointed at M1 and moved away stays.
        await metadata.put_manifest("team/app", _record(M1, [A]), tag="moved", storage_key="k")
        await metadata.put_manifest("team/app", _record(M2, [A]), tag="moved", storage_key="k")
        counting.read = 0
        assert await metadata.delete_manifest("team/app", M1)
        assert counting.read <= 5, f"read {counting.read} keys to delete a manifest with 3 tags"
        remaining = await metadata.list_tags("team/app")
        assert "v1" not in remaining and "latest" not in remaining and "moved" in remaining
        assert len(remaining) == others + 1
        assert await kv.range(keys.tags_of_digest("team/app", M1)) == []
    finally:
        await kv.close()


async def test_a_store_from_before_the_tag_index_is_indexed_once(metadata):
    await _link(metadata, "team/app", A)
    for tag in ("a", "b"):
        await metadata.put_manifest("team/app", _record(M1, [A]), tag=tag, storage_key="k")
    await metadata.kv.delete(keys.TAGGED, prefix=True)  # as an older Wharf left it
    assert sorted(await metadata.tags_of_digest("team/app", M1)) == ["a", "b"], "read from the tags until built"
    assert await metadata.build_tag_index() == 2
    assert await metadata.build_tag_index() == 0
    assert sorted(await metadata.tags_of_digest("team/app", M1)) == ["a", "b"]
