"""Tag details: each tag of a repository with its digest, media type, artifact type, size, push and
last-pull time, in name, push or pull order, a page at a time.

A node keeps each repository's tags in memory, sorted every way, while the repository's tag version
and last-pulled version stand (one point read per request tells), so a page costs what it returns,
not what the repository holds. What a manifest is (media type, artifact type, its size with every
blob it names, its platforms) never changes for a digest and is kept by digest.
"""

from __future__ import annotations

import bisect
import datetime
import fnmatch
import json
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from coordinator.metadata import ManifestRecord, Metadata, TagRecord
from coordinator.pulls import Pulls

from . import manifest as manifests
from .storage import layout
from .storage.driver import StorageDriver

SORTS = ("name", "pushed", "pulled")
# Never pulled sorts after every pulled tag (newest first).
_NEVER = float("inf")


@dataclass(frozen=True)
class Described:
    """What a manifest is and how many bytes it brings: itself, and every manifest and blob it names, once."""

    media_type: str
    artifact_type: str | None
    size: int
    platforms: tuple[dict[str, Any], ...] | None = None  # an index's children


@dataclass
class _Listing:
    """One repository's tags as of one tag version, sorted by name, by push and (lazily) by pull."""

    version: int
    records: dict[str, TagRecord]
    names: list[str]
    by_pushed: list[tuple[float, str]]
    pulled_version: int = -1
    pulled: dict[str, float] = field(default_factory=dict)
    by_pulled: list[tuple[float, str]] | None = None
    filtered: OrderedDict[tuple[str, str], list[Any]] = field(default_factory=OrderedDict)

    @classmethod
    def of(cls, version: int, records: dict[str, TagRecord]) -> _Listing:
        names = sorted(records)
        by_pushed = sorted((-records[name].pushed, name) for name in names)
        return cls(version, records, names, by_pushed)

    def set_pulled(self, version: int, pulled: dict[str, float]) -> None:
        self.pulled_version, self.pulled, self.by_pulled = version, pulled, None
        self.filtered = OrderedDict((k, v) for k, v in self.filtered.items() if k[0] != "pulled")

    def order(self, sort: str) -> list[Any]:
        """Sort keys in order: names, or (key, name) pairs."""
        if sort == "name":
            return self.names
        if sort == "pushed":
            return self.by_pushed
        if self.by_pulled is None:
            self.by_pulled = sorted((self._pulled_key(name), name) for name in self.names)
        return self.by_pulled

    def key(self, sort: str, name: str) -> Any:
        if sort == "name":
            return name
        if sort == "pushed":
            return (-self.records[name].pushed, name)
        return (self._pulled_key(name), name)

    def _pulled_key(self, name: str) -> float:
        at = self.pulled.get(self.records[name].digest)
        return -at if at is not None else _NEVER

    def matching(self, sort: str, pattern: str) -> list[Any]:
        """The sort keys of tags matching `pattern`, in order (kept for a few patterns)."""
        cached = self.filtered.get((sort, pattern))
        if cached is not None:
            self.filtered.move_to_end((sort, pattern))
            return cached
        match = _glob(pattern).fullmatch
        found = [k for k in self.order(sort) if match(k if sort == "name" else k[1])]
        self.filtered[(sort, pattern)] = found
        while len(self.filtered) > 8:
            self.filtered.popitem(last=False)
        return found


@lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def cursor(sort: str, key: Any) -> str:
    """The `last` of a next page: a tag name, or for push and pull order the tag's sort key and name."""
    if sort == "name":
        return str(key)
    value, name = key
    return f"{value!r},{name}"


@dataclass
class Page:
    rows: list[dict[str, Any]]
    next: str | None  # `last` for the next page, None at the end


