"""Blob touches: a client told a blob exists (a HEAD, a mount, an upload that found it) may link it
soon, so garbage collection must leave it alone for a grace period (DESIGN.md's GC fence)."""

from __future__ import annotations

import time

from coordinator.metadata import Metadata


class Touches:
    """Mark blobs a client was just told exist, at most once per half grace period per node."""

    def __init__(self, metadata: Metadata, grace: float) -> None:
        self._metadata = metadata
        self._half_grace = grace / 2
        self._written: dict[str, float] = {}

    async def touch(self, digest: str) -> None:
        now = time.monotonic()
        last = self._written.get(digest)
        if last is not None and now - last < self._half_grace:
            return
        await self._metadata.touch(digest)
        self._written[digest] = now
        if len(self._written) > 200_000:
            cutoff = now - self._half_grace
            self._written = {d: t for d, t in self._written.items() if t >= cutoff}
