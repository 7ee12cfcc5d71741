"""Read and write CNCF Distribution's (registry:2's) repository tree: tag, manifest and layer links.

Distribution keeps a repository as small "link" objects whose content is one digest (layout.py
has their keys). Tags: `_manifests/tags/<tag>/current/link` names the manifest the tag points to,
and `index/<alg>/<hex>/link` every manifest it has named. Manifests: a revision link makes a
manifest visible in the repository. Blobs: a `_layers` link makes one visible (Distribution 2.8
links configs and layers there, not manifests). Everything works through the StorageDriver
protocol, so filesystem and S3 stores are read and written alike.

Costs, for a repository with T tags, M manifests and L layer links:
- `read_repository`: a listing of its `_manifests/` and `_layers/` (one request per 1,000 objects on
  S3) and one small GET per link file (2T + M + L if no tag ever moved); with `check_links=False`
  only the T tag links are read and the others are trusted by their key. Blobs are checked
  against `blobs` when given (one listing of the whole blob store, `list_blobs`), else with one
  stat per distinct digest.
- `write_repository`: the same listing and reads, then one PUT per link that is missing or differs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import DigestInvalid, NameInvalid
from ..reference import is_tag, parse_digest, validate_name, validate_tag
from . import layout
from .driver import StorageDriver, StoredObject

T = TypeVar("T")

# Link reads and writes in flight at once: tiny objects, so round trips, not bandwidth, set the pace.
CONCURRENCY = 32

# What `Problem.kind` says.
INVALID_NAME = "invalid repository name"
INVALID_TAG = "invalid tag"
INVALID_DIGEST = "invalid digest in key"
MALFORMED_LINK = "malformed link"  # content is not exactly one digest
MISMATCHED_LINK = "mismatched link"  # content names another digest than the key does
DANGLING_LINK = "dangling link"  # names a digest whose blob data is missing
UNLINKED_MANIFEST = "tag names a manifest not linked in the repository"
TAG_WITHOUT_CURRENT = "tag without current link"
MISPLACED_BLOB = "blob data not at its content-addressed key"


@dataclass(frozen=True)
class Problem:
    """Something in the tree that registry:2 would not serve as it stands; reported, never raised."""

    key: str
    kind: str
    detail: str = ""


@dataclass(frozen=True)
class Tag:
    digest: str
    pushed: float  # when its current link was last written (the object's modification time)


@dataclass
class RepositoryTree:
    """One repository as registry:2 would serve it; what it could not serve is in `problems`."""

    name: str
    tags: dict[str, Tag] = field(default_factory=dict)
    revisions: set[str] = field(default_factory=set)  # manifest digests linked in the repository
    layers: set[str] = field(default_factory=set)  # blob digests linked in the repository
    tag_index: dict[str, set[str]] = field(default_factory=dict)  # every digest each tag has named
    problems: list[Problem] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # keys that are no link (older layouts)


@dataclass
class Written:
    """Link objects `write_repository` wrote, by kind, and those already right."""

    layers: int = 0
    revisions: int = 0
    tag_index: int = 0
    tags: int = 0
    unchanged: int = 0

    @property
    def total(self) -> int:
        return self.layers + self.revisions + self.tag_index + self.tags


async def repositories(storage: StorageDriver, problems: list[Problem] | None = None) -> AsyncIterator[str]:
    """Every repository name in the tree, sorted; invalid names go to `problems`, never raised.

    A repository is a directory holding `_manifests` or `_layers` (one holding only `_uploads` has
    nothing to serve). Costs one listing of the whole repositories tree.
    """
    names: set[str] = set()
    invalid: dict[str, str] = {}
    async for key in storage.list(layout.REPOSITORIES):
        parsed = layout.parse_repository_key(key)
        if parsed is None or parsed.area not in ("_manifests", "_layers"):
            continue
        name = parsed.repository
        if name in names or name in invalid:
            continue
        try:
            names.add(validate_name(name))
        except NameInvalid as exc:
            invalid[name] = key
            if problems is not None:
                problems.append(Problem(layout.repository_prefix(name), INVALID_NAME, str(exc.detail)))
    for name in sorted(names):
        yield name


async def list_blobs(storage: StorageDriver, problems: list[Problem] | None = None) -> dict[str, StoredObject]:
    """Every blob's data object (size, modification time) by digest, from one listing of the blob store."""
    found: dict[str, StoredObject] = {}
    async for item in storage.list_objects(layout.BLOBS):
        digest = layout.digest_from_blob_key(item.key)
        valid = digest is not None and _valid_digest(digest) and layout.blob_key(digest) == item.key
        if valid and digest is not None:
            found[digest] = item
        elif problems is not None:
            problems.append(Problem(item.key, MISPLACED_BLOB))
    return found