class TagDetails:
    """Pages of tag details for one node, from the coordinator's records and the storage's manifests."""

    def __init__(
        self, metadata: Metadata, storage: StorageDriver, *, max_names: int = 500_000, max_described: int = 100_000
    ) -> None:
        self.metadata = metadata
        self.pulls = Pulls(metadata.kv)
        self.storage = storage
        self._listings: OrderedDict[str, _Listing] = OrderedDict()
        self._names = 0
        self._max_names = max_names
        self._described: OrderedDict[str, Described] = OrderedDict()
        self._max_described = max_described

    async def page(
        self, repo: str, *, sort: str = "name", n: int = 100, last: str | None = None, pattern: str | None = None
    ) -> Page:
        """Up to `n` tags after `last` (a tag name, or a cursor from an earlier page), in `sort` order."""
        listing = await self._listing(repo)
        keys = listing.matching(sort, pattern) if pattern else listing.order(sort)
        start = 0
        if last:
            after = _parse_cursor(sort, last, listing)
            start = bisect.bisect_right(keys, after) if after is not None else 0
        chosen = keys[start : start + n]
        names = [k if sort == "name" else k[1] for k in chosen]
        records = [listing.records[name] for name in names]
        described = await self.describe(repo, [record.digest for record in records])
        rows = [
            _row(name, record, described.get(record.digest), listing.pulled.get(record.digest))
            for name, record in zip(names, records, strict=True)
        ]
        more = start + n < len(keys)
        return Page(rows, cursor(sort, chosen[-1]) if more and chosen else None)

    async def summary(self, repo: str) -> tuple[int, float | None]:
        """How many tags `repo` has and when the newest was pushed (None: no tags)."""
        return (await self.summaries([repo]))[repo]

    async def summaries(self, repos: Sequence[str]) -> dict[str, tuple[int, float | None]]:
        """`summary` of several repositories, their versions checked in a few reads."""
        versions = await self.pulls.versions_of(repos)
        found = {}
        for repo in repos:
            listing = await self._listing(repo, versions[repo])
            newest = -listing.by_pushed[0][0] if listing.by_pushed else None
            found[repo] = (len(listing.names), newest)
        return found

    async def tags(self, repo: str) -> Mapping[str, TagRecord]:
        """`repo`'s tags now, by name (the listing a page reads anyway; not to be changed)."""
        return (await self._listing(repo)).records

    async def _listing(self, repo: str, versions: tuple[int, int] | None = None) -> _Listing:
        """The repository's tags and last-pulled times, read again only when either version moved
        (`versions`: the repository's (tag, last-pulled) versions, when the caller has just read them)."""
        tag_version, pulled_version = versions if versions is not None else await self.pulls.versions(repo)
        listing = self._listings.get(repo)
        if listing is None or not tag_version or listing.version != tag_version:
            records = await self.metadata.tag_records(repo)
            if listing is not None:
                self._forget(repo)
            fresh = _Listing.of(tag_version, records)
            if listing is not None and listing.pulled_version == pulled_version and pulled_version:
                fresh.set_pulled(pulled_version, listing.pulled)
            listing = fresh
            if tag_version and len(records) <= self._max_names:
                self._keep(repo, listing)
        else:
            self._listings.move_to_end(repo)
        if listing.pulled_version != pulled_version:
            listing.set_pulled(pulled_version, await self.pulls.of_repository(repo) if pulled_version else {})
        return listing

    def _keep(self, repo: str, listing: _Listing) -> None:
        self._listings[repo] = listing
        self._names += len(listing.names)
        while self._names > self._max_names and len(self._listings) > 1:
            dropped, _ = next(iter(self._listings.items()))
            self._forget(dropped)

    def _forget(self, repo: str) -> None:
        dropped = self._listings.pop(repo, None)
        if dropped is not None:
            self._names -= len(dropped.names)

    # -- what a manifest is -----------------------------------------------------------------

    async def describe(self, repo: str, digests: Sequence[str]) -> dict[str, Described]:
        """What each of `digests` (manifests of `repo`) is; one whose records are gone is left out."""
        found = {d: self._described[d] for d in digests if d in self._described}
        wanted = [d for d in dict.fromkeys(digests) if d not in found]
        if not wanted:
            return found
        # Every manifest reachable through index children, a level at a time, and every blob they name.
        records: dict[str, ManifestRecord] = {}
        level = wanted
        while level:
            read = await self.metadata.manifests_marked(repo, level)
            records.update((d, record) for d, (record, _) in read.items())
            level = list(dict.fromkeys(c for d in read for c in read[d][0].manifests if c not in records))
        blobs = list(dict.fromkeys(b for record in records.values() for b in record.blobs))
        sizes = await self.metadata.blob_sizes(blobs)
        for digest in wanted:
            if digest not in records:
                continue
            described = await self._described_one(digest, records, sizes)
            if described is not None:
                found[digest] = described
                self._described[digest] = described
                if len(self._described) > self._max_described:
                    self._described.popitem(last=False)
        return found

    async def _described_one(
        self, digest: str, records: dict[str, ManifestRecord], sizes: dict[str, int]
    ) -> Described | None:
        record = records[digest]
        total = _total(digest, records, sizes)
        if total is None:
            return None  # a child or blob went meanwhile: say nothing rather than something wrong
        platforms = None
        if record.media_type in manifests.INDEX_TYPES:
            platforms = []
            for descriptor in await self._children(digest):
                child = descriptor.get("digest")
                size = _total(child, records, sizes) if isinstance(child, str) else None
                entry: dict[str, Any] = {"digest": child, "mediaType": descriptor.get("mediaType"), "size": size}
                if isinstance(descriptor.get("platform"), dict):
                    entry["platform"] = descriptor["platform"]
                if child in records and records[child].artifact_type:
                    entry["artifactType"] = records[child].artifact_type
                platforms.append(entry)
        return Described(
            record.media_type, record.artifact_type, total, tuple(platforms) if platforms is not None else None
        )

    async def _children(self, digest: str) -> list[dict[str, Any]]:
        """An index's child descriptors, as its bytes in storage list them (with their platforms)."""
        try:
            body = await self.storage.read_bytes(layout.blob_key(digest))
        except FileNotFoundError:
            return []
        if manifests.compute_digest(body, digest.split(":", 1)[0]) != digest:
            return []
        try:
            children = json.loads(body).get("manifests")
        except (ValueError, AttributeError):
            return []
        return [c for c in children if isinstance(c, dict)] if isinstance(children, list) else []


