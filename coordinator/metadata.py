"""Registry metadata in the KV: repositories, tags, manifests, blob links, blobs and referrers."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypeVar

from . import encoding, keys
from .kv import KV, Compare, Delete, Get, KeyValue, Op, Put, pages, scan
from .quota import QuotaScope, admit
from .quota import release as release_quota
from .uploads import SessionChanged, UploadSession

T = TypeVar("T")

# Optimistic transactions retry this often when another writer keeps winning.
_MAX_ATTEMPTS = 20
# Room left in one transaction (etcd allows 128 compares and 128 operations) for references.
_TXN_BUDGET = 120
_BATCH = 100
# A manifest deleted with more tags than this untags the rest first, this many per transaction
# (each takes two deletes: kv.MAX_TXN_OPS bounds a transaction).
_TAGS_PER_TXN = 40


# Marks a referrer descriptor whose annotations must be read from the manifest itself.
ANNOTATIONS_IN_MANIFEST = "wharf.annotationsInManifest"


# The storage key of the bytes a digest names when they sit at its content address (node's layout
# gives it): blob records store a key only when it is another.
ContentAddress = Callable[[str], str]


def _json(record: Any) -> bytes:
    return json.dumps(asdict(record), separators=(",", ":")).encode()


@dataclass(frozen=True)
class TagRecord:
    digest: str
    media_type: str
    size: int
    pushed: float


@dataclass(frozen=True)
class LinkRecord:
    """A blob is visible in a repository only while it is linked there."""

    size: int
    linked: float
    # A scrub found the stored bytes do not hash to the digest: not served until pushed again here.
    corrupt: bool = False


@dataclass(frozen=True)
class TouchRecord:
    """When a client was last told a blob exists (a HEAD, a GET, a mount)."""

    at: float


@dataclass(frozen=True)
class BlobRecord:
    size: int
    key: str
    created: float
    # Adopted from a registry:2 store rather than pushed through Wharf: "used" when an imported
    # manifest referenced it, "unused" when only a layer link named it (GC keeps those unless asked).
    imported: str | None = None
    # A scrub found these bytes do not hash to the digest; the next upload of it replaces them.
    corrupt: bool = False


@dataclass(frozen=True)
class Release:
    """What a deleted or untagged manifest stopped keeping, for garbage collection's grace rule."""

    at: float
    blobs: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)


def release(repo: str, digest: str, *, blobs: Iterable[str] = (), manifests: Iterable[str] = ()) -> Put:
    """The op that records a release; written in the same transaction as the delete."""
    return Put(keys.released(repo, digest), _json(Release(time.time(), list(blobs), list(manifests))))


def TAGS_CHANGED(repo: str) -> Put:  # noqa: N802 - reads as the event it records
    """The op every transaction that changes `repo`'s tags carries (see keys.TAG_VERSIONS)."""
    return Put(keys.tag_version(repo), b"")


CATALOG_CHANGED = Put(keys.CATALOG_VERSION, b"")


def encode(record: Any) -> bytes:
    """A record's stored form: compact for tags, links, manifests and touches, JSON for the few others.

    Blob records go through `encode_blob`, which knows their digest.
    """
    if isinstance(record, TagRecord):
        return encoding.pack_tag(record.digest, record.media_type, record.size, record.pushed)
    if isinstance(record, LinkRecord):
        return encoding.pack_link(record.size, record.linked, record.corrupt)
    if isinstance(record, ManifestRecord):
        return encoding.pack_manifest(
            record.digest,
            record.media_type,
            record.size,
            list(record.blobs),
            list(record.manifests),
            record.subject,
            record.artifact_type,
            record.annotations,
            record.pushed,
            record.annotations_in_manifest,
        )
    if isinstance(record, TouchRecord):
        return encoding.pack_touch(record.at)
    if isinstance(record, BlobRecord):
        raise TypeError("a blob record is encoded with its digest: encode_blob(digest, record, address)")
    return _json(record)


_UNPACK = {
    "TagRecord": encoding.unpack_tag,
    "LinkRecord": encoding.unpack_link,
    "ManifestRecord": encoding.unpack_manifest,
    "TouchRecord": encoding.unpack_touch,
    "BlobRecord": encoding.unpack_blob,
}


def HOLDING_CHANGED(repo: str, digest: str) -> Put:  # noqa: N802 - reads as the event it records
    """The op every transaction that adds or removes a link or manifest `digest` in `repo` carries:
    a blind put the storage figures' settler counts (coordinator/usage.py)."""
    return Put(keys.usage_mark(digest, repo), b"")


def EVERY_HOLDER_CHANGED(digest: str) -> Put:  # noqa: N802
    """As HOLDING_CHANGED, for every repository that holds `digest` (a blob deleted with all its links)."""
    return Put(keys.usage_mark(digest, keys.EVERY_HOLDER), b"")


def _fence_guards(repo: str) -> list[Compare]:
    """A write into `repo` happens only while no deletion of it (or of a namespace around it) runs."""
    return [Compare.absent(key) for key in keys.fences_of(repo)]


def decode(cls: type[T], raw: bytes) -> T:
    """A record from its stored form: compact, or the JSON every earlier Wharf version wrote.

    A blob record at its content address stores no key: read it with `decode_blob`.
    """
    unpack = _UNPACK.get(cls.__name__)
    fields = unpack(raw) if unpack is not None else encoding.legacy(raw)
    if cls is BlobRecord and fields.get("key") is None:
        raise encoding.RecordError("this blob record stores no key (its bytes are at the content address): decode_blob")
    return _construct(cls, fields)


_FIELD_NAMES: dict[type, frozenset[str]] = {}


def _construct(cls: type[T], fields: dict[str, Any]) -> T:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    if names.issuperset(fields):
        return cls(**fields)
    # Fields a later version added are left out, so a record it wrote still reads here.
    return cls(**{name: value for name, value in fields.items() if name in names})


def encode_blob(digest: str, record: BlobRecord, address: ContentAddress | None) -> bytes:
    """A blob record's stored form; its key is left out when it is `address(digest)`."""
    at_address = address is not None and record.key == address(digest)
    key = None if at_address else record.key
    return encoding.pack_blob(record.size, record.created, key, record.imported, record.corrupt)