async def read_repository(
    storage: StorageDriver,
    name: str,
    *,
    blobs: Mapping[str, StoredObject] | None = None,
    check_links: bool = True,
) -> RepositoryTree:
    """Tags, manifest revisions and layer links of repository `name` (a valid name).

    `blobs` (from `list_blobs`) saves a stat per linked digest. With `check_links=False` only tag
    links are read; revision, index and layer links are taken from their keys unread.
    """
    validate_name(name)
    tree = RepositoryTree(name)
    links, pushed = await _read_links(storage, name, tree, everything=check_links)
    current: dict[str, str] = {}
    for key, (parsed, content) in sorted(links.items()):
        digest = _link_target(key, parsed, content, tree.problems)
        if digest is None:
            continue
        if parsed.kind == "layer":
            tree.layers.add(digest)
        elif parsed.kind == "revision":
            tree.revisions.add(digest)
        elif parsed.kind == "tag_index" and parsed.tag is not None:
            tree.tag_index.setdefault(parsed.tag, set()).add(digest)
        elif parsed.kind == "tag" and parsed.tag is not None:
            current[parsed.tag] = digest
    missing = await _missing_blobs(storage, tree.layers | tree.revisions | set(current.values()), blobs)
    for digests, kind in ((tree.layers, "layer"), (tree.revisions, "revision")):
        for digest in sorted(digests & missing):
            key = layout.layer_link_key(name, digest) if kind == "layer" else layout.revision_link_key(name, digest)
            tree.problems.append(Problem(key, DANGLING_LINK, f"no blob data for {digest}"))
        digests -= missing
    for tag, digest in sorted(current.items()):
        key = layout.tag_current_key(name, tag)
        if digest in missing:
            tree.problems.append(Problem(key, DANGLING_LINK, f"no blob data for {digest}"))
        elif digest not in tree.revisions:
            tree.problems.append(Problem(key, UNLINKED_MANIFEST, digest))
        else:
            tree.tags[tag] = Tag(digest, pushed[key])
    for tag in sorted(set(tree.tag_index) - set(current)):
        if not any(p.key == layout.tag_current_key(name, tag) for p in tree.problems):
            tree.problems.append(Problem(layout.tag_current_key(name, tag), TAG_WITHOUT_CURRENT))
    return tree


async def write_repository(
    storage: StorageDriver,
    name: str,
    tags: Mapping[str, str],
    revisions: Iterable[str],
    layers: Iterable[str],
    *,
    check_links: bool = True,
    dry_run: bool = False,
) -> Written:
    """Write the links that make registry:2 serve `tags` (tag -> digest), manifests and blobs in `name`.

    Writes only links that are missing or differ, so a second run writes nothing; deletes nothing
    (tags, revisions and layers already there and not named stay as they are). Each tag's digest
    gets a revision link too. Every blob must already be at its content-addressed key, and the
    repository needs at least one layer link to appear in Distribution 2.8's catalog. Links are
    written layers first and tags last, so registry:2 never sees a tag whose manifest is not yet
    linked. With `check_links=False` existing revision, index and layer links are not read. With
    `dry_run` it counts what it would write and writes nothing.
    Raises on an invalid name, tag or digest, before writing anything.
    """
    validate_name(name)
    wanted_tags = {validate_tag(tag): str(parse_digest(digest)) for tag, digest in tags.items()}
    wanted_revisions = {str(parse_digest(digest)) for digest in revisions} | set(wanted_tags.values())
    wanted_layers = {str(parse_digest(digest)) for digest in layers}
    existing, _ = await _read_links(storage, name, RepositoryTree(name), everything=check_links)
    steps: list[tuple[str, dict[str, str]]] = [
        ("layers", {layout.layer_link_key(name, d): d for d in wanted_layers}),
        ("revisions", {layout.revision_link_key(name, d): d for d in wanted_revisions}),
        ("tag_index", {layout.tag_index_key(name, t, d): d for t, d in wanted_tags.items()}),
        ("tags", {layout.tag_current_key(name, t): d for t, d in wanted_tags.items()}),
    ]
    written = Written()
    for kind, wanted in steps:
        writes = {key: digest for key, digest in wanted.items() if not _holds(existing.get(key), digest)}
        written.unchanged += len(wanted) - len(writes)
        if not dry_run:
            await _bounded(storage.write_bytes(key, digest.encode()) for key, digest in sorted(writes.items()))
        setattr(written, kind, len(writes))
    return written