def _total(digest: str, records: dict[str, ManifestRecord], sizes: dict[str, int]) -> int | None:
    """Bytes of a manifest with everything it reaches (children, their blobs), each counted once."""
    seen: set[str] = set()
    blobs: set[str] = set()
    stack = [digest]
    total = 0
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        record = records.get(current)
        if record is None:
            return None
        seen.add(current)
        total += record.size
        blobs.update(record.blobs)
        stack.extend(record.manifests)
    if not blobs <= sizes.keys():
        return None
    return total + sum(sizes[b] for b in blobs)


def _parse_cursor(sort: str, last: str, listing: _Listing) -> Any:
    """The sort key after which a page starts: a cursor, or a tag name (its current place)."""
    if sort == "name":
        return last
    value, comma, name = last.rpartition(",")
    if comma:
        try:
            return (float(value), name)
        except ValueError:
            pass
    if last in listing.records:
        return listing.key(sort, last)
    return None


def timestamp(at: float | None) -> str | None:
    if at is None:
        return None
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _row(name: str, record: TagRecord, described: Described | None, pulled: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "tag": name,
        "digest": record.digest,
        "mediaType": record.media_type,
        "artifactType": described.artifact_type if described else None,
        "size": described.size if described else None,
        "pushed": timestamp(record.pushed),
        "pulled": timestamp(pulled),
    }
    if described is not None and described.platforms is not None:
        row["platforms"] = list(described.platforms)
    return row