def decode_blob(digest: str, raw: bytes, address: ContentAddress | None) -> BlobRecord:
    """A blob record (any form), its key derived from the digest when it was left out."""
    fields = encoding.unpack_blob(raw)
    if fields.get("key") is None:
        if address is None:
            raise encoding.RecordError(f"the blob record of {digest} stores no key and no content address is known")
        fields["key"] = address(digest)
    return _construct(BlobRecord, fields)


@dataclass(frozen=True)
class ManifestRecord:
    digest: str
    media_type: str
    size: int
    blobs: list[str] = field(default_factory=list)
    manifests: list[str] = field(default_factory=list)
    subject: str | None = None
    artifact_type: str | None = None
    annotations: dict[str, str] | None = None
    pushed: float = 0.0
    # Annotations too large for a KV record (etcd takes 1.5 MiB a request) stay in the manifest.
    annotations_in_manifest: bool = False

    def descriptor(self) -> dict[str, Any]:
        """The descriptor the referrers API lists for this manifest."""
        desc: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.artifact_type:
            desc["artifactType"] = self.artifact_type
        if self.annotations:
            desc["annotations"] = self.annotations
        if self.annotations_in_manifest:
            desc[ANNOTATIONS_IN_MANIFEST] = True
        return desc


@dataclass(frozen=True)
class Mark:
    """A record as a read found it (mod_revision 0: absent), to check later that it has not changed.

    A check rides along with a read the caller makes anyway, in the same round trip.
    """

    key: str
    mod_revision: int

    @classmethod
    def of(cls, key: str, found: KeyValue | None) -> Mark:
        return cls(key, found.mod_revision if found is not None else 0)

    def holds(self, found: KeyValue | None) -> bool:
        return (found.mod_revision if found is not None else 0) == self.mod_revision


def _load(cls: type, kv: KeyValue | None) -> Any:
    return None if kv is None else decode(cls, kv.value)


def _tagged_digest(kv: KeyValue) -> str:
    return decode(TagRecord, kv.value).digest


class MissingReferences(Exception):
    """A manifest names blobs or manifests that are not in its repository."""

    def __init__(self, blobs: Sequence[str], manifests: Sequence[str]) -> None:
        super().__init__(f"unknown blobs {list(blobs)}, manifests {list(manifests)}")
        self.blobs = list(blobs)
        self.manifests = list(manifests)


class Conflict(Exception):
    """A record kept changing under an optimistic transaction."""


class TagFrozen(Exception):
    """An immutable tag already points at other content."""

    def __init__(self, tag: str, digest: str) -> None:
        super().__init__(f"tag {tag} is immutable and points at {digest}")
        self.tag = tag
        self.digest = digest


class RepositoryDeleting(Exception):
    """The repository (or a namespace around it) is being deleted: nothing is written into it meanwhile."""

    def __init__(self, repo: str) -> None:
        super().__init__(f"repository {repo} is being deleted")
        self.repo = repo


class BeingCollected(Exception):
    """Garbage collection is deleting this digest's storage object right now.

    A writer whose bytes may have just been deleted with it must wait until the deletion is
    over (`Metadata.wait_collected`) and then store them again.
    """

    def __init__(self, digest: str) -> None:
        super().__init__(f"{digest} is being garbage collected")
        self.digest = digest


