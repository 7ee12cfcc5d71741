"""Checking stored bytes against their digests: `wharf scrub` finds bit rot and hand-edited files.

Every recorded blob is read back and hashed. One whose bytes do not match (or are gone, or have
another size) is marked corrupt in its blob record and in every repository's link to it: from then
on the registry answers BLOB_UNKNOWN for it instead of serving it, so clients upload it again, and
that upload replaces the bad bytes. Manifests are also checked on every read from storage
(node/api/manifests.py), so a bad manifest is never served either. Nothing is deleted here.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

from .services import Services

log = logging.getLogger("wharf.scrub")


@dataclass
class ScrubReport:
    checked: int = 0
    bytes_read: int = 0
    corrupt: list[dict[str, object]] = field(default_factory=list)
    dry_run: bool = False


async def run_scrub(services: Services, *, dry_run: bool = False) -> ScrubReport:
    report = ScrubReport(dry_run=dry_run)
    bad: dict[str, str] = {}
    async for digest, record in services.metadata.blob_records():
        if record.corrupt:
            continue
        algorithm = digest.split(":", 1)[0]
        hasher = hashlib.new(algorithm)
        size = 0
        try:
            async for chunk in services.storage.read(record.key):
                hasher.update(chunk)
                size += len(chunk)
            problem = None if f"{algorithm}:{hasher.hexdigest()}" == digest and size == record.size else "mismatch"
        except FileNotFoundError:
            problem = "missing"
        report.checked += 1
        report.bytes_read += size
        if problem is not None:
            bad[digest] = problem
            report.corrupt.append({"digest": digest, "key": record.key, "problem": problem, "size": size})
    if bad and not dry_run:
        links = await services.metadata.links_by_digest(set(bad))
        for digest, problem in bad.items():
            await services.metadata.mark_corrupt(digest, links.get(digest, []))
            services.metrics.storage_corrupt.labels("blob").inc()
            log.error(
                "blob %s: stored bytes %s; no longer served, the next push of it repairs it",
                digest,
                "are gone" if problem == "missing" else "do not match the digest",
                extra={"fields": {"digest": digest, "problem": problem, "repositories": len(links.get(digest, []))}},
            )
    return report
