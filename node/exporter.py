"""Writing Wharf's state back as registry:2's repository tree, so Distribution can serve the store.

The rollback path of a migration: `wharf export CONFIG` writes, for every repository in the
coordinator, Distribution's tag links (`current/link` and `index`), manifest revision links and
`_layers` links, and makes sure each blob's bytes are at their content-addressed key (a large S3
upload is committed where it was uploaded: those are copied server-side, and the record then
names the copy). Links already right are not written again; nothing in Distribution's tree is
deleted, so a tag deleted through Wharf after an import still shows in registry:2 until removed
there.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from .services import Services
from .storage import layout, registry2

log = logging.getLogger("wharf.export")


@dataclass
class ExportReport:
    repositories: int = 0
    tags: int = 0
    links_written: int = 0
    links_unchanged: int = 0
    blobs_copied: int = 0
    bytes_copied: int = 0
    missing: list[str] = field(default_factory=list)  # digests whose bytes are nowhere
    dry_run: bool = False


async def run_export(services: Services, *, dry_run: bool = False) -> ExportReport:
    report = ExportReport(dry_run=dry_run)
    metadata, storage = services.metadata, services.storage
    last: str | None = None
    while True:
        page = await metadata.list_repositories(last=last, limit=500)
        for repo in page:
            tags, revisions, layers = await metadata.repository_contents(repo)
            for digest in sorted(set(revisions) | set(layers)):
                await _place(services, digest, report)
            report.repositories += 1
            report.tags += len(tags)
            written = await registry2.write_repository(storage, repo, tags, revisions, layers, dry_run=dry_run)
            report.links_written += written.total
            report.links_unchanged += written.unchanged
        if len(page) < 500:
            break
        last = page[-1]
    if not dry_run:
        # registry:2 may serve the store from now on: the next `wharf serve` says so until an import.
        await metadata.set_handed_over(time.time())
    log.info(
        "export%s: %d repositories, %d tags, %d links written, %d already there, %d blobs copied to their "
        "content-addressed key",
        " (dry run)" if dry_run else "",
        report.repositories,
        report.tags,
        report.links_written,
        report.links_unchanged,
        report.blobs_copied,
    )
    return report


async def _place(services: Services, digest: str, report: ExportReport) -> None:
    """Make sure `digest`'s bytes are at its content-addressed key, where registry:2 looks."""
    record = await services.metadata.get_blob(digest)
    addressed = layout.blob_key(digest)
    if record is None or record.key == addressed:
        if record is None and await services.storage.stat(addressed) is None:
            report.missing.append(digest)
        return
    if await services.storage.stat(addressed) == record.size:
        return
    if report.dry_run:
        if await services.storage.stat(record.key) is None:
            report.missing.append(digest)
            return
        report.blobs_copied += 1
        report.bytes_copied += record.size
        return
    try:
        await services.storage.copy(record.key, addressed)
    except FileNotFoundError:
        # Its bytes are gone (`wharf scrub` says so too): reported, and the export goes on.
        report.missing.append(digest)
        return
    report.blobs_copied += 1
    report.bytes_copied += record.size
    if await services.metadata.move_blob(digest, record.key, addressed):
        # The record names the copy now; the upload-key object is this upload's own, named by nothing.
        await services.storage.delete(record.key)