class Metadata:
    """The registry's source of truth, written only through single KV transactions."""

    def __init__(self, kv: KV, *, address: ContentAddress | None = None) -> None:
        """`address` gives a digest's content address in storage: blob records at it store no key.

        Without one every blob record stores its key, and one that stores none cannot be read.
        """
        self.kv = kv
        self.address = address
        self._tag_index_ready = False
        # Repositories this process has seen exist: writing to them cannot change the catalog (each
        # such write guards that the repository still exists, as a whole-repository delete may remove it).
        self._known_repositories: set[str] = set()

    # -- repositories -----------------------------------------------------------------------

    async def list_repositories(self, *, last: str | None = None, limit: int = 0) -> list[str]:
        start = keys.after(keys.repository(last)) if last else None
        found = await self.kv.range(keys.REPOSITORIES, start=start, limit=limit)
        return [kv.key[len(keys.REPOSITORIES) :] for kv in found]

    async def repository_exists(self, name: str) -> bool:
        return await self.kv.get(keys.repository(name)) is not None

    # -- tags -------------------------------------------------------------------------------

    async def get_tag(self, repo: str, tag: str) -> TagRecord | None:
        return _load(TagRecord, await self.kv.get(keys.tag(repo, tag)))

    async def get_tag_checked(self, repo: str, tag: str, marks: Sequence[Mark]) -> tuple[TagRecord | None, bool]:
        """A tag, and whether every one of `marks` still holds: one round trip, at one revision."""
        if not marks:
            return await self.get_tag(repo, tag), True
        found, holds = await self._read_checked(keys.tag(repo, tag), marks)
        return _load(TagRecord, found), holds

    async def _read_checked(self, key: str, marks: Sequence[Mark]) -> tuple[KeyValue | None, bool]:
        result = await self.kv.txn([], [Get(key), *[Get(mark.key) for mark in marks]])
        gets = result.gets
        for mark, now in zip(marks, gets[1:], strict=True):
            if not mark.holds(now):
                return gets[0], False
        return gets[0], True

    async def tags_with_prefix(self, repo: str, prefix: str) -> list[str]:
        """The repository's tags that start with `prefix`, in order."""
        start = keys.tag(repo, prefix)
        return [tag async for tag in self._names_under(start, len(keys.tags_of(repo)))]

    async def _names_under(self, prefix: str, cut: int) -> AsyncIterator[str]:
        async for page in pages(self.kv, prefix):
            for kv in page:
                yield kv.key[cut:]

    async def repository_mark(self, repo: str) -> Mark:
        """The repository record, rewritten by every manifest put and blob link in it: a mark of "nothing new"."""
        key = keys.repository(repo)
        return Mark.of(key, await self.kv.get(key))

    async def list_tags(self, repo: str, *, last: str | None = None, limit: int = 0) -> list[str]:
        prefix = keys.tags_of(repo)
        start = keys.after(keys.tag(repo, last)) if last else None
        return [kv.key[len(prefix) :] for kv in await self.kv.range(prefix, start=start, limit=limit)]

    async def tag_list(self, repo: str, known: int | None = None) -> tuple[int, list[str] | None]:
        """(version, every tag of `repo` in order), the list None when it is still `known`'s.

        The version is the revision of the repository's tag version record, rewritten by every
        transaction that changes its tags: a list read at version V is current while it stays V.
        Version 0: no record yet (a store from before them), so nothing may be kept.
        """
        found = await self.kv.get(keys.tag_version(repo))
        version = found.mod_revision if found is not None else 0
        if version and version == known:
            return version, None
        prefix = keys.tags_of(repo)
        return version, [kv.key[len(prefix) :] for kv in await self._range_all(prefix)]

    async def repository_list(self, known: int | None = None) -> tuple[int, list[str] | None]:
        """(version, every repository in order), the list None when it is still `known`'s (as tag_list)."""
        found = await self.kv.get(keys.CATALOG_VERSION)
        version = found.mod_revision if found is not None else 0
        if version and version == known:
            return version, None
        return version, [kv.key[len(keys.REPOSITORIES) :] for kv in await self._range_all(keys.REPOSITORIES)]

    async def tag_count(self, repo: str) -> int:
        return await self.kv.count(keys.tags_of(repo))

    async def tag_records(self, repo: str) -> dict[str, TagRecord]:
        prefix = keys.tags_of(repo)
        return {kv.key[len(prefix) :]: _load(TagRecord, kv) for kv in await self.kv.range(prefix)}

    async def repository_contents(self, repo: str) -> tuple[dict[str, str], list[str], list[str]]:
        """(tag -> digest, manifest digests, linked blob digests) of one repository."""
        tags = {tag: record.digest for tag, record in (await self.tag_records(repo)).items()}
        found: list[list[str]] = []
        for prefix in (keys.manifests_of(repo), keys.links_of(repo)):
            found.append([kv.key[len(prefix) :] async for page in pages(self.kv, prefix) for kv in page])
        return tags, found[0], found[1]

    async def mark_corrupt(self, digest: str, link_keys: Iterable[str]) -> None:
        """Record that `digest`'s stored bytes do not hash to it: its links stop serving it."""
        targets = [keys.blob(digest), *link_keys]
        for key in targets:
            for _ in range(_MAX_ATTEMPTS):
                found = await self.kv.get(key)
                if found is None:
                    break
                if key == keys.blob(digest):
                    blob = self.blob_of(digest, found.value)
                    if blob.corrupt:
                        break
                    marked = self.blob_value(digest, replace(blob, corrupt=True))
                else:
                    link = decode(LinkRecord, found.value)
                    if link.corrupt:
                        break
                    marked = encode(replace(link, corrupt=True))
                if (await self.kv.txn([Compare.unchanged(key, found.mod_revision)], [Put(key, marked)])).succeeded:
                    break

    def blob_value(self, digest: str, record: BlobRecord) -> bytes:
        """The stored form of `digest`'s blob record."""
        return encode_blob(digest, record, self.address)

    def blob_of(self, digest: str, raw: bytes) -> BlobRecord:
        """`digest`'s blob record from its stored form."""
        return decode_blob(digest, raw, self.address)

    async def blob_records(self) -> AsyncIterator[tuple[str, BlobRecord]]:
        """Every blob record, a page at a time."""
        async for page in pages(self.kv, keys.BLOBS):
            for kv in page:
                digest = kv.key[len(keys.BLOBS) :]
                yield digest, self.blob_of(digest, kv.value)

    async def links_by_digest(self, digests: set[str]) -> dict[str, list[str]]:
        """The link keys (every repository) of each of `digests`, from one scan of the links."""
        found: dict[str, list[str]] = {}
        async for page in pages(self.kv, keys.LINKS):
            for kv in page:
                _, digest = keys.split_repo_key(kv.key, keys.LINKS)
                if digest in digests:
                    found.setdefault(digest, []).append(kv.key)
        return found

    async def move_blob(self, digest: str, old_key: str, new_key: str) -> bool:
        """Point a blob record at another copy of its bytes, if it still names `old_key`."""
        found = await self.kv.get(keys.blob(digest))
        if found is None:
            return False
        record = self.blob_of(digest, found.value)
        if record.key != old_key:
            return False
        moved = BlobRecord(record.size, new_key, record.created, record.imported)
        return (
            await self.kv.txn(
                [Compare.unchanged(found.key, found.mod_revision)], [Put(found.key, self.blob_value(digest, moved))]
            )
        ).succeeded

    async def delete_tag(self, repo: str, tag: str, *, events: Sequence[Op] = ()) -> TagRecord | None:
        """Remove a tag; the record it had when it went (None if there was none).

        Garbage collection may then take its manifest at once (if untagged ones go). `events`
        (notification records) are written in the same transaction, and only if it happens.
        """
        for _ in range(_MAX_ATTEMPTS):
            found = await self.kv.get(keys.tag(repo, tag))
            if found is None:
                return None
            digest = _tagged_digest(found)
            ops: list[Op] = [
                Delete(found.key),
                Delete(keys.tagged(repo, digest, tag)),
                release(repo, digest, manifests=[digest]),
                TAGS_CHANGED(repo),
                *events,
            ]
            if (await self.kv.txn([Compare.unchanged(found.key, found.mod_revision)], ops)).succeeded:
                return _load(TagRecord, found)
        raise Conflict(f"delete of tag {tag} kept racing")

    async def follow_tag(self, repo: str, tag: str, record: TagRecord, *, unless_newer_than: float) -> bool:
        """Point `tag` at `record` as registry:2 moved it (an import after a rollback), unless the
        tag moved since `unless_newer_than` here too, or `record`'s manifest is not recorded (or is
        being collected). True when the tag now points there."""
        key = keys.tag(repo, tag)
        for _ in range(_MAX_ATTEMPTS):
            current = await self.kv.get(key)
            if current is None:
                return False
            old = _tagged_digest(current)
            if old == record.digest:
                return True
            if _load(TagRecord, current).pushed > unless_newer_than:
                return False  # moved through Wharf after the export: Wharf's move is the newer one
            guards = [
                Compare.unchanged(key, current.mod_revision),
                Compare.present(keys.manifest(repo, record.digest)),
                Compare.absent(keys.deleting(record.digest)),
            ]
            ops: list[Op] = [
                Put(key, encode(record)),
                Put(keys.tagged(repo, record.digest, tag), b""),
                Delete(keys.tagged(repo, old, tag)),
                release(repo, old, manifests=[old]),
                TAGS_CHANGED(repo),
            ]
            if (await self.kv.txn(guards, ops)).succeeded:
                return True
            if await self.kv.get(keys.manifest(repo, record.digest)) is None:
                return False
        raise Conflict(f"tag {tag} kept moving")

    # -- blobs ------------------------------------------------------------------------------

    async def get_link(self, repo: str, digest: str) -> LinkRecord | None:
        return _load(LinkRecord, await self.kv.get(keys.link(repo, digest)))

    async def get_blob(self, digest: str) -> BlobRecord | None:
        found = await self.kv.get(keys.blob(digest))
        return None if found is None else self.blob_of(digest, found.value)

    async def blob_sizes(self, digests: Sequence[str]) -> dict[str, int]:
        """The size of each of `digests` that has a blob record, a batch of reads per request."""
        found: dict[str, int] = {}
        for start in range(0, len(digests), _BATCH):
            batch = digests[start : start + _BATCH]
            result = await self.kv.txn([], [Get(keys.blob(d)) for d in batch])
            found.update((d, self.blob_of(d, kv.value).size) for d, kv in zip(batch, result.gets, strict=True) if kv)
        return found

    async def commit_blob(
        self,
        repo: str,
        digest: str,
        size: int,
        key: str,
        *,
        upload: UploadSession | None = None,
        quotas: Sequence[QuotaScope] = (),
        events: Sequence[Op] = (),
    ) -> BlobRecord:
        """Record a blob now in storage and link it into `repo`, ending its upload session.

        `upload` is the session whose commit this is: it must be unchanged since it was read (not
        cancelled or purged meanwhile, SessionChanged otherwise), and it goes in the same
        transaction. Returns the blob record in force: if the digest was already recorded, the
        earlier record stands and the caller's copy at `key` is redundant. A new link must fit every
        quota in `quotas` (QuotaExceeded otherwise, and nothing changes). `events` (notification
        records) are written with the link.
        """
        now = time.time()
        link_key = keys.link(repo, digest)
        # Using a blob that garbage collection marked wins over the collection.
        common: list[Op] = [
            Put(link_key, encode(LinkRecord(size, now))),
            Put(keys.repository(repo), b"{}"),
            Delete(keys.pending_blob(digest)),
            HOLDING_CHANGED(repo, digest),
            *events,
        ]
        session_guard: list[Compare] = _fence_guards(repo)
        if upload is not None:
            common += upload.ending()
            session_guard.append(Compare.unchanged(keys.upload(upload.id), upload.mod_revision))
        record = BlobRecord(size, key, now)
        blob_key = keys.blob(digest)
        not_deleting = Compare.absent(keys.deleting(digest))
        for _ in range(_MAX_ATTEMPTS):
            catalog_guards, catalog_ops = await self._catalog_ops(repo)
            admission, guard_writes = await self._admit(link_key, quotas, size)
            result = await self.kv.txn(
                [Compare.absent(blob_key), not_deleting, *session_guard, *catalog_guards, *admission],
                [Put(blob_key, self.blob_value(digest, record)), *common, *catalog_ops, *guard_writes],
                [Get(blob_key), Get(keys.deleting(digest)), *(Get(g.key) for g in session_guard)],
            )
            if result.succeeded:
                self._known_repositories.add(repo)
                return record
            self._known_repositories.discard(repo)
            existing, deleting, *guarded = result.gets
            fences, session = guarded[: len(keys.fences_of(repo))], guarded[len(keys.fences_of(repo)) :]
            if any(found is not None for found in fences):
                raise RepositoryDeleting(repo)
            if upload is not None and (session[0] is None or session[0].mod_revision != upload.mod_revision):
                raise SessionChanged(upload.id)
            if deleting is not None:
                raise BeingCollected(digest)
            if existing is None:
                continue  # a quota guard moved, or the blob came and went: measure again
            found = self.blob_of(digest, existing.value)
            # Bytes a scrub found corrupt give way to these freshly verified ones.
            fresh = [Put(blob_key, self.blob_value(digest, record))] if found.corrupt else []
            again = await self.kv.txn(
                [
                    Compare.unchanged(blob_key, existing.mod_revision),
                    not_deleting,
                    *session_guard,
                    *catalog_guards,
                    *admission,
                ],
                [*fresh, *common, *catalog_ops, *guard_writes],
            )
            if again.succeeded:
                self._known_repositories.add(repo)
                return record if found.corrupt else found
            self._known_repositories.discard(repo)
        raise Conflict(f"commit of {digest} kept racing")

    async def remove_unrecorded(
        self,
        digest: str,
        key: str,
        delete: Callable[[str], Awaitable[None]],
        others_committing: Callable[[], Awaitable[bool]],
    ) -> bool:
        """Delete a storage object for `digest` that no blob record names, unless another upload may
        have put its bytes there (`others_committing`: another live session is committing it).

        The `deleting` record is taken first and the other sessions are looked at after: a session
        that records its commit intent later finds the record before it writes a byte to the key,
        and waits (Uploader.wait_to_write); one that recorded it earlier is seen here, and the
        object is left to it. Either way no upload's bytes are deleted under it.
        """
        if await others_committing():
            return False  # the common case of a race, without a `deleting` record for writers to wait on
        claimed = await self.kv.txn(
            [Compare.absent(keys.blob(digest)), Compare.absent(keys.deleting(digest))],
            [Put(keys.deleting(digest), json.dumps({"key": key, "at": time.time()}).encode())],
        )
        if not claimed.succeeded:
            return False
        try:
            if await others_committing():
                return False
            await delete(key)
        finally:
            await self.kv.delete(keys.deleting(digest))
        return True

    async def _admit(self, link_key: str, quotas: Sequence[QuotaScope], size: int) -> tuple[list[Compare], list[Op]]:
        """Quota guards for making `link_key`; none when there are no quotas or it already exists."""
        if not quotas:
            return [], []
        existing = await self.kv.get(link_key)
        if existing is not None:
            return [Compare.unchanged(link_key, existing.mod_revision)], []
        compares, writes = await admit(self.kv, list(quotas), size)
        return [Compare.absent(link_key), *compares], list(writes)

    async def wait_collected(self, digest: str, *, timeout: float = 30.0) -> None:
        """Return once garbage collection has finished deleting `digest` (or it never was)."""
        deadline = time.monotonic() + timeout
        delay = 0.02
        while await self.kv.get(keys.deleting(digest)) is not None:
            if time.monotonic() > deadline:
                raise Conflict(f"{digest} is still being collected")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def touch(self, digest: str) -> None:
        """Note that a client was just told this blob exists: garbage collection spares it a while."""
        await self.kv.put(keys.touch(digest), encode(TouchRecord(time.time())))

    async def mount_blob(
        self,
        repo: str,
        digest: str,
        source: str,
        *,
        quotas: Sequence[QuotaScope] = (),
        events: Callable[[int], Sequence[Op]] = lambda size: (),
    ) -> LinkRecord | None:
        """Link a blob of `source` into `repo`; None if `source` does not have it.

        `events(size)` gives the notification records written with the link.
        """
        for _ in range(_MAX_ATTEMPTS):
            found = await self.kv.get(keys.link(source, digest))
            if found is None:
                return None
            record: LinkRecord = _load(LinkRecord, found)
            linked = LinkRecord(record.size, time.time())
            admission, guard_writes = await self._admit(keys.link(repo, digest), quotas, record.size)
            catalog_guards, catalog_ops = await self._catalog_ops(repo)
            result = await self.kv.txn(
                [
                    Compare.unchanged(found.key, found.mod_revision),
                    Compare.present(keys.blob(digest)),
                    Compare.absent(keys.deleting(digest)),
                    *_fence_guards(repo),
                    *catalog_guards,
                    *admission,
                ],
                [
                    Put(keys.link(repo, digest), encode(linked)),
                    Put(keys.repository(repo), b"{}"),
                    Delete(keys.pending_blob(digest)),
                    HOLDING_CHANGED(repo, digest),
                    *guard_writes,
                    *catalog_ops,
                    *events(record.size),
                ],
            )
            if result.succeeded:
                self._known_repositories.add(repo)
                return linked
            self._known_repositories.discard(repo)
            await self._check_fenced(repo)
        raise Conflict(f"mount of {digest} kept racing")

    async def unlink_blob(
        self, repo: str, digest: str, *, quotas: Sequence[QuotaScope] = (), events: Sequence[Op] = ()
    ) -> bool:
        """Remove a blob's link from `repo`, giving its bytes back to the quotas that counted them.

        `events` (notification records) are written in the same transaction, and only if it happens.
        """
        key = keys.link(repo, digest)
        for _ in range(_MAX_ATTEMPTS):
            found = await self.kv.get(key)
            if found is None:
                return False
            link: LinkRecord = _load(LinkRecord, found)
            compares, writes = await release_quota(self.kv, {scope: link.size for scope in quotas})
            ops: list[Op] = [Delete(key), HOLDING_CHANGED(repo, digest), *writes, *events]
            if (await self.kv.txn([Compare.unchanged(key, found.mod_revision), *compares], ops)).succeeded:
                return True
        raise Conflict(f"unlink of {digest} kept racing")

    # -- manifests --------------------------------------------------------------------------

    async def get_manifest(self, repo: str, digest: str) -> ManifestRecord | None:
        return _load(ManifestRecord, await self.kv.get(keys.manifest(repo, digest)))

    async def manifest_media_type_checked(
        self, repo: str, digest: str, marks: Sequence[Mark]
    ) -> tuple[str | None, bool]:
        """A manifest's media type (None: no such manifest), and whether every one of `marks` still
        holds: one round trip, at one revision, and only the media type decoded."""
        if marks:
            found, holds = await self._read_checked(keys.manifest(repo, digest), marks)
        else:
            found, holds = await self.kv.get(keys.manifest(repo, digest)), True
        return (None if found is None else encoding.manifest_media_type(found.value)), holds

    async def manifests_marked(self, repo: str, digests: Sequence[str]) -> dict[str, tuple[ManifestRecord, Mark]]:
        """The records of those of `digests` that are manifests of `repo`, each with its mark."""
        found: dict[str, tuple[ManifestRecord, Mark]] = {}
        for start in range(0, len(digests), _BATCH):
            batch = digests[start : start + _BATCH]
            result = await self.kv.txn([], [Get(keys.manifest(repo, d)) for d in batch])
            for digest, kv in zip(batch, result.gets, strict=True):
                if kv is not None:
                    found[digest] = (_load(ManifestRecord, kv), Mark(kv.key, kv.mod_revision))
        return found

    async def pointers_to(self, repo: str, tag: str, subject: str) -> list[tuple[Mark, str, str]]:
        """What `tag` points at and every referrer of `subject`: (mark, manifest digest, "tag" or "referrer").

        These are where signatures of `subject` are found (cosign's tag scheme and OCI 1.1 referrers).
        """
        found: list[tuple[Mark, str, str]] = []
        tagged = await self.kv.get(keys.tag(repo, tag))
        if tagged is not None:
            found.append((Mark(tagged.key, tagged.mod_revision), _tagged_digest(tagged), "tag"))
        for kv in await self.kv.range(keys.referrers_of(repo, subject)):
            found.append((Mark(kv.key, kv.mod_revision), json.loads(kv.value)["digest"], "referrer"))
        return found

    async def referrer_subjects(self, repo: str) -> set[str]:
        """Every digest in `repo` that has a referrer."""
        subjects = set()
        async for rest in self._names_under(keys.referrers_in(repo), 0):
            subjects.add(keys.split_referrer_key(rest)[1])
        return subjects

    async def put_manifest(
        self,
        repo: str,
        record: ManifestRecord,
        *,
        tag: str | None,
        storage_key: str,
        frozen_tag: bool = False,
        intent: UploadSession | None = None,
        events: Sequence[Op] = (),
        references_follow: bool = False,
    ) -> None:
        """Record a manifest (already in storage) and point `tag` at it, in one transaction.

        `intent` is the upload session that recorded the write of its bytes; it ends here.
        `events` (notification records) are written in the same transaction.

        Every referenced blob and child manifest must be linked in `repo` at the moment of the
        write; otherwise nothing changes and MissingReferences says what is missing. A
        `frozen_tag` may be created or pushed again with the same content, never moved:
        TagFrozen says it points elsewhere. With `references_follow` (a manifest the pull-through cache
        fetched: clients fetch what it names after it, and the cache stores each as it is fetched) the
        references need not be here yet; those that are stop being garbage all the same.
        """
        base_guards = [Compare.absent(keys.deleting(record.digest)), *_fence_guards(repo)]
        base_ops: list[Op] = [
            Put(keys.manifest(repo, record.digest), encode(record)),
            Put(keys.repository(repo), b"{}"),
            Delete(keys.pending_blob(record.digest)),
            Delete(keys.pending_manifest(repo, record.digest)),
            HOLDING_CHANGED(repo, record.digest),
        ]
        if record.subject:
            base_ops.append(
                Put(keys.referrer(repo, record.subject, record.digest), json.dumps(record.descriptor()).encode())
            )
        if intent is not None:
            base_ops += intent.ending()
        base_ops.extend(events)
        # Everything it names must be there, and whatever it names is no longer garbage: the
        # push wins over a collection that marked it.
        ref_guards = [Compare.present(keys.link(repo, d)) for d in record.blobs]
        ref_guards += [Compare.present(keys.manifest(repo, d)) for d in record.manifests]
        if references_follow:
            ref_guards = []
        ref_ops: list[Op] = [Delete(keys.pending_blob(d)) for d in record.blobs]
        ref_ops += [Delete(keys.pending_manifest(repo, d)) for d in record.manifests]
        blob_key = keys.blob(record.digest)
        blob = Put(blob_key, self.blob_value(record.digest, BlobRecord(record.size, storage_key, record.pushed)))
        for _ in range(_MAX_ATTEMPTS):
            tag_guards, tag_ops = await self._tag_move(repo, tag, record, frozen_tag)
            catalog_guards, catalog_ops = await self._catalog_ops(repo)
            head_guards = [*base_guards, *tag_guards, *catalog_guards]
            head_ops = [*base_ops, *tag_ops, *catalog_ops]
            if len(ref_guards) + len(head_guards) < _TXN_BUDGET and len(ref_ops) + len(head_ops) < _TXN_BUDGET:
                guards, ops = [*head_guards, *ref_guards], [*head_ops, *ref_ops]
            else:
                # Too many references for one transaction: claim them in batches, then commit
                # under the GC epoch, which a collection moves before it deletes anything.
                guards, ops = [*head_guards, await self._claim_references(repo, record, ref_guards, ref_ops)], head_ops
            if (await self.kv.txn([*guards, Compare.absent(blob_key)], [*ops, blob])).succeeded:
                self._known_repositories.add(repo)
                return
            if (await self.kv.txn([*guards, Compare.present(blob_key)], ops)).succeeded:
                self._known_repositories.add(repo)
                return
            self._known_repositories.discard(repo)
            if await self.kv.get(keys.deleting(record.digest)) is not None:
                raise BeingCollected(record.digest)
            await self._check_fenced(repo)
            if not references_follow:
                await self._raise_missing(repo, record)
        raise Conflict("manifest references kept changing")

    async def _tag_move(
        self, repo: str, tag: str | None, record: ManifestRecord, frozen: bool
    ) -> tuple[list[Compare], list[Op]]:
        """Guards and writes that point `tag` at `record`, keeping the digest -> tags index right."""
        if tag is None:
            return [], []
        key = keys.tag(repo, tag)
        current = await self.kv.get(key)
        old = _tagged_digest(current) if current is not None else None
        if frozen and old is not None and old != record.digest:
            raise TagFrozen(tag, old)
        ops: list[Op] = [
            Put(key, encode(TagRecord(record.digest, record.media_type, record.size, record.pushed))),
            Put(keys.tagged(repo, record.digest, tag), b""),
            TAGS_CHANGED(repo),
        ]
        if old is not None and old != record.digest:
            ops.append(Delete(keys.tagged(repo, old, tag)))
        return [Compare.unchanged(key, current.mod_revision if current else 0)], ops

    async def _catalog_ops(self, repo: str) -> tuple[list[Compare], list[Op]]:
        """(guards, ops) that keep the catalog's version right for a write into `repo`.

        A write that may create the repository carries CATALOG_CHANGED (nodes cache the catalog);
        one into a repository that exists guards that it still does when it lands, so one deleted
        meanwhile is not created again unseen (the writer forgets it and comes back here).
        """
        exists = [Compare.present(keys.repository(repo))]
        if repo in self._known_repositories:
            return exists, []
        if await self.kv.get(keys.repository(repo)) is not None:
            self._known_repositories.add(repo)
            return exists, []
        return [], [CATALOG_CHANGED]

    async def _check_fenced(self, repo: str) -> None:
        """RepositoryDeleting if a deletion of `repo` (or a namespace around it) is under way."""
        for key in keys.fences_of(repo):
            if await self.kv.get(key) is not None:
                raise RepositoryDeleting(repo)

    async def tags_of_digest(self, repo: str, digest: str) -> dict[str, KeyValue]:
        """The tags of `repo` that point at `digest`, with their records: from the index, in O(those tags)."""
        if not self._tag_index_ready:
            marker = await self.kv.get(keys.TAG_INDEX_BUILT)
            self._tag_index_ready = marker is not None
        prefix = keys.tags_of(repo)
        if not self._tag_index_ready:
            # A store from before the index, until the leader has built it: read every tag.
            every = await self._range_all(prefix)
            return {kv.key[len(prefix) :]: kv for kv in every if _tagged_digest(kv) == digest}
        index = keys.tags_of_digest(repo, digest)
        found = {}
        for entry in await self._range_all(index):
            tag = entry.key[len(index) :]
            record = await self.kv.get(keys.tag(repo, tag))
            if record is not None and _tagged_digest(record) == digest:
                found[tag] = record
        return found

    async def build_tag_index(self) -> int:
        """Index every tag by its digest (stores from before the index); returns the entries written."""
        if await self.kv.get(keys.TAG_INDEX_BUILT) is not None:
            return 0
        written = 0
        for kv in await self._range_all(keys.TAGS):
            repo, tag = keys.split_repo_key(kv.key, keys.TAGS)
            digest = _tagged_digest(kv)
            entry = keys.tagged(repo, digest, tag)
            # Only if the tag is still there: a move since writes the index itself.
            if (await self.kv.txn([Compare.unchanged(kv.key, kv.mod_revision)], [Put(entry, b"")])).succeeded:
                written += 1
        # Tag lists and the catalog become cacheable from here on.
        for repo in [kv.key[len(keys.REPOSITORIES) :] for kv in await self._range_all(keys.REPOSITORIES)]:
            await self.kv.txn([], [TAGS_CHANGED(repo)])
        await self.kv.txn([], [CATALOG_CHANGED])
        await self.kv.put(keys.TAG_INDEX_BUILT, json.dumps({"at": time.time(), "entries": written}).encode())
        self._tag_index_ready = True
        return written

    async def _range_all(self, prefix: str) -> list[KeyValue]:
        return await scan(self.kv, prefix)

    async def _claim_references(
        self, repo: str, record: ManifestRecord, ref_guards: list[Compare], ref_ops: list[Op]
    ) -> Compare:
        """Check and un-mark references in batches; returns the guard the final write needs."""
        epoch = await self.kv.get(keys.GC_EPOCH)
        for start in range(0, len(ref_guards), _BATCH):
            batch_guards = ref_guards[start : start + _BATCH]
            batch_ops = ref_ops[start : start + _BATCH]
            # Rewriting the repository record also stops a collection unlinking blobs here.
            result = await self.kv.txn(batch_guards, [*batch_ops, Put(keys.repository(repo), b"{}")])
            if not result.succeeded:
                await self._raise_missing(repo, record)
        return Compare.unchanged(keys.GC_EPOCH, epoch.mod_revision if epoch else 0)

    async def _untag(self, repo: str, digest: str, tags: dict[str, KeyValue]) -> bool:
        """Remove `tags` of `repo` (each still pointing at `digest`, as read) and their index entries."""
        guards = [Compare.unchanged(kv.key, kv.mod_revision) for kv in tags.values()]
        ops: list[Op] = [Delete(kv.key) for kv in tags.values()]
        ops += [Delete(keys.tagged(repo, digest, tag)) for tag in tags]
        return (await self.kv.txn(guards, [*ops, TAGS_CHANGED(repo)])).succeeded

    async def _raise_missing(self, repo: str, record: ManifestRecord) -> None:
        missing_blobs = [d for d in record.blobs if await self.kv.get(keys.link(repo, d)) is None]
        missing_manifests = [d for d in record.manifests if await self.kv.get(keys.manifest(repo, d)) is None]
        if missing_blobs or missing_manifests:
            raise MissingReferences(missing_blobs, missing_manifests)

    async def delete_manifest(
        self, repo: str, digest: str, *, events: Callable[[list[str]], Sequence[Op]] = lambda tags: ()
    ) -> bool:
        """Remove a manifest, every tag that points at it and its referrer entry, atomically.

        `events(tags)`, given the tags that go with it, gives notification records written with it.
        A manifest with more tags than one transaction holds loses the rest of them first, a batch
        at a time; the manifest, its last tags and the events of all of them go together.
        """
        untagged: list[str] = []
        for _ in range(_MAX_ATTEMPTS):
            found = await self.kv.get(keys.manifest(repo, digest))
            if found is None:
                return False
            record: ManifestRecord = _load(ManifestRecord, found)
            tagged = await self.tags_of_digest(repo, digest)
            while len(tagged) > _TAGS_PER_TXN:
                batch = dict(list(tagged.items())[:_TAGS_PER_TXN])
                if await self._untag(repo, digest, batch):
                    untagged.extend(batch)
                tagged = await self.tags_of_digest(repo, digest)
            guards = [Compare.unchanged(found.key, found.mod_revision)]
            guards += [Compare.unchanged(kv.key, kv.mod_revision) for kv in tagged.values()]
            ops: list[Op] = [Delete(found.key), *(Delete(kv.key) for kv in tagged.values())]
            ops += [Delete(keys.tagged(repo, digest, tag)) for tag in tagged]
            if tagged:
                ops.append(TAGS_CHANGED(repo))
            if record.subject:
                ops.append(Delete(keys.referrer(repo, record.subject, digest)))
            ops.append(release(repo, digest, blobs=record.blobs, manifests=record.manifests))
            ops.append(HOLDING_CHANGED(repo, digest))
            notes = list(events([*untagged, *tagged]))
            room = max(_TXN_BUDGET - len(ops), 1)
            ops.extend(notes[:room])
            if (await self.kv.txn(guards, ops)).succeeded:
                # Records that did not fit (a manifest with very many tags) follow, still in order.
                for start in range(room, len(notes), _TXN_BUDGET):
                    await self.kv.txn([], notes[start : start + _TXN_BUDGET])
                return True
        raise Conflict(f"delete of {digest} kept racing")

    # -- adopting a registry:2 store ---------------------------------------------------------

    async def import_state(self) -> ImportState | None:
        found = await self.kv.get(keys.IMPORT_STATE)
        return None if found is None else decode(ImportState, found.value)

    async def set_import_state(self, state: ImportState) -> None:
        await self.kv.put(keys.IMPORT_STATE, _json(state))

    async def handed_over(self) -> float | None:
        """When `wharf export` last wrote the store's registry:2 layout, unless an import came since."""
        found = await self.kv.get(keys.HANDOVER)
        return None if found is None else float(json.loads(found.value)["time"])

    async def set_handed_over(self, when: float | None) -> None:
        """Record an export's end (`when`), or with None that an import took registry:2's tree in since."""
        if when is None:
            await self.kv.delete(keys.HANDOVER)
        else:
            await self.kv.put(keys.HANDOVER, json.dumps({"time": when}).encode())

    async def adopt(self, adoption: Adoption) -> Adopted:
        """Write one repository's records where none is there yet: idempotent, and what Wharf has
        since written (a tag moved by a push, a blob pushed again) always wins.

        A blob adopted as unused becomes used once an adopted manifest names it.
        """
        repo = adoption.repo
        writes: list[tuple[str, bytes]] = [(keys.repository(repo), b"{}")]
        writes += [(keys.link(repo, digest), encode(link)) for digest, link in sorted(adoption.links.items())]
        for record in adoption.manifests:
            writes.append((keys.manifest(repo, record.digest), encode(record)))
            if record.subject:
                writes.append(
                    (keys.referrer(repo, record.subject, record.digest), json.dumps(record.descriptor()).encode())
                )
        writes += [(keys.tagged(repo, record.digest, tag), b"") for tag, record in sorted(adoption.tags.items())]
        writes += [(keys.tag(repo, tag), encode(record)) for tag, record in sorted(adoption.tags.items())]
        done = Adopted()
        # Blobs first and tags last: a reader never meets a tag whose records are not there yet.
        for digest, blob in sorted(adoption.blobs.items()):
            await self._adopt_blob(digest, blob, done)
        for start in range(0, len(writes), _ADOPT_BATCH):
            batch = writes[start : start + _ADOPT_BATCH]
            result = await self.kv.txn([Compare.absent(k) for k, _ in batch], [Put(k, v) for k, v in batch])
            if result.succeeded:
                done.written += len(batch)
                continue
            for key, value in batch:  # some are there already: one at a time
                if (await self.kv.txn([Compare.absent(key)], [Put(key, value)])).succeeded:
                    done.written += 1
                else:
                    done.kept += 1
        # What the repository now holds is counted by the storage figures' settler.
        held = [*adoption.links, *(record.digest for record in adoption.manifests)]
        marks = [HOLDING_CHANGED(repo, digest) for digest in dict.fromkeys(held)]
        for start in range(0, len(marks), _BATCH):
            await self.kv.txn([], marks[start : start + _BATCH])
        # Nodes holding this repository's tags, or the catalog, in memory read them again.
        await self.kv.txn([], [TAGS_CHANGED(repo), CATALOG_CHANGED])
        return done

    async def _adopt_blob(self, digest: str, blob: BlobRecord, done: Adopted) -> None:
        key = keys.blob(digest)
        for _ in range(_MAX_ATTEMPTS):
            existing = await self.kv.get(key)
            if existing is None:
                if (await self.kv.txn([Compare.absent(key)], [Put(key, self.blob_value(digest, blob))])).succeeded:
                    done.written += 1
                    return
                continue
            current = self.blob_of(digest, existing.value)
            if current.imported == "unused" and blob.imported == "used":
                upgraded = BlobRecord(current.size, current.key, current.created, "used")
                if (
                    await self.kv.txn(
                        [Compare.unchanged(key, existing.mod_revision)], [Put(key, self.blob_value(digest, upgraded))]
                    )
                ).succeeded:
                    done.written += 1
                    return
                continue
            done.kept += 1
            return
        raise Conflict(f"adoption of blob {digest} kept racing")

    async def list_referrers(
        self, repo: str, subject: str, *, after: str | None = None, limit: int = 0
    ) -> list[dict[str, Any]]:
        """Referrer descriptors of `subject` in digest order, from the one after digest `after`."""
        start = keys.after(keys.referrer(repo, subject, after)) if after else None
        found = await self.kv.range(keys.referrers_of(repo, subject), start=start, limit=limit)
        return [json.loads(kv.value) for kv in found]


