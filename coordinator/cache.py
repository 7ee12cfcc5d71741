"""The pull-through cache's records: tag checks, fetch claims, counts, and what an upstream's cache holds.

Cached content is ordinary registry content (repositories, tags, manifests, links and blobs written
through `Metadata`), so garbage collection, retention and quotas treat it as they treat pushed
content. What only the cache needs lives here:
- a tag check: when the upstream last confirmed what a cached tag points at (the TTL runs from it);
- a fetch claim, held with the fetching node's lease, so one node at a time fetches a missing blob
  while the others wait for the claim to go and then read what it stored;
- an upstream's counts (hits, misses, bytes fetched, errors, evictions), added to by every node;
- the images an upstream's cache holds, with the bytes each uses, for the budget and `wharf cache`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field, fields

from . import keys
from .kv import KV, Compare, Delete, Get, Put, pages
from .metadata import LinkRecord, ManifestRecord, Metadata, TagRecord, decode

_MAX_ATTEMPTS = 20


@dataclass(frozen=True)
class TagCheck:
    """The upstream said `digest` is what the tag names, at `checked`."""

    digest: str
    checked: float

    def fresh(self, digest: str, ttl: float, now: float | None = None) -> bool:
        return self.digest == digest and (now or time.time()) - self.checked < ttl


class CacheRecords:
    """Tag checks and fetch claims."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv

    async def tag(self, repo: str, tag: str) -> tuple[TagRecord | None, TagCheck | None]:
        """A cached tag and its check, in one round trip at one revision."""
        result = await self.kv.txn([], [Get(keys.tag(repo, tag)), Get(keys.cache_tag(repo, tag))])
        found, check = result.gets
        return (
            decode(TagRecord, found.value) if found is not None else None,
            decode(TagCheck, check.value) if check is not None else None,
        )

    async def confirm(self, repo: str, tag: str, digest: str) -> None:
        """Record that the upstream just confirmed (or gave) `digest` for the tag."""
        await self.kv.put(keys.cache_tag(repo, tag), json.dumps(asdict(TagCheck(digest, time.time()))).encode())

    async def forget(self, repo: str, tags: Iterable[str]) -> None:
        for tag in tags:
            await self.kv.delete(keys.cache_tag(repo, tag))

    # -- fetch claims -------------------------------------------------------------------------

    async def claim_fetch(self, digest: str, holder: str, lease: int) -> bool:
        """Claim the fetch of a blob for `holder` until released (or the lease lapses); False when
        another holds it."""
        key = keys.cache_blob_fetch(digest)
        taken = await self.kv.txn([Compare.absent(key)], [Put(key, holder.encode(), lease=lease)])
        return taken.succeeded

    async def release_fetch(self, digest: str, holder: str) -> None:
        key = keys.cache_blob_fetch(digest)
        await self.kv.txn([Compare(key, "value", "==", holder.encode())], [Delete(key)])

    async def wait_fetched(self, digest: str, *, timeout: float) -> bool:
        """Wait until a blob's fetch claim is gone (the fetch ended, or its node's lease lapsed);
        False on timeout."""
        key = keys.cache_blob_fetch(digest)
        deadline = time.monotonic() + timeout
        delay = 0.02
        while await self.kv.get(key) is not None:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        return True

    async def fetches(self) -> list[tuple[str, str]]:
        """Every blob fetch in flight: (digest, holder)."""
        found = []
        async for page in pages(self.kv, keys.CACHE_FETCHES):
            found += [(kv.key[len(keys.CACHE_FETCHES) :], kv.value.decode()) for kv in page]
        return found


# -- counts ---------------------------------------------------------------------------------------


@dataclass
class CacheCounts:
    """What one upstream's cache did, summed over every node since the cache began."""

    hits: int = 0
    misses: int = 0
    stale: int = 0
    upstream_bytes: int = 0
    upstream_errors: int = 0
    evictions: int = 0
    evicted_bytes: int = 0

    def add(self, other: CacheCounts) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    @property
    def hit_ratio(self) -> float | None:
        asked = self.hits + self.misses
        return self.hits / asked if asked else None


