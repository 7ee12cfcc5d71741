"""Reading and writing registry:2's repository tree, against stores Debian's `docker-registry` wrote and serves."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from images import assert_same_image
from registry2 import DockerRegistry, PushedStore, assert_serves, fill_many_tags, fill_store
from skopeo import pull

from node.storage import layout, registry2
from node.storage.driver import StorageDriver, StoredObject
from node.storage.filesystem import FilesystemDriver
from node.storage.s3 import S3Driver

SHA = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


class CountingStorage:
    """A driver that counts the calls registry2 makes (everything else passes straight through)."""

    def __init__(self, inner: StorageDriver) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def read_bytes(self, key: str) -> bytes:
        self.calls["read_bytes"] += 1
        return await self.inner.read_bytes(key)

    async def write_bytes(self, key: str, data: bytes) -> None:
        self.calls["write_bytes"] += 1
        await self.inner.write_bytes(key, data)

    async def stat(self, key: str) -> int | None:
        self.calls["stat"] += 1
        return await self.inner.stat(key)

    async def delete(self, key: str) -> None:
        self.calls["delete"] += 1
        await self.inner.delete(key)

    async def delete_many(self, keys: list[str]) -> None:
        self.calls["delete"] += 1
        await self.inner.delete_many(keys)

    def list(self, prefix: str) -> AsyncIterator[str]:
        self.calls["list"] += 1
        return self.inner.list(prefix)

    def list_objects(self, prefix: str) -> AsyncIterator[StoredObject]:
        self.calls["list_objects"] += 1
        return self.inner.list_objects(prefix)


@dataclass
class Place:
    """Storage roots of one kind (filesystem, or S3 under a root directory each) for a test."""

    kind: str
    tmp: Path
    s3: Any = None

    def __post_init__(self) -> None:
        self.roots: list[str] = []
        self.drivers: list[StorageDriver] = []

    def new_root(self) -> str:
        root = str(self.tmp / f"root{len(self.roots)}") if self.kind == "filesystem" else f"/test-{uuid.uuid4().hex}"
        self.roots.append(root)
        return root

    def driver(self, root: str) -> StorageDriver:
        store: StorageDriver = (
            FilesystemDriver(root) if self.kind == "filesystem" else S3Driver(self.s3.storage_config(root))
        )
        self.drivers.append(store)
        return store

    def registry(self, root: str, name: str) -> DockerRegistry:
        workdir = self.tmp / name
        if self.kind == "filesystem":
            return DockerRegistry.on_filesystem(workdir, Path(root))
        return DockerRegistry.on_s3(workdir, self.s3, root)

    async def close(self) -> None:
        for store in self.drivers:
            await store.close()
        if self.s3 is not None:
            for root in self.roots:
                self.s3.remove_prefix(root.strip("/") + "/")


@pytest.fixture(params=["filesystem", "s3"])
async def place(request, tmp_path) -> AsyncIterator[Place]:
    where = Place(request.param, tmp_path, request.getfixturevalue("s3_server") if request.param == "s3" else None)
    yield where
    await where.close()


@dataclass
class Source:
    """A store that a running `docker-registry` wrote, and what was pushed into it."""

    registry: DockerRegistry
    storage: StorageDriver
    store: PushedStore
    started: float
    finished: float


@pytest.fixture()
def source(place, tmp_path) -> Iterator[Source]:
    root = place.new_root()
    with place.registry(root, "source") as registry:
        started = time.time()
        store = fill_store(registry, tmp_path)
        yield Source(registry, place.driver(root), store, started, time.time())


async def _objects(storage: StorageDriver) -> dict[str, tuple[int, float]]:
    return {item.key: (item.size, item.modified) async for item in storage.list_objects(layout.ROOT)}


async def _link_keys(storage: StorageDriver) -> set[str]:
    """Every link key of the tree (upload sessions left aside)."""
    found = set()
    async for key in storage.list(layout.REPOSITORIES):
        parsed = layout.parse_repository_key(key)
        if parsed is not None and parsed.kind != "other":
            found.add(key)
    return found


async def _read_store(storage: StorageDriver) -> dict[str, registry2.RepositoryTree]:
    problems: list[registry2.Problem] = []
    names = [name async for name in registry2.repositories(storage, problems)]
    assert problems == []
    blobs = await registry2.list_blobs(storage, problems)
    assert problems == []
    return {name: await registry2.read_repository(storage, name, blobs=blobs) for name in names}


# -- reading what docker-registry wrote ----------------------------------------------------------


async def test_read_repository_gives_exactly_the_tags_manifests_and_layers_docker_registry_was_pushed(source):
    storage = CountingStorage(source.storage)
    trees = await _read_store(storage)  # type: ignore[arg-type]
    assert sorted(trees) == sorted(source.store.repositories) == ["library/base", "team/app", "team/sub/app"]
    for name, tree in trees.items():
        pushed = source.store.repositories[name]
        assert {tag: t.digest for tag, t in tree.tags.items()} == pushed.tags, name
        assert tree.revisions == pushed.revisions, name
        assert tree.layers == pushed.layers, name
        assert tree.tag_index == {tag: {digest} for tag, digest in pushed.tags.items()}, name
        assert tree.problems == [] and tree.skipped == [], name
        for tag in tree.tags.values():
            # When registry:2 wrote the tag (S3 keeps whole seconds).
            assert source.started - 2 <= tag.pushed <= source.finished + 2
    # The shared layer is linked in both repositories that use it, and stored once.
    assert trees["team/app"].layers & trees["team/sub/app"].layers
    assert trees["team/app"].layers & trees["library/base"].layers
    # Cost: one listing for the names, one of the blob store, two per repository; one read per link.
    links = await _link_keys(source.storage)
    assert storage.calls == {"list": 1, "list_objects": 1 + 2 * len(trees), "read_bytes": len(links)}


async def test_without_link_checks_only_tag_links_are_read(source):
    storage = CountingStorage(source.storage)
    tree = await registry2.read_repository(storage, "team/app", check_links=False)  # type: ignore[arg-type]
    pushed = source.store.repositories["team/app"]
    assert {tag: t.digest for tag, t in tree.tags.items()} == pushed.tags
    assert (tree.revisions, tree.layers) == (pushed.revisions, pushed.layers)
    # Without `blobs`, one stat per distinct linked digest checks that the blob data is there.
    distinct = len(pushed.revisions | pushed.layers)
    assert storage.calls == {"list_objects": 2, "read_bytes": len(pushed.tags), "stat": distinct}


async def test_blob_listing_gives_every_blob_with_its_size_in_one_listing(source):
    storage = CountingStorage(source.storage)
    blobs = await registry2.list_blobs(storage)  # type: ignore[arg-type]
    expected = {**source.store.blobs, **source.store.manifests}
    assert {digest: item.size for digest, item in blobs.items()} == {d: len(b) for d, b in expected.items()}
    assert all(item.key == layout.blob_key(digest) for digest, item in blobs.items())
    assert storage.calls == {"list_objects": 1}


# -- writing a tree that docker-registry serves ---------------------------------------------------


async def test_written_links_make_docker_registry_serve_every_tag_byte_identical(place, source, tmp_path):
    trees = await _read_store(source.storage)
    root = place.new_root()
    target = place.driver(root)
    # The blobs are the caller's job: copied by the test to their content-addressed keys.
    for digest in await registry2.list_blobs(source.storage):
        key = layout.blob_key(digest)
        await target.write_bytes(key, await source.storage.read_bytes(key))
    counts = registry2.Written()
    for name, tree in trees.items():
        tags = {tag: t.digest for tag, t in tree.tags.items()}
        written = await registry2.write_repository(target, name, tags, tree.revisions, tree.layers)
        for kind in ("layers", "revisions", "tag_index", "tags", "unchanged"):
            setattr(counts, kind, getattr(counts, kind) + getattr(written, kind))
    # Exactly the links docker-registry itself wrote, no more, no fewer.
    assert await _link_keys(target) == await _link_keys(source.storage)
    assert counts.unchanged == 0 and counts.total == len(await _link_keys(source.storage))
    assert counts.tags == counts.tag_index == sum(len(t.tags) for t in trees.values())

    before = await _objects(target)
    with place.registry(root, "target") as served:
        assert assert_serves(served, source.store) > 40
        # And through skopeo: the multi-arch index and the skopeo-pushed image, from both registries.
        for reference, tag in (("team/sub/app:latest", "latest"), ("library/base:1.0", "1.0")):
            pull(f"{source.registry.host}/{reference}", tmp_path / "a" / tag, tag, "--all", "--preserve-digests")
            pull(f"{served.host}/{reference}", tmp_path / "b" / tag, tag, "--all", "--preserve-digests")
            assert_same_image(tmp_path / "a" / tag, tag, tmp_path / "b" / tag, tag)

    # A second run writes nothing, and nothing was removed or rewritten by anyone.
    counting = CountingStorage(target)
    for name, tree in trees.items():
        tags = {tag: t.digest for tag, t in tree.tags.items()}
        again = await registry2.write_repository(counting, name, tags, tree.revisions, tree.layers)  # type: ignore[arg-type]
        assert again.total == 0 and again.unchanged > 0
    assert counting.calls["write_bytes"] == counting.calls["delete"] == 0
    assert await _objects(target) == before


async def test_write_adds_and_moves_links_and_never_deletes(place):
    storage = CountingStorage(place.driver(place.new_root()))
    for digest in (SHA, OTHER):
        await storage.write_bytes(layout.blob_key(digest), b"blob")
    name = "team/app"
    first = await registry2.write_repository(storage, name, {"v1": SHA, "old": SHA}, [], [])  # type: ignore[arg-type]
    assert (first.revisions, first.tag_index, first.tags, first.layers) == (1, 2, 2, 0)
    # v1 moves to OTHER; "old" is no longer named; a malformed layer link is repaired.
    await storage.write_bytes(layout.layer_link_key(name, SHA), SHA.encode() + b"\n")
    before = await _objects(storage.inner)
    storage.calls.clear()
    moved = await registry2.write_repository(storage, name, {"v1": OTHER}, [SHA], [SHA])  # type: ignore[arg-type]
    assert (moved.layers, moved.revisions, moved.tag_index, moved.tags) == (1, 1, 1, 1)
    assert moved.unchanged == 1  # SHA's revision link
    assert storage.calls["delete"] == 0
    after = await _objects(storage.inner)
    assert set(before) <= set(after)
    tree = await registry2.read_repository(storage, name)  # type: ignore[arg-type]
    assert {tag: t.digest for tag, t in tree.tags.items()} == {"v1": OTHER, "old": SHA}
    assert tree.tag_index == {"v1": {SHA, OTHER}, "old": {SHA}}
    assert tree.layers == {SHA} and tree.problems == []


async def test_write_refuses_invalid_names_tags_and_digests_before_writing(place):
    from node.errors import DigestInvalid, NameInvalid, TagInvalid

    storage = CountingStorage(place.driver(place.new_root()))
    for name, tags, layers, error in (
        ("Team/App", {}, [], NameInvalid),
        ("team/app", {"-bad": SHA}, [], TagInvalid),
        ("team/app", {"v1": SHA}, ["sha256:short"], DigestInvalid),
    ):
        with pytest.raises(error):
            await registry2.write_repository(storage, name, tags, [], layers)  # type: ignore[arg-type]
    assert storage.calls["write_bytes"] == 0


# -- what registry:2 could not serve is reported, never raised ------------------------------------


async def test_broken_and_dangling_links_and_invalid_names_are_reported_not_raised(place):
    storage = place.driver(place.new_root())
    name = "team/app"
    for digest in (SHA, OTHER):
        await storage.write_bytes(layout.blob_key(digest), b"manifest")
    good = {
        layout.revision_link_key(name, SHA): SHA,
        layout.tag_current_key(name, "v1"): SHA,
        layout.tag_index_key(name, "v1", SHA): SHA,
    }
    missing = "sha256:" + "c" * 64
    bad = {
        layout.layer_link_key(name, OTHER): SHA,  # names another digest than its key
        layout.layer_link_key(name, missing): missing,  # no blob data
        layout.revision_link_key(name, "sha256:" + "d" * 64): "not a digest",
        layout.tag_current_key(name, "v2"): SHA + "\n",  # Distribution parses it strictly
        layout.tag_current_key(name, "v3"): OTHER,  # no revision link for OTHER
        layout.tag_current_key(name, "-v4"): SHA,  # not a tag
        layout.tag_index_key(name, "v5", SHA): SHA,  # an index without a current link
        f"{layout.REPOSITORIES}{name}/_layers/md5/abcd/link": "md5:abcd",
        f"{layout.REPOSITORIES}Team/App/_manifests/tags/v1/current/link": SHA,
    }
    for key, content in {**good, **bad}.items():
        await storage.write_bytes(key, content.encode())
    await storage.write_bytes(f"{layout.REPOSITORIES}{name}/_manifests/revisions/sha256/{'a' * 64}/signatures/x", b"")

    problems: list[registry2.Problem] = []
    assert [n async for n in registry2.repositories(storage, problems)] == [name]
    assert [(p.key, p.kind) for p in problems] == [(f"{layout.REPOSITORIES}Team/App/", registry2.INVALID_NAME)]

    tree = await registry2.read_repository(storage, name)
    assert {tag: t.digest for tag, t in tree.tags.items()} == {"v1": SHA}
    assert (tree.revisions, tree.layers) == ({SHA}, set())
    assert sorted((p.key, p.kind) for p in tree.problems) == sorted(
        [
            (layout.layer_link_key(name, OTHER), registry2.MISMATCHED_LINK),
            (layout.layer_link_key(name, missing), registry2.DANGLING_LINK),
            (layout.revision_link_key(name, "sha256:" + "d" * 64), registry2.MALFORMED_LINK),
            (layout.tag_current_key(name, "v2"), registry2.MALFORMED_LINK),
            (layout.tag_current_key(name, "v3"), registry2.UNLINKED_MANIFEST),
            (layout.tag_current_key(name, "-v4"), registry2.INVALID_TAG),
            (layout.tag_current_key(name, "v5"), registry2.TAG_WITHOUT_CURRENT),
            (f"{layout.REPOSITORIES}{name}/_layers/md5/abcd/link", registry2.INVALID_DIGEST),
        ]
    )
    assert tree.skipped == [f"{layout.REPOSITORIES}{name}/_manifests/revisions/sha256/{'a' * 64}/signatures/x"]


async def test_nested_repositories_are_read_apart(place):
    storage = place.driver(place.new_root())
    await storage.write_bytes(layout.blob_key(SHA), b"manifest")
    for name in ("team", "team/app", "team/app/sub"):
        await registry2.write_repository(storage, name, {name.replace("/", "-"): SHA}, [], [SHA])
    await storage.write_bytes(layout.upload_key("uploads/only", "abc"), b"partial")
    assert [name async for name in registry2.repositories(storage)] == ["team", "team/app", "team/app/sub"]
    for name in ("team", "team/app", "team/app/sub"):
        tree = await registry2.read_repository(storage, name)
        assert list(tree.tags) == [name.replace("/", "-")] and tree.layers == {SHA} and tree.problems == []


# -- a big store ----------------------------------------------------------------------------------


async def test_two_thousand_tags_cost_one_listing_and_one_read_per_link(tmp_path, capsys):
    root = tmp_path / "root"
    with DockerRegistry.on_filesystem(tmp_path / "big", root) as registry:
        store = PushedStore()
        started = time.monotonic()
        pushed = fill_many_tags(registry, store, "big/app", 2000)
        push_seconds = time.monotonic() - started
    storage = CountingStorage(FilesystemDriver(str(root)))
    try:
        started = time.monotonic()
        tree = await registry2.read_repository(storage, "big/app", blobs=await registry2.list_blobs(storage))  # type: ignore[arg-type]
        full_seconds = time.monotonic() - started
        assert {tag: t.digest for tag, t in tree.tags.items()} == pushed.tags
        assert tree.revisions == pushed.revisions and tree.layers == pushed.layers and tree.problems == []
        # 2,000 current + 2,000 index + 2,000 revision links + 2 layer links.
        assert storage.calls == {"list_objects": 3, "read_bytes": 6002}
        storage.calls.clear()
        started = time.monotonic()
        quick = await registry2.read_repository(storage, "big/app", check_links=False)  # type: ignore[arg-type]
        quick_seconds = time.monotonic() - started
        assert quick.tags == tree.tags
        assert storage.calls == {"list_objects": 2, "read_bytes": 2000, "stat": 2002}
    finally:
        await storage.inner.close()
    with capsys.disabled():
        print(
            f"\n2,000 tags on the filesystem: docker-registry push {push_seconds:.1f}s, "
            f"read {full_seconds:.2f}s (6,002 reads), without link checks {quick_seconds:.2f}s"
        )
