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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from . import keys, quota
from .gcmark import Mark
from .kv import KV, Compare, Delete, Get, KeyValue, Op, Put, pages, scan
from .metadata import (
    EVERY_HOLDER_CHANGED,
    HOLDING_CHANGED,
    ContentAddress,
    LinkRecord,
    ManifestRecord,
    Metadata,
    Release,
    TagRecord,
    TouchRecord,
    decode,
    decode_blob,
)
from .readonly import Halted
from .replication import RegionSweep

log = logging.getLogger("wharf.gc")

_PAGE = 1000
_CONCURRENCY = 32
# How long a storage delete waits for others to share its request.
_BATCH_WAIT = 0.01
# Deletes retried when only a quota counter moved under them (pushes elsewhere in the scope).
_QUOTA_ATTEMPTS = 10
# A blob's deletion carries its links' deletes (and the quota counters they free) in one
# transaction, which holds at most kv.MAX_TXN_OPS operations: a blob linked from more repositories
# than this sheds its links in batches of this size first.
_LINKS_PER_TXN = 32
# A summary lists this many deleted items at most (it counts them all).
_LISTED = 100_000


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
    candidates: int = 0
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


async def last_run(kv: KV) -> dict[str, Any] | None:
    """The summary of the last collection that was not a dry run (Summary.report()), or None."""
    found = await kv.get(keys.GC_LAST_RUN)
    if found is None:
        return None
    try:
        data = json.loads(found.value)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


async def orphan_sweep_due(kv: KV, interval: float) -> bool:
    """Whether the last sweep of storage for objects no record names is `interval` old (or never ran)."""
    last = await kv.get(keys.GC_ORPHANS_LAST)
    return last is None or json.loads(last.value).get("at", 0) + interval <= time.time()


async def orphan_sweep_done(kv: KV) -> None:
    await kv.put(keys.GC_ORPHANS_LAST, json.dumps({"at": time.time()}).encode())


