"""Adopting a registry:2 store: its repositories, tags, manifests and layer links become coordinator
records; no blob is copied, moved or deleted.

A node that finds a registry:2 tree and an empty coordinator at first start marks the import pending
(node/store.py); the leader then runs it while the node serves, and `wharf import CONFIG` runs it by
hand. Repositories go one at a time in name order; after each, the import state records it as the
cursor, so an import cut short (SIGKILL, a new leader) resumes after the last whole repository.
Every record is written only where none is yet (`Metadata.adopt`) and every time comes from the
store's own objects, so an import run twice, or resumed, gives exactly what one run gives. Garbage
collection waits until the import is done.

The one exception: an import after `wharf export` wrote the store back for registry:2 (a rollback,
then forward again) takes what registry:2 changed after the export, tags moved and deleted
included (`_since_handover`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from coordinator.metadata import Adoption, BlobRecord, ImportState, LinkRecord, ManifestRecord, TagRecord
from coordinator.runlock import run_lock

from . import manifest as manifests
from .errors import RegistryError
from .services import Services
from .storage import layout, registry2
from .storage.driver import StorageDriver, StoredObject

log = logging.getLogger("wharf.import")

T = TypeVar("T")

_CONCURRENCY = 32
# Larger annotations stay in the manifest bytes, as for pushed manifests.
_LOG_EVERY = 5.0

Progress = Callable[[ImportState], None]


class ImportBusy(Exception):
    """Another process is importing this store right now."""


@dataclass
class Report:
    """What an import (or a dry run of one) found."""

    state: ImportState
    problems: list[registry2.Problem] = field(default_factory=list)
    dry_run: bool = False
    # After a rollback (`wharf export`, then registry:2): tags registry:2 moved or deleted since,
    # moved or deleted here too.
    moved: int = 0
    untagged: int = 0


def _no_progress(state: ImportState) -> None:
    pass


async def run_import(
    services: Services, *, dry_run: bool = False, progress: Progress = _no_progress, again: bool = False
) -> Report:
    """Import every repository not yet imported (all of them with `again`), holding the run lock."""
    metadata = services.metadata
    if dry_run:
        return await scan(services.storage, await metadata.import_state(), progress=progress)
    async with run_lock(services.kv, "import", services.node_id, ttl=services.config.cluster.leasettl, busy=ImportBusy):
        current = await metadata.import_state()
        if current is None or current.state == "done" or again:
            current = ImportState("running", requested=time.time())
        return await scan(services.storage, current, progress=progress, services=services)


async def scan(
    storage: StorageDriver,
    current: ImportState | None,
    *,
    progress: Progress = _no_progress,
    services: Services | None = None,
) -> Report:
    """Import the store's repositories into `services`' coordinator; without `services`, a dry run
    that only reads the storage and says what an import would write."""
    dry_run = services is None
    resuming = current is not None and current.state == "running" and bool(current.cursor)
    state = current or ImportState("running", requested=time.time())
    node = services.node_id if services is not None else ""
    state = dataclasses.replace(state, state="running", node=node, started=state.started or time.time())
    report = Report(state, dry_run=dry_run)
    blobs = await registry2.list_blobs(storage, report.problems)
    names = [name async for name in registry2.repositories(storage, report.problems)]
    state = dataclasses.replace(state, repositories_total=len(names))
    if resuming:
        log.info(
            "resuming the import of a registry:2 store after %s (%d of %d repositories done)",
            state.cursor,
            state.repositories_done,
            len(names),
        )
    if services is not None:
        await services.metadata.set_import_state(state)
    handed_over = await services.metadata.handed_over() if services is not None else None
    logged = time.monotonic()
    for name in names:
        if state.cursor and name <= state.cursor:
            continue
        adoption, problems = await _repository(storage, name, blobs)
        report.problems += problems
        counts = {"tags": len(adoption.tags), "manifests": len(adoption.manifests), "links": len(adoption.links)}
        if services is not None and handed_over is not None:
            await _since_handover(services, adoption, handed_over, report)
        elif services is not None:
            await services.metadata.adopt(adoption)
        state = dataclasses.replace(
            state,
            cursor=name,
            repositories_done=state.repositories_done + 1,
            tags=state.tags + counts["tags"],
            manifests=state.manifests + counts["manifests"],
            links=state.links + counts["links"],
            blobs=state.blobs + len(adoption.blobs),
            problems=state.problems + len(problems),
        )
        if services is not None:
            await services.metadata.set_import_state(state)
            services.metrics.import_repositories.labels("done").set(state.repositories_done)
            services.metrics.import_repositories.labels("total").set(state.repositories_total)
        progress(state)
        if time.monotonic() - logged >= _LOG_EVERY or state.repositories_done == state.repositories_total:
            logged = time.monotonic()
            log.info(
                "import: %d/%d repositories, %d tags, %d manifests",
                state.repositories_done,
                state.repositories_total,
                state.tags,
                state.manifests,
                extra={"fields": dataclasses.asdict(state)},
            )
    state = dataclasses.replace(state, state="done", finished=time.time())
    if services is not None:
        await services.metadata.set_import_state(state)
        await services.metadata.set_handed_over(None)  # registry:2's tree is taken in again
    report.state = state
    for problem in report.problems[:100]:
        log.warning("import: %s: %s %s", problem.key, problem.kind, problem.detail)
    log.info(
        "import %s: %d repositories, %d tags, %d manifests, %d layer links, %d problems; no blob copied or deleted",
        "dry run" if dry_run else "done",
        state.repositories_done,
        state.tags,
        state.manifests,
        state.links,
        len(report.problems),
        extra={"fields": dataclasses.asdict(state)},
    )
    return report


async def _since_handover(services: Services, adoption: Adoption, handed_over: float, report: Report) -> None:
    """Adopt one repository of a store registry:2 served since `wharf export` wrote it (at
    `handed_over`): what registry:2 changed since wins over Wharf's records, what Wharf changed since
    wins over the tree's.

    - A tag whose link registry:2 wrote after the export is taken: a new one is adopted, and one
      Wharf has at another digest is moved there, unless Wharf moved it after the export too.
    - A tag the tree no longer has, which Wharf had at the export (its record is older), was deleted
      through registry:2: it is deleted here (its manifest stays, for GC to judge).
    - A tag the tree has from the export, which Wharf no longer has, was deleted through Wharf after
      the export: it is not adopted again.
    Immutable tags (the `immutability` rules) are never moved or deleted this way: a warning says so.
    """
    repo = adoption.repo
    metadata = services.metadata
    frozen = services.policies.immutability.rule_for
    ours = await metadata.tag_records(repo)
    adoption.tags = {tag: found for tag, found in adoption.tags.items() if tag in ours or found.pushed > handed_over}
    await metadata.adopt(adoption)
    for tag, found in sorted(adoption.tags.items()):
        current = ours.get(tag)
        if current is None or current.digest == found.digest or found.pushed <= handed_over:
            continue
        if (rule := frozen(repo, tag)) is not None:
            log.warning("import: %s:%s moved by registry:2 is immutable here (rule %s): kept", repo, tag, rule)
            continue
        if await metadata.follow_tag(repo, tag, found, unless_newer_than=handed_over):
            report.moved += 1
            log.info("import: %s:%s moved to %s as registry:2 moved it", repo, tag, found.digest)
    for tag, current in sorted(ours.items()):
        if tag in adoption.tree_tags or current.pushed > handed_over:
            continue
        if (rule := frozen(repo, tag)) is not None:
            log.warning("import: %s:%s deleted by registry:2 is immutable here (rule %s): kept", repo, tag, rule)
            continue
        if await metadata.delete_tag(repo, tag) is not None:
            report.untagged += 1
            log.info("import: %s:%s deleted as registry:2 deleted it", repo, tag)


async def _repository(
    storage: StorageDriver, name: str, blobs: dict[str, StoredObject]
) -> tuple[Adoption, list[registry2.Problem]]:
    """One repository's records, from its links and its manifests' bytes."""
    tree = await registry2.read_repository(storage, name, blobs=blobs)
    problems = list(tree.problems)
    adoption = Adoption(name, tree_tags=set(tree.tags))
    revisions = sorted(tree.revisions)
    bodies = await _bounded(storage.read_bytes(layout.blob_key(digest)) for digest in revisions)
    used: set[str] = set()
    for digest, body in zip(revisions, bodies, strict=True):
        record = _manifest_record(name, digest, body, blobs[digest], problems)
        if record is None:
            continue
        adoption.manifests.append(record)
        used.update(record.blobs)
        adoption.blobs[digest] = _blob(blobs[digest], used=True)
    recorded = {m.digest: m for m in adoption.manifests}
    for digest in sorted(tree.layers):
        stored = blobs[digest]
        adoption.links[digest] = LinkRecord(stored.size, stored.modified)
        adoption.blobs[digest] = _blob(stored, used=digest in used)
    # A manifest may name a blob that another repository links, or none: record what is stored.
    for digest in sorted(used - tree.layers):
        if digest in blobs:
            adoption.blobs.setdefault(digest, _blob(blobs[digest], used=True))
    for tag, found in sorted(tree.tags.items()):
        record = recorded.get(found.digest)
        if record is None:
            continue  # its manifest could not be read: reported with the manifest
        adoption.tags[tag] = TagRecord(record.digest, record.media_type, record.size, found.pushed)
    return adoption, problems


def _blob(stored: StoredObject, *, used: bool) -> BlobRecord:
    return BlobRecord(stored.size, stored.key, stored.modified, "used" if used else "unused")


def _manifest_record(
    repo: str, digest: str, body: bytes, stored: StoredObject, problems: list[registry2.Problem]
) -> ManifestRecord | None:
    key = layout.revision_link_key(repo, digest)
    try:
        parsed = manifests.parse_stored(body)
    except RegistryError as exc:
        problems.append(registry2.Problem(key, "unreadable manifest", str(exc.detail)[:300]))
        return None
    actual = "sha256:" + hashlib.sha256(body).hexdigest()
    if actual != digest and parsed.media_type not in manifests.DOCKER_SCHEMA1:
        # Schema1 signed manifests are named by their unsigned payload; others by their bytes.
        problems.append(registry2.Problem(key, "manifest bytes do not match their digest", actual))
        return None
    return manifests.record_of(parsed, digest, len(body), stored.modified)


async def _bounded(calls: Iterable[Awaitable[T]]) -> list[T]:
    gate = asyncio.Semaphore(_CONCURRENCY)

    async def one(call: Awaitable[T]) -> T:
        async with gate:
            return await call

    return list(await asyncio.gather(*(one(call) for call in calls)))


async def import_if_pending(services: Services) -> None:
    """The leader's job: run an import that a first start marked pending, or one cut short."""
    state = await services.metadata.import_state()
    if state is None or state.state not in ("pending", "running"):
        return
    try:
        await run_import(services)
    except ImportBusy as exc:
        log.info("import runs on %s", exc)
