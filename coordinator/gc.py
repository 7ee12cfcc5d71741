"""Online mark-and-sweep garbage collection over the coordinator's metadata.

Pushes and pulls go on while it runs. The rules that keep a tagged image whole:
- Mark finds what nothing live uses and what is older than the grace period (by creation, link,
  last touch and push time). Those become *pending* with a KV mark.
- A push that uses a pending blob or manifest deletes the mark in its own transaction (the push
  wins); a manifest PUT also guards that every blob it names is still linked (GC wins: the client
  is told MANIFEST_BLOB_UNKNOWN). Manifests written since mark began are scanned again after the
  marks are placed, so one that slipped in between also saves what it uses.
- Deletion is one transaction per digest that compares the pending mark, the blob record, its
  links and its touch record with what mark saw; only then is the storage object deleted, under a
  `deleting` record that writers of the same digest wait out.

Only what a blob record names is ever deleted: a record proves Wharf wrote the object (or adopted
it from a registry:2 store). Objects no record names are counted by the node's storage sweep and
left alone. The grace period is not a safety argument; it spares pushes in flight (blobs uploaded,
manifest not yet written) from having to upload again. What a deleted or untagged manifest let go
of carries a release record with the time, so activity from before the release (the push and the
pulls of the deleted image) does not hold it back: deleted images' space comes back at the next
collection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import keys
from .kv import KV, Compare, Delete, KeyValue, Op, Put
from .metadata import BlobRecord, Release, decode, reachable
from .readonly import Halted

log = logging.getLogger("wharf.gc")

_PAGE = 1000
_CONCURRENCY = 32
# How long a storage delete waits for others to share its request.
_BATCH_WAIT = 0.01


@dataclass
class Candidate:
    digest: str
    size: int
    storage_key: str
    blob_revision: int
    touch_revision: int
    links: dict[str, int] = field(default_factory=dict)  # link key -> mod_revision
    pending_revision: int = 0


@dataclass
class ManifestCandidate:
    repo: str
    digest: str
    revision: int
    subject: str | None
    pending_revision: int = 0


@dataclass
class HeldBack:
    """Blobs or manifests a cycle kept although nothing uses them, and why."""

    reason: str
    count: int = 0
    bytes: int = 0
    until: float | None = None  # when the reason lapses; None: until an operator acts

    def add(self, size: int, until: float | None = None) -> None:
        self.count += 1
        self.bytes += size
        if until is not None:
            self.until = max(self.until or 0.0, until)


# Why a blob or manifest that nothing uses is kept anyway.
HELD_YOUNG = "uploaded, linked or shown to a client within gc.grace and no manifest uses it yet (a push in flight?)"
HELD_YOUNG_MANIFEST = "untagged manifest pushed within gc.grace"
HELD_IMPORTED = "adopted from registry:2 with no manifest using it; `wharf gc --reclaim-imported` deletes it"
HELD_PUSHED = "used by a push while this cycle ran"
HELD_UNACCOUNTED = "in storage but in no Wharf record; `wharf gc --delete-unaccounted` deletes it"


@dataclass
class Summary:
    started: float = 0.0
    finished: float = 0.0
    dry_run: bool = False
    manifests_seen: int = 0
    blobs_seen: int = 0
    manifests_deleted: int = 0
    blobs_deleted: int = 0
    bytes_freed: int = 0
    blobs_saved_by_pushes: int = 0
    # Storage objects no record names (a writer died, or a refused manifest left its bytes).
    orphans_deleted: int = 0
    # Links to blobs that live on in other repositories but that nothing here uses any more.
    links_deleted: int = 0
    reclaimable_bytes: int = 0
    # Objects in storage that no record names: never deleted unless asked by name.
    unaccounted_objects: int = 0
    unaccounted_bytes: int = 0
    held_back: dict[str, HeldBack] = field(default_factory=dict)
    deleted: list[str] = field(default_factory=list)

    def hold(self, reason: str, size: int, until: float | None = None) -> None:
        self.held_back.setdefault(reason, HeldBack(reason)).add(size, until)

    def report(self) -> dict[str, Any]:
        """The summary as plain data (for JSON output and the last-run record)."""
        data = asdict(self)
        data["held_back"] = [asdict(h) for h in self.held_back.values()]
        return data

    @property
    def duration(self) -> float:
        return self.finished - self.started


Progress = Callable[[str, int, int], None]


def _no_progress(phase: str, done: int, total: int) -> None:
    pass


class Collector:
    def __init__(
        self,
        kv: KV,
        *,
        grace: float,
        delete_untagged: bool = False,
        dry_run: bool = False,
        reclaim_imported: bool = False,
        progress: Progress = _no_progress,
    ) -> None:
        self.kv = kv
        self.grace = grace
        self.delete_untagged = delete_untagged
        self.dry_run = dry_run
        self.reclaim_imported = reclaim_imported
        # When each blob and manifest was last let go of by a deleted or untagged manifest.
        self.released_blobs: dict[str, float] = {}
        self.released_manifests: dict[str, float] = {}
        self.progress = progress
        self.summary = Summary()
        # Asked before each deletion; False stops the cycle there (Halted): the registry went read-only.
        self.may_delete: Callable[[], bool] = lambda: True

    def _check_may_delete(self) -> None:
        if not self.may_delete():
            raise Halted("read-only: garbage collection stopped before deleting more")

    async def _all(self, prefix: str) -> list[KeyValue]:
        found: list[KeyValue] = []
        start: str | None = None
        while True:
            page = await self.kv.range(prefix, start=start, limit=_PAGE)
            found.extend(page)
            if len(page) < _PAGE:
                return found
            start = keys.after(page[-1].key)

    async def _next_epoch(self) -> None:
        """Fail any very large manifest write that checked its references before this point."""
        await self.kv.put(keys.GC_EPOCH, json.dumps({"at": time.time()}).encode())

    async def _revision(self) -> int:
        return (await self.kv.txn([], [])).revision

    # -- the cycle ------------------------------------------------------------------------

    async def run(
        self,
        delete_object: Callable[[str], Awaitable[None]],
        delete_many: Callable[[list[str]], Awaitable[None]] | None = None,
    ) -> Summary:
        """One whole cycle: untagged manifests (if asked), then blobs.

        With `delete_many`, the storage deletes of concurrent sweeps go out together.
        """
        if delete_many is not None:
            delete_object = _DeleteBatcher(delete_many).delete
        summary = Summary(started=time.time(), dry_run=self.dry_run)
        self.summary = summary  # readable while the cycle runs, for progress reports
        cutoff = summary.started - self.grace
        releases = await self._read_releases()
        doomed = await self._collect_manifests(cutoff, summary)
        await self._collect_blobs(cutoff, summary, delete_object, doomed)
        summary.finished = time.time()
        if not self.dry_run:
            await self._drop_releases(releases, cutoff)
            await self.kv.put(keys.GC_LAST_RUN, json.dumps(summary.report() | {"deleted": []}).encode())
        return summary

    async def _read_releases(self) -> list[KeyValue]:
        found = await self._all(keys.RELEASED)
        for kv in found:
            repo, digest = keys.split_repo_key(kv.key, keys.RELEASED)
            note = decode(Release, kv.value)
            for blob in [digest, *note.blobs]:
                self.released_blobs[blob] = max(self.released_blobs.get(blob, 0.0), note.at)
            for child in note.manifests:
                manifest = keys.manifest(repo, child)
                self.released_manifests[manifest] = max(self.released_manifests.get(manifest, 0.0), note.at)
        return found

    async def _drop_releases(self, releases: list[KeyValue], cutoff: float) -> None:
        """Releases older than the grace say nothing the grace does not: they go."""
        for kv in releases:
            if decode(Release, kv.value).at < cutoff:
                await self.kv.txn([Compare.unchanged(kv.key, kv.mod_revision)], [Delete(kv.key)])

    def _young(self, last_active: float, cutoff: float, released: float) -> bool:
        """Active within the grace, and not only before a release of it (a deleted image's pulls)."""
        return last_active >= cutoff and last_active > released

    # -- manifests --------------------------------------------------------------------------

    async def _collect_manifests(self, cutoff: float, summary: Summary) -> dict[str, dict[str, Any]]:
        """Delete manifests nothing keeps; returns their keys and records (what a dry run would delete)."""
        since = await self._revision()
        records = {kv.key: kv for kv in await self._all(keys.MANIFESTS)}
        decoded = {key: json.loads(kv.value) for key, kv in records.items()}
        live = await self._live_manifests(decoded, cutoff)
        doomed = set(records) - live
        if not self.delete_untagged:
            # Only referrers (signatures, SBOMs) whose subject is gone, or going, follow it.
            orphans: set[str] = set()
            while True:
                more = {
                    key
                    for key in doomed - orphans
                    if decoded[key].get("subject")
                    and (
                        _sibling(key, decoded[key]["subject"]) not in records
                        or _sibling(key, decoded[key]["subject"]) in orphans
                    )
                }
                if not more:
                    break
                orphans |= more
            doomed = orphans
        candidates = []
        for key in sorted(doomed):
            repo, digest = key[len(keys.MANIFESTS) :].rsplit("@", 1)
            candidates.append(ManifestCandidate(repo, digest, records[key].mod_revision, decoded[key].get("subject")))
        if self.dry_run:
            summary.manifests_deleted = len(candidates)
            summary.deleted += [f"{c.repo}@{c.digest}" for c in candidates]
            return {key: decoded[key] for key in doomed}
        await self._bounded([self._pend_manifest(c) for c in candidates])
        await self._next_epoch()
        candidates = [c for c in candidates if c.pending_revision]
        # Manifests written since mark began may use a candidate (an index naming a child).
        saved: set[str] = set()
        for kv in await self._all(keys.MANIFESTS):
            if kv.mod_revision > since:
                repo = kv.key[len(keys.MANIFESTS) :].rsplit("@", 1)[0]
                saved.update(f"{repo}@{d}" for d in json.loads(kv.value).get("manifests", []))
        for c in candidates:
            if f"{c.repo}@{c.digest}" in saved:
                await self.kv.delete(keys.pending_manifest(c.repo, c.digest))
        candidates = [c for c in candidates if f"{c.repo}@{c.digest}" not in saved]
        results = await self._bounded([self._delete_manifest(c) for c in candidates])
        for c, deleted in zip(candidates, results, strict=True):
            if deleted:
                summary.manifests_deleted += 1
                summary.deleted.append(f"{c.repo}@{c.digest}")
        gone = (keys.manifest(c.repo, c.digest) for c, ok in zip(candidates, results, strict=True) if ok)
        return {key: decoded[key] for key in gone}

    async def _live_manifests(self, decoded: dict[str, dict[str, Any]], cutoff: float) -> set[str]:
        """Manifest keys reachable from tags (children, referrers) or younger than the grace."""
        by_subject: dict[str, list[str]] = {}
        for key, record in decoded.items():
            if record.get("subject"):
                repo = key[len(keys.MANIFESTS) :].rsplit("@", 1)[0]
                by_subject.setdefault(keys.manifest(repo, record["subject"]), []).append(key)
        tagged = [keys.manifest(*_split_tag(kv)) for kv in await self._all(keys.TAGS)]
        young = [
            key
            for key, record in decoded.items()
            if self._young(record.get("pushed", 0), cutoff, self.released_manifests.get(key, 0.0))
        ]

        def successors(key: str) -> list[str]:
            children = (_sibling(key, child) for child in decoded[key].get("manifests", []))
            return [c for c in children if c in decoded] + by_subject.get(key, [])

        live = reachable((r for r in tagged + young if r in decoded), successors)
        if self.delete_untagged:
            by_tags = reachable((r for r in tagged if r in decoded), successors)
            for key in live - by_tags:
                record = decoded[key]
                self.summary.hold(HELD_YOUNG_MANIFEST, record.get("size", 0), record.get("pushed", 0) + self.grace)
        return live

    async def _pend_manifest(self, c: ManifestCandidate) -> None:
        key = keys.manifest(c.repo, c.digest)
        mark = keys.pending_manifest(c.repo, c.digest)
        result = await self.kv.txn(
            [Compare.unchanged(key, c.revision)], [Put(mark, json.dumps({"at": time.time()}).encode())]
        )
        if result.succeeded:
            c.pending_revision = result.revision

    async def _delete_manifest(self, c: ManifestCandidate) -> bool:
        self._check_may_delete()
        key = keys.manifest(c.repo, c.digest)
        mark = keys.pending_manifest(c.repo, c.digest)
        ops: list[Op] = [Delete(key), Delete(mark)]
        if c.subject:
            ops.append(Delete(keys.referrer(c.repo, c.subject, c.digest)))
        guards = [Compare.unchanged(key, c.revision), Compare.unchanged(mark, c.pending_revision)]
        # A tag moved onto it since mark makes it live again.
        tagged = [kv for kv in await self._all(keys.tags_of(c.repo)) if json.loads(kv.value)["digest"] == c.digest]
        if tagged:
            await self.kv.delete(mark)
            return False
        result = await self.kv.txn(guards, ops)
        if not result.succeeded:
            await self.kv.txn([Compare.unchanged(mark, c.pending_revision)], [Delete(mark)])
        return result.succeeded

    # -- blobs ----------------------------------------------------------------------------

    async def _collect_blobs(
        self,
        cutoff: float,
        summary: Summary,
        delete_object: Callable[[str], Awaitable[None]],
        doomed: dict[str, dict[str, Any]],
    ) -> None:
        since = await self._revision()
        # Read before the manifests: every manifest push rewrites its repository's record, so an
        # unchanged record later proves no manifest arrived there since this scan.
        repositories = {kv.key[len(keys.REPOSITORIES) :]: kv.mod_revision for kv in await self._all(keys.REPOSITORIES)}
        manifests = await self._all(keys.MANIFESTS)
        summary.manifests_seen = len(manifests)
        used: set[str] = set()
        used_in: dict[str, set[str]] = {}
        for kv in manifests:
            if kv.key in doomed:
                continue  # a dry run still sees manifests that a real run would have deleted
            record = json.loads(kv.value)
            used.add(record["digest"])
            used.update(record.get("blobs", []))
            repo = kv.key[len(keys.MANIFESTS) :].rsplit("@", 1)[0]
            used_in.setdefault(repo, set()).update(record.get("blobs", []))
        self.progress("mark", len(manifests), len(manifests))
        # Doomed manifests are deleted now: what only they used is released this instant.
        now = time.time()
        for record in doomed.values():
            for digest in [*record.get("blobs", []), record["digest"]]:
                self.released_blobs[digest] = now
        links: dict[str, dict[str, int]] = {}
        last_active: dict[str, float] = {}
        young_links: set[str] = set()
        for kv in await self._all(keys.LINKS):
            digest = kv.key.rsplit("@", 1)[1]
            links.setdefault(digest, {})[kv.key] = kv.mod_revision
            linked = json.loads(kv.value).get("linked", 0)
            last_active[digest] = max(last_active.get(digest, 0.0), linked)
            if self._young(linked, cutoff, self.released_blobs.get(digest, 0.0)):
                young_links.add(kv.key)
        touches = {kv.key[len(keys.TOUCHES) :]: kv for kv in await self._all(keys.TOUCHES)}
        for digest, kv in touches.items():
            last_active[digest] = max(last_active.get(digest, 0.0), json.loads(kv.value).get("at", 0))
        blobs = await self._all(keys.BLOBS)
        summary.blobs_seen = len(blobs)
        candidates: list[Candidate] = []
        for kv in blobs:
            digest = kv.key[len(keys.BLOBS) :]
            if digest in used:
                continue
            record = decode(BlobRecord, kv.value)
            active = max(record.created, last_active.get(digest, 0.0))
            if self._young(active, cutoff, self.released_blobs.get(digest, 0.0)):
                summary.hold(HELD_YOUNG, record.size, active + self.grace)
                continue
            if record.imported == "unused" and not self.reclaim_imported:
                summary.hold(HELD_IMPORTED, record.size)
                continue
            touch = touches.get(digest)
            candidates.append(
                Candidate(
                    digest,
                    record.size,
                    record.key,
                    kv.mod_revision,
                    touch.mod_revision if touch else 0,
                    links.get(digest, {}),
                )
            )
        summary.reclaimable_bytes = sum(c.size for c in candidates)
        self.progress("candidates", len(candidates), len(blobs))
        if self.dry_run:
            summary.blobs_deleted = len(candidates)
            summary.bytes_freed = summary.reclaimable_bytes
            summary.deleted += [c.digest for c in candidates]
            return
        await self._bounded([self._pend_blob(c) for c in candidates])
        await self._next_epoch()
        candidates = [c for c in candidates if c.pending_revision]
        # A manifest written between mark and the pending marks did not see them: rescan.
        saved: set[str] = set()
        for kv in await self._all(keys.MANIFESTS):
            if kv.mod_revision > since:
                record = json.loads(kv.value)
                saved.add(record["digest"])
                saved.update(record.get("blobs", []))
        for c in candidates:
            if c.digest in saved:
                await self.kv.txn(
                    [Compare.unchanged(keys.pending_blob(c.digest), c.pending_revision)],
                    [Delete(keys.pending_blob(c.digest))],
                )
        candidates = [c for c in candidates if c.digest not in saved]
        done = 0

        async def collect(c: Candidate) -> bool:
            nonlocal done
            deleted = await self._delete_blob(c, delete_object)
            done += 1
            self.progress("sweep", done, len(candidates))
            return deleted

        results = await self._bounded([collect(c) for c in candidates])
        for c, deleted in zip(candidates, results, strict=True):
            if deleted:
                summary.blobs_deleted += 1
                summary.bytes_freed += c.size
                summary.deleted.append(c.digest)
            else:
                summary.blobs_saved_by_pushes += 1
                summary.hold(HELD_PUSHED, c.size)
        await self._collect_links(links, young_links, used_in, repositories, touches, cutoff, summary)

    async def _collect_links(
        self,
        links: dict[str, dict[str, int]],
        young_links: set[str],
        used_in: dict[str, set[str]],
        repositories: dict[str, int],
        touches: dict[str, KeyValue],
        cutoff: float,
        summary: Summary,
    ) -> None:
        """Unlink blobs that no manifest of their repository uses (they still live elsewhere).

        Quotas count what a repository links, so this is what makes deleting images lower its
        usage. A link goes only if its repository saw no manifest push since the scan.
        """
        collected = set(summary.deleted)
        stale: list[tuple[str, str, int]] = []
        for digest, by_key in links.items():
            if digest in collected:
                continue
            touch = touches.get(digest)
            touched = json.loads(touch.value).get("at", 0) if touch is not None else 0.0
            if self._young(touched, cutoff, self.released_blobs.get(digest, 0.0)):
                continue
            for link_key, revision in by_key.items():
                repo = link_key[len(keys.LINKS) :].rsplit("@", 1)[0]
                if link_key in young_links or digest in used_in.get(repo, set()) or repo not in repositories:
                    continue
                stale.append((link_key, digest, revision))
        if self.dry_run:
            summary.links_deleted = len(stale)
            return
        if stale:
            await self._next_epoch()

        async def unlink(link_key: str, digest: str, revision: int) -> bool:
            self._check_may_delete()
            repo = link_key[len(keys.LINKS) :].rsplit("@", 1)[0]
            touch = touches.get(digest)
            result = await self.kv.txn(
                [
                    Compare.unchanged(keys.repository(repo), repositories[repo]),
                    Compare.unchanged(link_key, revision),
                    Compare.unchanged(keys.touch(digest), touch.mod_revision if touch else 0),
                ],
                [Delete(link_key)],
            )
            return result.succeeded

        results = await self._bounded([unlink(*item) for item in stale])
        summary.links_deleted = sum(1 for ok in results if ok)

    async def _pend_blob(self, c: Candidate) -> None:
        result = await self.kv.txn(
            [Compare.unchanged(keys.blob(c.digest), c.blob_revision)],
            [Put(keys.pending_blob(c.digest), json.dumps({"at": time.time()}).encode())],
        )
        if result.succeeded:
            c.pending_revision = result.revision

    async def _delete_blob(self, c: Candidate, delete_object: Callable[[str], Awaitable[None]]) -> bool:
        self._check_may_delete()
        mark = keys.pending_blob(c.digest)
        guards = [
            Compare.unchanged(mark, c.pending_revision),
            Compare.unchanged(keys.blob(c.digest), c.blob_revision),
            Compare.unchanged(keys.touch(c.digest), c.touch_revision),
            *(Compare.unchanged(link, revision) for link, revision in c.links.items()),
        ]
        deleting = keys.deleting(c.digest)
        ops: list[Op] = [
            Delete(mark),
            Delete(keys.blob(c.digest)),
            Delete(keys.touch(c.digest)),
            *(Delete(link) for link in c.links),
            Put(deleting, json.dumps({"key": c.storage_key, "at": time.time()}).encode()),
        ]
        result = await self.kv.txn(guards, ops)
        if not result.succeeded:
            # Something used or touched it since mark: it stays; drop our mark if still ours.
            await self.kv.txn([Compare.unchanged(mark, c.pending_revision)], [Delete(mark)])
            return False
        try:
            await delete_object(c.storage_key)
        finally:
            # Writers of the same digest wait for this record to go before storing it again.
            await self.kv.delete(deleting)
        return True

    async def _bounded(self, calls: list[Awaitable[Any]]) -> list[Any]:
        gate = asyncio.Semaphore(_CONCURRENCY)

        async def one(call: Awaitable[Any]) -> Any:
            async with gate:
                return await call

        return await asyncio.gather(*(one(c) for c in calls))

    # -- orphans ----------------------------------------------------------------------------

    async def recorded_blobs(self) -> tuple[set[str], set[str]]:
        """Digests with a blob record, and the storage keys those records name."""
        digests: set[str] = set()
        stored: set[str] = set()
        for kv in await self._all(keys.BLOBS):
            digests.add(kv.key[len(keys.BLOBS) :])
            stored.add(decode(BlobRecord, kv.value).key)
        return digests, stored

    async def open_upload_ids(self) -> set[str]:
        """Upload sessions in the coordinator: their storage objects are accounted for."""
        return {kv.key[len(keys.UPLOADS) :] for kv in await self._all(keys.UPLOADS)}

    # -- explain ----------------------------------------------------------------------------

    async def explain(self, repo: str | None, digest: str) -> dict[str, Any]:
        """Why `digest` is kept (tags, manifests, referrers that use it) or when it may go."""
        now = time.time()
        tags = await self._all(keys.TAGS)
        manifests = await self._all(keys.MANIFESTS)
        users = []
        for kv in manifests:
            record = json.loads(kv.value)
            if digest in record.get("blobs", []) or digest in record.get("manifests", []):
                users.append(kv.key[len(keys.MANIFESTS) :])
        own = [kv.key[len(keys.MANIFESTS) :] for kv in manifests if kv.key.endswith("@" + digest)]
        tagged = [
            f"{kv.key[len(keys.TAGS) :].replace('@', ':', 1)}"
            for kv in tags
            if json.loads(kv.value)["digest"] == digest
        ]
        blob = await self.kv.get(keys.blob(digest))
        touch = await self.kv.get(keys.touch(digest))
        await self._read_releases()
        released = self.released_blobs.get(digest, 0.0)
        record = decode(BlobRecord, blob.value) if blob is not None else None
        reasons: list[str] = []
        if tagged:
            reasons.append("tagged as " + ", ".join(sorted(tagged)))
        if users:
            reasons.append("used by manifests " + ", ".join(sorted(users)))
        if own and not self.delete_untagged:
            reasons.append("it is a manifest; manifests stay until deleted (or --delete-untagged)")
        active = 0.0
        if record is not None:
            active = max(active, record.created)
        for link in await self._all(keys.LINKS):
            if link.key.endswith("@" + digest):
                active = max(active, json.loads(link.value).get("linked", 0))
        if touch is not None:
            active = max(active, json.loads(touch.value).get("at", 0))
        if not users and not tagged and self._young(active, now - self.grace, released):
            reasons.append(f"{HELD_YOUNG}: for {active + self.grace - now:.0f}s more")
        if record is not None and record.imported == "unused" and not users and not self.reclaim_imported:
            reasons.append(HELD_IMPORTED)
        if record is None and not own:
            reasons.append(
                "no Wharf record names it: if it is in storage, Wharf did not write it (or lost track of it) "
                "and never deletes it; `wharf gc --delete-unaccounted` does"
            )
        return {
            "digest": digest,
            "repository": repo,
            "known": record is not None or bool(own),
            "size": record.size if record else None,
            "imported": record.imported if record else None,
            "released": released or None,
            "retained": bool(reasons),
            "reasons": reasons or ["nothing uses it: the next collection deletes it"],
        }


class _DeleteBatcher:
    """Gathers the storage deletes of concurrent sweeps into few requests (S3 takes 1000 a call).

    Each caller still waits for its own object to be gone before it drops its `deleting` record.
    """

    def __init__(self, delete_many: Callable[[list[str]], Awaitable[None]], *, size: int = _CONCURRENCY) -> None:
        self._delete_many = delete_many
        self._size = size
        self._waiting: list[tuple[str, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def delete(self, key: str) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._waiting.append((key, done))
        if len(self._waiting) >= self._size:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(_BATCH_WAIT, self._flush)
        await done

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._waiting = self._waiting, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _send(self, batch: list[tuple[str, asyncio.Future[None]]]) -> None:
        try:
            await self._delete_many([key for key, _ in batch])
        except Exception as exc:
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for _, done in batch:
            if not done.done():
                done.set_result(None)


def _sibling(manifest_key: str, digest: str) -> str:
    """The key of manifest `digest` in the same repository as `manifest_key`."""
    return manifest_key.rsplit("@", 1)[0] + "@" + digest


def _split_tag(kv: KeyValue) -> tuple[str, str]:
    repo = kv.key[len(keys.TAGS) :].rsplit("@", 1)[0]
    return repo, json.loads(kv.value)["digest"]
