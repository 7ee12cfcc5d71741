"""Last-pulled times from one node: each pull noted in memory, written to the coordinator in batches.

A manifest GET costs a dictionary write here. `run` writes what was noted every `interval` (sooner
when very many manifests were pulled), so the coordinator sees at most one write per manifest, node
and interval; what a failed write held is kept and tried again with the next batch.
"""

from __future__ import annotations

import asyncio
import logging
import time

from coordinator.kv import KV
from coordinator.pulls import Pull, Pulls

log = logging.getLogger("wharf.pulls")

# Manifests noted before a batch goes out without waiting for the interval (bounds memory).
_MAX_NOTED = 50_000


class PullRecorder:
    """Notes pulls of (repository, manifest digest) and writes them out in batches."""

    def __init__(self, kv: KV, interval: float) -> None:
        self.pulls = Pulls(kv)
        self.interval = interval
        self._noted: dict[Pull, float] = {}
        self._full = asyncio.Event()

    def record(self, repository: str, digest: str, at: float | None = None) -> None:
        """Note a pull; written with the next batch."""
        self._noted[(repository, digest)] = time.time() if at is None else at
        if len(self._noted) >= _MAX_NOTED:
            self._full.set()

    @property
    def noted(self) -> int:
        return len(self._noted)

    async def flush(self) -> None:
        """Write every pull noted so far; on failure they stay noted (newer pulls of the same win)."""
        if not self._noted:
            return
        batch, self._noted = self._noted, {}
        self._full.clear()
        try:
            left = await self.pulls.write(batch)
        except BaseException:
            self._keep(batch)
            raise
        self._keep(left)

    def _keep(self, batch: dict[Pull, float]) -> None:
        for pull, at in batch.items():
            if at > self._noted.get(pull, 0.0):
                self._noted[pull] = at

    async def run(self) -> None:
        """Write a batch every interval (or once very many manifests are noted), until cancelled."""
        while True:
            try:
                await asyncio.wait_for(self._full.wait(), self.interval)
            except TimeoutError:
                pass
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "could not write last-pulled times (kept for the next batch): %s",
                    exc,
                    extra={"fields": {"noted": self.noted}},
                )