async def add_counts(kv: KV, upstream: str, delta: CacheCounts) -> bool:
    """Add a node's counts since its last report to the upstream's record; False if others kept winning."""
    key = keys.cache_stats(upstream)
    for _ in range(_MAX_ATTEMPTS):
        found = await kv.get(key)
        total = _counts(found.value) if found is not None else CacheCounts()
        total.add(delta)
        guard = Compare.unchanged(key, found.mod_revision if found is not None else 0)
        if (await kv.txn([guard], [Put(key, json.dumps(asdict(total)).encode())])).succeeded:
            return True
    return False


async def read_counts(kv: KV, upstream: str) -> CacheCounts:
    found = await kv.get(keys.cache_stats(upstream))
    return _counts(found.value) if found is not None else CacheCounts()


def _counts(raw: bytes) -> CacheCounts:
    data = json.loads(raw)
    known = {f.name for f in fields(CacheCounts)}
    return CacheCounts(**{k: int(v) for k, v in data.items() if k in known})


# -- what an upstream's cache holds ----------------------------------------------------------------


@dataclass
class CachedImage:
    """A manifest a client pulled through the cache (by tag, or by digest) with everything it reaches."""

    repository: str
    digest: str
    media_type: str
    tags: list[str]
    cached: float  # when it was stored here
    manifests: list[str] = field(default_factory=list)  # itself and the child manifests it reaches
    blobs: set[str] = field(default_factory=set)
    # Bytes of what it uses that is stored here (what it shares with others counted in full too).
    size: int = 0
    # Every manifest and blob it names is stored here: it can be pulled with the upstream down.
    complete: bool = True
    last_pulled: float | None = None

    @property
    def last_used(self) -> float:
        """What least-recently-pulled orders by: the last pull, else when it was cached."""
        return self.last_pulled if self.last_pulled is not None else self.cached


@dataclass
class CacheContents:
    """An upstream's cached images and the bytes they use (each digest once)."""

    prefix: str
    images: list[CachedImage]
    # Bytes of each digest stored under the prefix: blobs by their links, manifests by their records.
    sizes: dict[str, int]

    @property
    def usage(self) -> int:
        used: set[str] = set()
        for image in self.images:
            used.update(image.manifests)
            used.update(image.blobs)
        return sum(self.sizes.get(d, 0) for d in used)

    def over_budget(self, budget: int) -> list[CachedImage]:
        """The least recently pulled images to evict so that what stays fits in `budget` bytes.

        A digest's bytes come back only when no remaining image uses it, so an image that shares
        layers with others frees less; the order is least recently pulled first all the same.
        """
        users: dict[str, int] = {}
        for image in self.images:
            for digest in {*image.manifests, *image.blobs}:
                users[digest] = users.get(digest, 0) + 1
        usage = sum(self.sizes.get(d, 0) for d in users)
        evict: list[CachedImage] = []
        for image in sorted(self.images, key=lambda i: (i.last_used, i.repository, i.digest)):
            if usage <= budget:
                break
            evict.append(image)
            for digest in {*image.manifests, *image.blobs}:
                users[digest] -= 1
                if users[digest] == 0:
                    usage -= self.sizes.get(digest, 0)
        return evict


# (repository, manifest digest) pairs -> when each was last pulled (absent: never, as far as known).
LastPulled = Callable[[list[tuple[str, str]]], Awaitable[dict[tuple[str, str], float]]]