# -- internals -----------------------------------------------------------------------------------

# A listed link: its parsed key and its content (None when it was not read).
_Link = tuple[layout.RepositoryKey, bytes | None]


async def _read_links(
    storage: StorageDriver, name: str, tree: RepositoryTree, *, everything: bool
) -> tuple[dict[str, _Link], dict[str, float]]:
    """Every link of the repository (content read for tag links, and for all when `everything`).

    Two listings, `_manifests/` and `_layers/`: nested repositories and `_uploads/` (which can hold
    many objects) are not listed. Returns links by key and every listed key's modification time.
    """
    prefix = layout.repository_prefix(name)
    listed = await asyncio.gather(
        *(_collect(storage.list_objects(prefix + area)) for area in ("_manifests/", "_layers/"))
    )
    pushed: dict[str, float] = {}
    parsed_keys: dict[str, layout.RepositoryKey] = {}
    for item in (item for items in listed for item in items):
        parsed = layout.parse_repository_key(item.key)
        if parsed is None or parsed.repository != name:
            continue
        if parsed.kind == "other":
            tree.skipped.append(item.key)
            continue
        parsed_keys[item.key] = parsed
        pushed[item.key] = item.modified
    tree.skipped.sort()
    to_read = sorted(key for key, parsed in parsed_keys.items() if everything or parsed.kind == "tag")
    contents = await _bounded(_read_or_none(storage, key) for key in to_read)
    read = dict(zip(to_read, contents, strict=True))
    links: dict[str, _Link] = {}
    for key, parsed in parsed_keys.items():
        if key in read and read[key] is None:
            continue  # removed since the listing
        links[key] = (parsed, read.get(key))
    return links, pushed


def _link_target(key: str, parsed: layout.RepositoryKey, content: bytes | None, problems: list[Problem]) -> str | None:
    """The digest a link names, or None (and a problem) when registry:2 could not follow it."""
    if parsed.tag is not None and not is_tag(parsed.tag):
        problems.append(Problem(key, INVALID_TAG, parsed.tag[:300]))
        return None
    if parsed.digest is not None and not _valid_digest(parsed.digest):
        problems.append(Problem(key, INVALID_DIGEST, parsed.digest[:300]))
        return None
    if content is None:
        return parsed.digest  # not read: trusted by its key
    # Distribution parses the whole content as a digest: no whitespace, nothing else.
    text = content.decode("ascii", errors="replace")
    if not _valid_digest(text):
        problems.append(Problem(key, MALFORMED_LINK, repr(content[:100])))
        return None
    if parsed.digest is not None and text != parsed.digest:
        problems.append(Problem(key, MISMATCHED_LINK, f"names {text}"))
        return None
    return text


def _holds(link: _Link | None, digest: str) -> bool:
    """Whether an existing link already says `digest` (an unread one is trusted by its key)."""
    if link is None:
        return False
    parsed, content = link
    return content == digest.encode() if content is not None else parsed.digest == digest


def _valid_digest(text: str) -> bool:
    try:
        return str(parse_digest(text)) == text
    except DigestInvalid:
        return False


async def _missing_blobs(
    storage: StorageDriver, digests: set[str], blobs: Mapping[str, StoredObject] | None
) -> set[str]:
    if blobs is not None:
        return {digest for digest in digests if digest not in blobs}
    ordered = sorted(digests)
    sizes = await _bounded(storage.stat(layout.blob_key(digest)) for digest in ordered)
    return {digest for digest, size in zip(ordered, sizes, strict=True) if size is None}


async def _read_or_none(storage: StorageDriver, key: str) -> bytes | None:
    try:
        return await storage.read_bytes(key)
    except FileNotFoundError:
        return None


async def _collect(items: AsyncIterator[StoredObject]) -> list[StoredObject]:
    return [item async for item in items]


async def _bounded(calls: Iterable[Awaitable[T]]) -> list[T]:
    """Await every call, CONCURRENCY at a time, results in order."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(call: Awaitable[T]) -> T:
        async with gate:
            return await call

    return list(await asyncio.gather(*(one(call) for call in calls)))