@dataclass
class Adoption:
    """One repository of a registry:2 store, as records: what `Metadata.adopt` writes."""

    repo: str
    blobs: dict[str, BlobRecord] = field(default_factory=dict)
    links: dict[str, LinkRecord] = field(default_factory=dict)
    manifests: list[ManifestRecord] = field(default_factory=list)
    tags: dict[str, TagRecord] = field(default_factory=dict)
    # Every tag the tree has, its manifest readable or not (`tags` holds only the readable ones).
    tree_tags: set[str] = field(default_factory=set)


@dataclass
class Adopted:
    """What an adoption wrote, and what it found already there (written earlier, or pushed since)."""

    written: int = 0
    kept: int = 0


@dataclass(frozen=True)
class ImportState:
    """The adoption of a registry:2 store: pending, running (from `cursor` on) or done."""

    state: str
    requested: float = 0.0
    started: float = 0.0
    finished: float = 0.0
    node: str = ""
    cursor: str = ""  # the last repository imported whole, in name order
    repositories_total: int = 0
    repositories_done: int = 0
    tags: int = 0
    manifests: int = 0
    blobs: int = 0
    links: int = 0
    problems: int = 0


_ADOPT_BATCH = 60


def reachable(roots: Iterable[str], successors: Callable[[str], Iterable[str]]) -> set[str]:
    """Every node reachable from `roots` (themselves included) by following `successors`.

    Garbage collection and retention both walk manifests this way: tags to index children and to
    the referrers of what is reached.
    """
    found: set[str] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in found:
            continue
        found.add(node)
        stack.extend(successors(node))
    return found