async def _never_pulled(wanted: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    return {}


async def cache_contents(kv: KV, prefix: str, last_pulled: LastPulled = _never_pulled) -> CacheContents:
    """What the repositories under `prefix` hold (every repository for registry:2's mode, prefix "")."""
    records: dict[tuple[str, str], ManifestRecord] = {}
    async for page in pages(kv, keys.manifests_under(prefix)):
        for item in page:
            records[keys.split_repo_key(item.key, keys.MANIFESTS)] = decode(ManifestRecord, item.value)
    tags: dict[tuple[str, str], list[str]] = {}
    async for page in pages(kv, keys.tags_under(prefix)):
        for item in page:
            repo, tag = keys.split_repo_key(item.key, keys.TAGS)
            tags.setdefault((repo, decode(TagRecord, item.value).digest), []).append(tag)
    linked: dict[tuple[str, str], int] = {}
    async for page in pages(kv, keys.links_under(prefix)):
        for item in page:
            linked[keys.split_repo_key(item.key, keys.LINKS)] = decode(LinkRecord, item.value).size
    children = {(repo, child) for (repo, _), record in records.items() for child in record.manifests}
    # An image is what a client pulled by name: every tagged manifest, and every one no index names.
    roots = [key for key in records if key in tags or key not in children]
    sizes: dict[str, int] = {digest: size for (_, digest), size in linked.items()}
    sizes.update({digest: record.size for (_, digest), record in records.items()})
    images: list[CachedImage] = []
    for repo, digest in roots:
        record = records[(repo, digest)]
        image = CachedImage(repo, digest, record.media_type, sorted(tags.get((repo, digest), [])), record.pushed)
        stack = [digest]
        while stack:
            current = stack.pop()
            if current in image.manifests:
                continue
            found = records.get((repo, current))
            if found is None:
                image.complete = False  # an index's child nobody pulled yet
                continue
            image.manifests.append(current)
            image.blobs.update(found.blobs)
            stack.extend(found.manifests)
        image.complete = image.complete and all((repo, blob) in linked for blob in image.blobs)
        image.size = sum(records[(repo, d)].size for d in image.manifests)
        image.size += sum(linked.get((repo, blob), 0) for blob in image.blobs)
        images.append(image)
    pulled = await last_pulled([(image.repository, image.digest) for image in images])
    for image in images:
        image.last_pulled = pulled.get((image.repository, image.digest))
    return CacheContents(prefix, images, sizes)


async def evict(kv: KV, contents: CacheContents, images: list[CachedImage]) -> int:
    """Delete `images` (their manifests and tags) from the cache; returns the bytes their going frees.

    Only manifests go, each in one transaction that also records its release: garbage collection then
    reclaims the blobs no remaining manifest uses, as it does for deleted pushed images, and never one
    that any manifest (cached or hosted) still names.
    """
    metadata = Metadata(kv)
    leaving = {(i.repository, i.digest) for i in images}
    staying: set[tuple[str, str]] = set()
    for image in contents.images:
        if (image.repository, image.digest) not in leaving:
            staying.update((image.repository, d) for d in {*image.manifests, *image.blobs})
    freed: set[str] = set()
    for image in images:
        for digest in image.manifests:
            if digest != image.digest and (image.repository, digest) in staying:
                continue  # a child another remaining image of the repository reaches
            await metadata.delete_manifest(image.repository, digest)
        await CacheRecords(kv).forget(image.repository, image.tags)
        freed.update(d for d in {*image.manifests, *image.blobs} if (image.repository, d) not in staying)
    still_used = {digest for _, digest in staying}
    return sum(contents.sizes.get(d, 0) for d in freed if d not in still_used)


@dataclass(frozen=True)
class EvictionRun:
    """The last time the budget made an upstream's cache evict."""

    at: float
    images: int
    bytes: int
    usage: int  # what the cache used after it


async def record_eviction(kv: KV, upstream: str, run: EvictionRun) -> None:
    await kv.put(keys.cache_eviction(upstream), json.dumps(asdict(run)).encode())


async def last_eviction(kv: KV, upstream: str) -> EvictionRun | None:
    found = await kv.get(keys.cache_eviction(upstream))
    return decode(EvictionRun, found.value) if found is not None else None