class Collector:
    def __init__(
        self,
        kv: KV,
        *,
        grace: float,
        delete_untagged: bool = False,
        dry_run: bool = False,
        reclaim_imported: bool = False,
        quotas: quota.QuotaScopes | None = None,
        progress: Progress = _no_progress,
        workdir: str | None = None,
        address: ContentAddress | None = None,
    ) -> None:
        """`address` gives a digest's content address in storage (blob records at it store no key)."""
        self.kv = kv
        self.address = address
        self.grace = grace
        self.delete_untagged = delete_untagged
        self.dry_run = dry_run
        self.reclaim_imported = reclaim_imported
        self.quotas = quotas or quota.QuotaScopes()
        # Where the cycle's mark goes on disk (a temporary directory under it).
        self.workdir = workdir
        self.progress = progress
        self.summary = Summary()
        # Asked before each deletion; False stops the cycle there (Halted): the registry went read-only.
        self.may_delete: Callable[[], bool] = lambda: True
        # With regions: each blob goes from every region's storage, under the same transaction.
        self.regions: RegionSweep | None = None

    def _check_may_delete(self) -> None:
        if not self.may_delete():
            raise Halted("read-only: garbage collection stopped before deleting more")

    async def _all(self, prefix: str) -> list[KeyValue]:
        """Every record under `prefix` (for `explain`, which reads few)."""
        return await scan(self.kv, prefix)

    def _pages(self, prefix: str) -> AsyncIterator[list[KeyValue]]:
        return pages(self.kv, prefix)

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
        *,
        sweep: Callable[[Mark], Awaitable[None]] | None = None,
    ) -> Summary:
        """One whole cycle: untagged manifests (if asked), then blobs, then stale links.

        With `delete_many`, the storage deletes of concurrent sweeps go out together. What the cycle
        reads is kept on disk (coordinator/gcmark.py): its memory does not grow with the registry.
        """
        if delete_many is not None:
            delete_object = _DeleteBatcher(delete_many).delete
        summary = Summary(started=time.time(), dry_run=self.dry_run)
        self.summary = summary  # readable while the cycle runs, for progress reports
        cutoff = summary.started - self.grace
        async with Mark(self.workdir) as mark:
            # Everything written after this revision is read again once the marks are placed.
            since = await self._revision()
            # Repositories before manifests: every manifest push rewrites its repository's record,
            # so an unchanged record later proves no manifest arrived there since this scan.
            async for page in self._pages(keys.REPOSITORIES):
                await mark.add_repositories(page)
            old_releases = await self._load_releases(mark, cutoff)
            async for page in self._pages(keys.MANIFESTS):
                await mark.add_manifests(page)
            async for page in self._pages(keys.TAGS):
                await mark.add_tags(page)
            await self._collect_manifests(mark, cutoff, since, summary)
            await self._collect_blobs(mark, cutoff, since, summary, delete_object)
            if sweep is not None:
                # The storage sweep asks the mark which objects a record names.
                await sweep(mark)
        summary.finished = time.time()
        if not self.dry_run:
            for kv in old_releases:
                await self.kv.txn([Compare.unchanged(kv.key, kv.mod_revision)], [Delete(kv.key)])
            await self.kv.put(keys.GC_LAST_RUN, json.dumps(summary.report() | {"deleted": []}).encode())
        return summary

    async def _load_releases(self, mark: Mark, cutoff: float) -> list[KeyValue]:
        """Releases into the mark; returns those older than the grace, which say nothing more (they go)."""
        old: list[KeyValue] = []
        async for page in self._pages(keys.RELEASED):
            blobs: list[tuple[str, float]] = []
            manifests: list[tuple[str, float]] = []
            for kv in page:
                repo, digest = keys.split_repo_key(kv.key, keys.RELEASED)
                note = decode(Release, kv.value)
                blobs += [(blob, note.at) for blob in [digest, *note.blobs]]
                manifests += [(keys.manifest(repo, child), note.at) for child in note.manifests]
                if note.at < cutoff:
                    old.append(kv)
            await mark.add_releases(blobs, manifests)
        return old

    def _young(self, last_active: float, cutoff: float, released: float) -> bool:
        """Active within the grace, and not only before a release of it (a deleted image's pulls)."""
        return last_active >= cutoff and last_active > released

    def _note_deleted(self, summary: Summary, item: str) -> None:
        if len(summary.deleted) < _LISTED:
            summary.deleted.append(item)

    async def _saved_since(self, since: int) -> tuple[set[str], set[str]]:
        """What manifests written after `since` use: (their digests and blobs, their child manifest keys)."""
        digests: set[str] = set()
        children: set[str] = set()
        async for page in self._pages(keys.MANIFESTS):
            for kv in page:
                if kv.mod_revision <= since:
                    continue
                repo = keys.split_repo_key(kv.key, keys.MANIFESTS)[0]
                record = decode(ManifestRecord, kv.value)
                digests.add(record.digest)
                digests.update(record.blobs)
                children.update(keys.manifest(repo, d) for d in record.manifests)
        return digests, children

    # -- manifests --------------------------------------------------------------------------

    async def _collect_manifests(self, mark: Mark, cutoff: float, since: int, summary: Summary) -> None:
        """Delete manifests nothing keeps (with delete_untagged; referrers of a gone subject always)."""
        await mark.mark_live(cutoff)
        await mark.mark_doomed(self.delete_untagged)
        if self.delete_untagged:
            for size, pushed in await mark.held_young_manifests():
                summary.hold(HELD_YOUNG_MANIFEST, size, pushed + self.grace)
        if self.dry_run:
            after = ""
            while rows := await mark.doomed_after(after, _PAGE):
                summary.manifests_deleted += len(rows)
                for _key, repo, digest, *_ in rows:
                    self._note_deleted(summary, f"{repo}@{digest}")
                after = rows[-1][0]
            return
        after = ""
        while rows := await mark.doomed_after(after, _PAGE):
            candidates = [
                ManifestCandidate(repo, digest, revision, subject) for _k, repo, digest, revision, subject, _p in rows
            ]
            await self._bounded([self._pend_manifest(c) for c in candidates])
            await mark.set_pending([(c.pending_revision, keys.manifest(c.repo, c.digest)) for c in candidates])
            after = rows[-1][0]
        await self._next_epoch()
        # Manifests written since mark began may use a candidate (an index naming a child).
        _, children = await self._saved_since(since)
        if children:
            saved = [key for key in children]
            for key in saved:
                repo, digest = keys.split_repo_key(key, keys.MANIFESTS)
                await self.kv.delete(keys.pending_manifest(repo, digest))
            await mark.set_manifests("doomed", saved, 0)
        after = ""
        while rows := await mark.doomed_after(after, _PAGE, pending=True):
            candidates = [
                ManifestCandidate(repo, digest, revision, subject, pending)
                for _k, repo, digest, revision, subject, pending in rows
            ]
            results = await self._bounded([self._delete_manifest(c) for c in candidates])
            gone = [keys.manifest(c.repo, c.digest) for c, ok in zip(candidates, results, strict=True) if ok]
            await mark.set_manifests("gone", gone)
            summary.manifests_deleted += len(gone)
            for c, ok in zip(candidates, results, strict=True):
                if ok:
                    self._note_deleted(summary, f"{c.repo}@{c.digest}")
            after = rows[-1][0]

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
        ops: list[Op] = [Delete(key), Delete(mark), HOLDING_CHANGED(c.repo, c.digest)]
        if c.subject:
            ops.append(Delete(keys.referrer(c.repo, c.subject, c.digest)))
        guards = [Compare.unchanged(key, c.revision), Compare.unchanged(mark, c.pending_revision)]
        # A tag moved onto it since mark makes it live again.
        if await Metadata(self.kv, address=self.address).tags_of_digest(c.repo, c.digest):
            await self.kv.delete(mark)
            return False
        result = await self.kv.txn(guards, ops)
        if not result.succeeded:
            await self.kv.txn([Compare.unchanged(mark, c.pending_revision)], [Delete(mark)])
        return result.succeeded

    # -- blobs ----------------------------------------------------------------------------

    async def _collect_blobs(
        self,
        mark: Mark,
        cutoff: float,
        since: int,
        summary: Summary,
        delete_object: Callable[[str], Awaitable[None]],
    ) -> None:
        summary.manifests_seen = await mark.mark_used(dry_run=self.dry_run, now=time.time())
        self.progress("mark", summary.manifests_seen, summary.manifests_seen)
        # Counters first: one unchanged after the scan proves no link under its scope moved meanwhile.
        counters = {} if self.dry_run else {s: await quota.counter(self.kv, s) for s in self.quotas.scopes}
        async for page in self._pages(keys.LINKS):
            await mark.add_links(page)
        await self._repair_counters(mark, counters)
        async for page in self._pages(keys.TOUCHES):
            await mark.add_touches(page)
        async for page in self._pages(keys.BLOBS):
            await self._judge_blobs(mark, page, cutoff, summary)
        self.progress("candidates", summary.candidates, summary.blobs_seen)
        if self.dry_run:
            after = ""
            while rows := await mark.candidates_after(after, _PAGE, "1 = 1"):
                summary.blobs_deleted += len(rows)
                summary.bytes_freed += sum(row[1] for row in rows)
                for row in rows:
                    self._note_deleted(summary, row[0])
                after = rows[-1][0]
            return
        after = ""
        while rows := await mark.candidates_after(after, _PAGE, "1 = 1"):
            candidates = [Candidate(d, size, key, blob_rev, touch_rev) for d, size, key, blob_rev, touch_rev, _ in rows]
            await self._bounded([self._pend_blob(c) for c in candidates])
            await mark.update_candidates("pending_revision", [(c.pending_revision, c.digest) for c in candidates])
            after = rows[-1][0]
        await self._next_epoch()
        # A manifest written between mark and the pending marks did not see them: rescan.
        saved, _ = await self._saved_since(since)
        after = ""
        while rows := await mark.candidates_after(after, _PAGE, "pending_revision > 0"):
            rescued = [row for row in rows if row[0] in saved]
            for digest, *_rest, pending in rescued:
                await self.kv.txn(
                    [Compare.unchanged(keys.pending_blob(digest), pending)], [Delete(keys.pending_blob(digest))]
                )
            await mark.update_candidates("saved", [(1, row[0]) for row in rescued])
            after = rows[-1][0]
        done = 0
        after = ""
        while rows := await mark.candidates_after(after, _PAGE, "pending_revision > 0 AND saved = 0"):
            links = await mark.links_of([row[0] for row in rows])
            candidates = [
                Candidate(d, size, key, blob_rev, touch_rev, links.get(d, {}), pending)
                for d, size, key, blob_rev, touch_rev, pending in rows
            ]

            async def collect(c: Candidate) -> bool:
                nonlocal done
                deleted = await self._delete_blob(c, delete_object)
                done += 1
                self.progress("sweep", done, summary.candidates)
                return deleted

            results = await self._bounded([collect(c) for c in candidates])
            await mark.update_candidates(
                "deleted", [(1, c.digest) for c, ok in zip(candidates, results, strict=True) if ok]
            )
            for c, deleted in zip(candidates, results, strict=True):
                if deleted:
                    summary.blobs_deleted += 1
                    summary.bytes_freed += c.size
                    self._note_deleted(summary, c.digest)
                else:
                    summary.blobs_saved_by_pushes += 1
                    summary.hold(HELD_PUSHED, c.size)
            after = rows[-1][0]
        await self._collect_links(mark, cutoff, summary)

    async def _judge_blobs(self, mark: Mark, page: list[KeyValue], cutoff: float, summary: Summary) -> None:
        """Which blobs of a page nothing uses and nothing holds back: candidates, kept in the mark."""
        digests = [kv.key[len(keys.BLOBS) :] for kv in page]
        facts = await mark.blob_facts(digests)
        candidates: list[tuple[str, int, str, int, int]] = []
        imported: list[str] = []
        records = [decode_blob(digest, kv.value, self.address) for digest, kv in zip(digests, page, strict=True)]
        await mark.add_recorded([(digest, record.key) for digest, record in zip(digests, records, strict=True)])
        for digest, kv, record in zip(digests, page, records, strict=True):
            used, last_active, released, touch_revision = facts[digest]
            if used:
                continue
            active = max(record.created, last_active)
            if self._young(active, cutoff, released):
                summary.hold(HELD_YOUNG, record.size, active + self.grace)
                continue
            if record.imported == "unused" and not self.reclaim_imported:
                summary.hold(HELD_IMPORTED, record.size)
                imported.append(digest)
                continue
            candidates.append((digest, record.size, record.key, kv.mod_revision, touch_revision))
        summary.blobs_seen += len(page)
        summary.candidates += len(candidates)
        summary.reclaimable_bytes += sum(c[1] for c in candidates)
        await mark.add_candidates(candidates)
        # Links of adopted blobs that GC keeps stay too: registry:2 served them, so does Wharf.
        await mark.keep_imported(imported)

    async def _repair_counters(self, mark: Mark, counters: dict[quota.QuotaScope, tuple[int, int]]) -> None:
        """Set every quota counter that drifted from its links (an adopted store, a crash) right."""
        for scope, (used, revision) in counters.items():
            if scope.namespace:
                exact = await mark.scope_usage(None, scope.name)
            else:
                exact = await mark.scope_usage(scope.name, None)
            if exact != used and await quota.repair(self.kv, scope, exact, revision):
                log.info(
                    "quota %s: counted %d bytes, its links hold %d: repaired",
                    scope.label,
                    used,
                    exact,
                    extra={"fields": {"quota": scope.name, "counted": used, "exact": exact}},
                )

    async def _collect_links(self, mark: Mark, cutoff: float, summary: Summary) -> None:
        """Unlink blobs that no manifest of their repository uses (they still live elsewhere).

        Quotas count what a repository links, so this is what makes deleting images lower its
        usage. A link goes only if its repository saw no manifest push since the scan.
        """
        after = ""
        first = True
        while rows := await mark.stale_links_after(after, _PAGE, cutoff):
            after = rows[-1][0]
            if self.dry_run:
                summary.links_deleted += len(rows)
                continue
            if first:
                await self._next_epoch()
                first = False
            sizes = await mark.link_sizes([row[0] for row in rows])
            results = await self._bounded([self._unlink(*row, sizes.get(row[0], 0)) for row in rows])
            summary.links_deleted += sum(1 for ok in results if ok)

    async def _unlink(
        self, link_key: str, repo: str, digest: str, revision: int, touch_revision: int, repo_revision: int, size: int
    ) -> bool:
        self._check_may_delete()
        guards = [
            Compare.unchanged(keys.repository(repo), repo_revision),
            Compare.unchanged(link_key, revision),
            Compare.unchanged(keys.touch(digest), touch_revision),
        ]
        freed = quota.freed_by([(repo, size)], self.quotas)
        for _ in range(_QUOTA_ATTEMPTS):
            counters, releases = await quota.release(self.kv, freed)
            result = await self.kv.txn(
                [*guards, *counters],
                [Delete(link_key), HOLDING_CHANGED(repo, digest), *releases],
                [Get(g.key) for g in guards],
            )
            if result.succeeded:
                return True
            now = [kv.mod_revision if kv else 0 for kv in result.gets]
            if now != [g.operand for g in guards] or not freed:
                return False
        return False

    async def _pend_blob(self, c: Candidate) -> None:
        result = await self.kv.txn(
            [Compare.unchanged(keys.blob(c.digest), c.blob_revision)],
            [Put(keys.pending_blob(c.digest), json.dumps({"at": time.time()}).encode())],
        )
        if result.succeeded:
            c.pending_revision = result.revision

    async def _shed_links(self, c: Candidate) -> bool:
        """Unlink a blob linked from more repositories than its deletion's transaction holds, a batch
        at a time, each batch under the guards of the deletion itself (its pending mark, record and
        touch unchanged since mark: nothing used it since); False, keeping the rest, when one moved."""
        mark = keys.pending_blob(c.digest)
        held = {mark: c.pending_revision, keys.blob(c.digest): c.blob_revision, keys.touch(c.digest): c.touch_revision}
        while len(c.links) > _LINKS_PER_TXN:
            self._check_may_delete()
            batch = dict(list(c.links.items())[:_LINKS_PER_TXN])
            expected = {**held, **batch}
            freed = quota.freed_by(((keys.split_repo_key(link, keys.LINKS)[0], c.size) for link in batch), self.quotas)
            for _ in range(_QUOTA_ATTEMPTS):
                counters, releases = await quota.release(self.kv, freed)
                result = await self.kv.txn(
                    [*(Compare.unchanged(key, revision) for key, revision in expected.items()), *counters],
                    [*(Delete(link) for link in batch), EVERY_HOLDER_CHANGED(c.digest), *releases],
                    [Get(key) for key in expected],
                )
                if result.succeeded:
                    break
                now = {key: kv.mod_revision if kv else 0 for key, kv in zip(expected, result.gets, strict=True)}
                if now != expected or not freed:
                    return False
            else:
                return False
            for link in batch:
                del c.links[link]
        return True

    async def _delete_blob(self, c: Candidate, delete_object: Callable[[str], Awaitable[None]]) -> bool:
        self._check_may_delete()
        mark = keys.pending_blob(c.digest)
        if not await self._shed_links(c):
            await self.kv.txn([Compare.unchanged(mark, c.pending_revision)], [Delete(mark)])
            return False
        # No region may be copying it, nor have recorded a copy since these were read.
        fence = await self.regions.fence(c.digest) if self.regions is not None else None
        expected = {
            mark: c.pending_revision,
            keys.blob(c.digest): c.blob_revision,
            keys.touch(c.digest): c.touch_revision,
            **c.links,
            **(fence.expected if fence is not None else {}),
        }
        deleting = keys.deleting(c.digest)
        ops: list[Op] = [
            Delete(mark),
            Delete(keys.blob(c.digest)),
            Delete(keys.touch(c.digest)),
            *(Delete(link) for link in c.links),
            Put(deleting, json.dumps({"key": c.storage_key, "at": time.time()}).encode()),
            EVERY_HOLDER_CHANGED(c.digest),
            *(fence.ops if fence is not None else []),
        ]
        # The links' bytes leave the quotas that counted them, in the same transaction.
        freed = quota.freed_by(((keys.split_repo_key(link, keys.LINKS)[0], c.size) for link in c.links), self.quotas)
        for _ in range(_QUOTA_ATTEMPTS):
            counters, releases = await quota.release(self.kv, freed)
            guards = [Compare.unchanged(key, revision) for key, revision in expected.items()]
            result = await self.kv.txn([*guards, *counters], [*ops, *releases], [Get(key) for key in expected])
            if result.succeeded:
                break
            now = {key: kv.mod_revision if kv else 0 for key, kv in zip(expected, result.gets, strict=True)}
            if now != expected or not freed:
                # Something used or touched it since mark: it stays; drop our mark if still ours.
                await self.kv.txn([Compare.unchanged(mark, c.pending_revision)], [Delete(mark)])
                return False
            # Only a quota counter moved (a push elsewhere under the same scope): count again.
        else:
            await self.kv.txn([Compare.unchanged(mark, c.pending_revision)], [Delete(mark)])
            return False
        try:
            if fence is not None and fence.copies:
                assert self.regions is not None
                await self.regions.delete(fence.copies)
            else:
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

        # Every started call ends before an error (a Halted) goes up: a deletion under way finishes,
        # so its record and its bytes go together.
        results = await asyncio.gather(*(one(c) for c in calls), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results

    # -- orphans ----------------------------------------------------------------------------

    # -- explain ----------------------------------------------------------------------------

    async def explain(self, repo: str | None, digest: str) -> dict[str, Any]:
        """Why `digest` is kept (tags, manifests, referrers that use it) or when it may go."""
        now = time.time()
        users: list[str] = []
        own: list[str] = []
        tagged: list[str] = []
        # Streamed a page at a time, keeping only what names `digest`.
        async for page in self._pages(keys.MANIFESTS):
            for kv in page:
                manifest = decode(ManifestRecord, kv.value)
                if digest in manifest.blobs or digest in manifest.manifests:
                    users.append(kv.key[len(keys.MANIFESTS) :])
                if manifest.digest == digest:
                    own.append(kv.key[len(keys.MANIFESTS) :])
        async for page in self._pages(keys.TAGS):
            for kv in page:
                if decode(TagRecord, kv.value).digest == digest:
                    repo, tag = keys.split_repo_key(kv.key, keys.TAGS)
                    tagged.append(f"{repo}:{tag}")
        blob = await self.kv.get(keys.blob(digest))
        touch = await self.kv.get(keys.touch(digest))
        released = 0.0
        async for page in self._pages(keys.RELEASED):
            for kv in page:
                note = decode(Release, kv.value)
                if digest == keys.split_repo_key(kv.key, keys.RELEASED)[1] or digest in note.blobs:
                    released = max(released, note.at)
        record = decode_blob(digest, blob.value, self.address) if blob is not None else None
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
        async for page in self._pages(keys.LINKS):
            for link in page:
                if link.key.endswith("@" + digest):
                    active = max(active, decode(LinkRecord, link.value).linked)
        if touch is not None:
            active = max(active, decode(TouchRecord, touch.value).at)
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
