"""Applying a retention plan: guarded deletes, a progress record while it runs, a summary when done.

Applying never trusts the plan blindly: a tag goes only if it is unchanged since planning, a manifest
only if it is unchanged, still untagged and nothing that stays uses it (the garbage collector's
pending marks make a concurrent push win). Every step is idempotent, so a new leader that plans
again from the current state finishes an interrupted run without deleting anything twice.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import keys
from .kv import KV, Compare, Delete, Get, Op, Put, scan
from .metadata import HOLDING_CHANGED, TAGS_CHANGED, ManifestRecord, TagRecord, decode, release
from .readonly import Halted
from .retention import Decision, ManifestDeletion, Plan, TagDeletion, short
from .spool import Spool

LAST_RUN = keys.RETENTION_LAST_RUN
PROGRESS = keys.RETENTION_PROGRESS

_PROGRESS_EVERY = 100


async def last_run(kv: KV) -> dict[str, Any] | None:
    """The summary of the last retention run that finished (Result.summary()), or None; with
    `interrupted` set when a later run was cut short."""
    found = await kv.get(LAST_RUN)
    progress = await kv.get(PROGRESS)
    if found is None and progress is None:
        return None
    data: dict[str, Any] = {}
    if found is not None:
        try:
            loaded = json.loads(found.value)
        except ValueError:
            loaded = None
        data = loaded if isinstance(loaded, dict) else {}
    data["interrupted"] = progress is not None
    return data


@dataclass(frozen=True)
class Skipped:
    repository: str
    reference: str
    why: str


@dataclass
class Result:
    """What one application of a plan did (its lists are Spools, like the plan's)."""

    node: str
    started: float = 0.0
    finished: float = 0.0
    planned: int = 0
    tags_deleted: Spool[TagDeletion] = field(default_factory=lambda: Spool(TagDeletion))
    manifests_deleted: Spool[ManifestDeletion] = field(default_factory=lambda: Spool(ManifestDeletion))
    skipped: Spool[Skipped] = field(default_factory=lambda: Spool(Skipped))
    # The progress record of a run that never finished (its leader went away), if one was found.
    interrupted: dict[str, Any] | None = None

    def each_row(self) -> Iterator[dict[str, str]]:
        for t in self.tags_deleted:
            yield t.row()
        for m in self.manifests_deleted:
            yield m.row()

    def rows(self) -> list[dict[str, str]]:
        """Every row (each_row for a run that may be large)."""
        return list(self.each_row())

    def summary(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "started": self.started,
            "finished": self.finished,
            "planned": self.planned,
            "tags_deleted": len(self.tags_deleted),
            "manifests_deleted": len(self.manifests_deleted),
            "skipped": len(self.skipped),
            "resumed_interrupted_run": self.interrupted is not None,
        }


class Applier:
    """Apply a plan with compare-and-swap guards, recording progress and a summary in the KV."""

    def __init__(self, kv: KV, *, node: str, progress: Callable[[int, int], None] | None = None) -> None:
        self.kv = kv
        self.node = node
        self.progress = progress
        # Asked before each deletion; False stops the run there (Halted): the registry went read-only.
        self.may_delete: Callable[[], bool] = lambda: True
        self._done = 0  # deletions attempted in this run
        self._recorded = 0  # the `done` of the last progress record

    def _check_may_delete(self) -> None:
        if not self.may_delete():
            raise Halted("read-only: retention stopped before deleting more")

    async def apply(self, plan: Plan) -> Result:
        """Apply a plan made beforehand (what a plan names since gone or changed is skipped)."""
        result = await self._begin(len(plan.tags) + len(plan.manifests))
        await self._apply(plan.tags, plan.manifests, result)
        return await self._finish(result)

    async def apply_each(self, decisions: AsyncIterable[Decision], planned: Plan | None = None) -> Result:
        """Apply each repository's decision as it comes (memory stays one repository deep), adding
        it to `planned` first when given."""
        result = await self._begin(0)
        async for decision in decisions:
            if planned is not None:
                planned.add(decision)
            result.planned += len(decision.tags) + len(decision.manifests)
            await self._apply(decision.tags, decision.manifests, result)
        return await self._finish(result)

    async def _begin(self, planned: int) -> Result:
        result = Result(node=self.node, started=time.time(), planned=planned)
        self._done = 0
        previous = await self.kv.get(PROGRESS)
        if previous is not None:
            result.interrupted = json.loads(previous.value)
        await self._record_progress(result, 0)
        return result

    async def _apply(self, tags: Iterable[TagDeletion], manifests: Iterable[ManifestDeletion], result: Result) -> None:
        """Tags first, then manifests one repository at a time (a plan keeps each one's together)."""
        for tag in tags:
            await self._delete_tag(tag, result)
            self._done += 1
            await self._step(result)
        for name, group in itertools.groupby(manifests, key=lambda m: m.repository):
            planned = list(group)
            await self._delete_manifests(name, planned, result)
            self._done += len(planned)
            await self._step(result)

    async def _finish(self, result: Result) -> Result:
        result.finished = time.time()
        await self.kv.txn([], [Put(LAST_RUN, json.dumps(result.summary()).encode()), Delete(PROGRESS)])
        return result

    async def _step(self, result: Result) -> None:
        done = self._done
        if self.progress is not None:
            self.progress(done, result.planned)
        if done // _PROGRESS_EVERY > self._recorded // _PROGRESS_EVERY:
            await self._record_progress(result, done)

    async def _record_progress(self, result: Result, done: int) -> None:
        self._recorded = done
        record = {"node": self.node, "started": result.started, "planned": result.planned, "done": done}
        await self.kv.put(PROGRESS, json.dumps(record).encode())

    async def _delete_tag(self, tag: TagDeletion, result: Result) -> None:
        self._check_may_delete()
        key = keys.tag(tag.repository, tag.tag)
        ops: list[Op] = [
            Delete(key),
            Delete(keys.tagged(tag.repository, tag.digest, tag.tag)),
            TAGS_CHANGED(tag.repository),
            release(tag.repository, tag.digest, manifests=[tag.digest]),
        ]
        outcome = await self.kv.txn([Compare.unchanged(key, tag.mod_revision)], ops, [Get(key)])
        if outcome.succeeded:
            result.tags_deleted.append(tag)
            return
        current = outcome.gets[0]
        if current is None:
            why = "already deleted"
        else:
            why = f"pushed again since planning (now {short(decode(TagRecord, current.value).digest)})"
        result.skipped.append(Skipped(tag.repository, tag.tag, why))

    async def _delete_manifests(self, repo: str, planned: list[ManifestDeletion], result: Result) -> None:
        """Mark, re-read what uses them, then delete parents and subjects before what they use."""
        self._check_may_delete()
        marks: dict[str, int] = {}
        for m in planned:
            key = keys.manifest(repo, m.digest)
            outcome = await self.kv.txn(
                [Compare.unchanged(key, m.mod_revision)],
                [
                    Put(
                        keys.pending_manifest(repo, m.digest),
                        json.dumps({"at": time.time(), "by": "retention"}).encode(),
                    )
                ],
                [Get(key)],
            )
            if outcome.succeeded:
                marks[m.digest] = outcome.revision
            else:
                why = "already deleted" if outcome.gets[0] is None else "pushed or tagged again since planning"
                result.skipped.append(Skipped(repo, m.digest, why))
        if not marks:
            return
        # From here on a push that tags or uses a marked manifest removes the mark (the push wins);
        # what was written before the marks is seen by this re-read. An index too large for one
        # transaction claims its children first and commits under the GC epoch: moving it fails
        # such a commit that claimed before our marks, so it claims again (and removes them).
        await self.kv.put(keys.GC_EPOCH, json.dumps({"at": time.time(), "by": "retention"}).encode())
        tagged = {decode(TagRecord, kv.value).digest for kv in await scan(self.kv, keys.tags_of(repo))}
        present: set[str] = set()
        parents: dict[str, set[str]] = {}
        for kv in await scan(self.kv, keys.manifests_of(repo)):
            record = decode(ManifestRecord, kv.value)
            present.add(record.digest)
            for child in record.manifests:
                parents.setdefault(child, set()).add(record.digest)
        deleted: set[str] = set()
        for m in planned:
            if m.digest not in marks:
                continue
            mark = keys.pending_manifest(repo, m.digest)
            staying_parents = sorted(parents.get(m.digest, set()) - deleted)
            if m.digest in tagged:
                why = "tagged again since planning"
            elif staying_parents:
                why = f"used by index {short(staying_parents[0])}, which stays"
            elif m.subject and m.subject in present and m.subject not in deleted:
                why = f"its subject {short(m.subject)} stays"
            else:
                why = ""
            if not why:
                ops: list[Op] = [Delete(keys.manifest(repo, m.digest)), Delete(mark), HOLDING_CHANGED(repo, m.digest)]
                if m.subject:
                    ops.append(Delete(keys.referrer(repo, m.subject, m.digest)))
                guards = [
                    Compare.unchanged(keys.manifest(repo, m.digest), m.mod_revision),
                    Compare.unchanged(mark, marks[m.digest]),
                ]
                if (await self.kv.txn(guards, ops)).succeeded:
                    deleted.add(m.digest)
                    result.manifests_deleted.append(m)
                    continue
                why = "used by a push since planning"
            await self.kv.txn([Compare.unchanged(mark, marks[m.digest])], [Delete(mark)])
            result.skipped.append(Skipped(repo, m.digest, why))
