"""When each manifest was last pulled: one record per (repository, manifest digest), written in batches.

Nodes do not write on every pull. Each keeps in memory the newest time it served each manifest and
writes them out together at most once an interval (node/pulls.py). A batch reads the stored times in
one request and, in one transaction, writes only those it moves forward, so a thousand pulls of a few
images cost two coordinator requests per node and interval. A stored time never moves back: each write
compares the record with what the read found, and reads again if another node wrote it meanwhile.

Every batch also rewrites the version record of each repository whose times it moved, so a node
holding a repository's times in memory learns with one point read whether they are still current.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass

from . import keys
from .kv import KV, Compare, Delete, Get, Op, Put, pages

# Records per transaction: their puts and one version put per repository stay within etcd's 128.
_BATCH = 60
_READ_BATCH = 100
# Repositories whose two versions one read asks (two gets each, within a transaction's 128 operations).
_VERSIONS_PER_READ = 60
# Reads and writes again this often when other nodes keep writing the same records.
_ATTEMPTS = 5


@dataclass(frozen=True)
class PullRecord:
    """When a manifest was last pulled (seconds since the epoch)."""

    at: float

    def encode(self) -> bytes:
        return json.dumps({"at": self.at}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> PullRecord:
        return cls(float(json.loads(raw)["at"]))


Pull = tuple[str, str]
"""(repository, manifest digest)."""


class Pulls:
    """Last-pulled times in the coordinator: written in batches, read by manifest or by repository."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv

    async def write(self, seen: Mapping[Pull, float]) -> dict[Pull, float]:
        """Move the stored time of each pull forward to `seen`'s (never back).

        Returns what could not be written because other writers kept winning (to be tried again).
        """
        items = sorted(seen.items())
        left: dict[Pull, float] = {}
        for start in range(0, len(items), _BATCH):
            left.update(await self._write_batch(dict(items[start : start + _BATCH])))
        return left

    async def _write_batch(self, pending: dict[Pull, float]) -> dict[Pull, float]:
        for _ in range(_ATTEMPTS):
            pairs = list(pending)
            found = (await self.kv.txn([], [Get(keys.pulled(repo, digest)) for repo, digest in pairs])).gets
            compares: list[Compare] = []
            ops: list[Op] = []
            repositories: set[str] = set()
            for (repo, digest), stored in zip(pairs, found, strict=True):
                at = pending[(repo, digest)]
                if stored is not None and PullRecord.decode(stored.value).at >= at:
                    del pending[(repo, digest)]
                    continue
                key = keys.pulled(repo, digest)
                compares.append(Compare.unchanged(key, stored.mod_revision if stored is not None else 0))
                ops.append(Put(key, PullRecord(at).encode()))
                repositories.add(repo)
            if not ops:
                return {}
            ops += [Put(keys.pulled_version(repo), b"") for repo in sorted(repositories)]
            if (await self.kv.txn(compares, ops)).succeeded:
                return {}
        return pending

    async def last_pulled(self, repo: str, digests: Iterable[str]) -> dict[str, float]:
        """When each of `digests` (manifests of `repo`) was last pulled; absent if never (as far as recorded)."""
        wanted = list(dict.fromkeys(digests))
        found: dict[str, float] = {}
        for start in range(0, len(wanted), _READ_BATCH):
            batch = wanted[start : start + _READ_BATCH]
            result = await self.kv.txn([], [Get(keys.pulled(repo, d)) for d in batch])
            for digest, kv in zip(batch, result.gets, strict=True):
                if kv is not None:
                    found[digest] = PullRecord.decode(kv.value).at
        return found

    async def of_repository(self, repo: str) -> dict[str, float]:
        """Every recorded last-pulled time of `repo`, by manifest digest."""
        prefix = keys.pulled_of(repo)
        found: dict[str, float] = {}
        async for page in pages(self.kv, prefix):
            for kv in page:
                found[kv.key[len(prefix) :]] = PullRecord.decode(kv.value).at
        return found

    async def version(self, repo: str) -> int:
        """The revision of the last batch that moved `repo`'s times (0: none yet)."""
        found = await self.kv.get(keys.pulled_version(repo))
        return found.mod_revision if found is not None else 0

    async def versions(self, repo: str) -> tuple[int, int]:
        """(tag version, last-pulled version) of `repo` in one read: what a node holding a copy of
        its tags with their last-pulled times checks (0: no record, nothing may be kept)."""
        result = await self.kv.txn([], [Get(keys.tag_version(repo)), Get(keys.pulled_version(repo))])
        tags, pulled = result.gets
        return (tags.mod_revision if tags else 0), (pulled.mod_revision if pulled else 0)

    async def versions_of(self, repos: Sequence[str]) -> dict[str, tuple[int, int]]:
        """`versions` of several repositories, in a few reads."""
        found: dict[str, tuple[int, int]] = {}
        for start in range(0, len(repos), _VERSIONS_PER_READ):
            batch = list(repos[start : start + _VERSIONS_PER_READ])
            ops: list[Op] = []
            for repo in batch:
                ops += [Get(keys.tag_version(repo)), Get(keys.pulled_version(repo))]
            gets = (await self.kv.txn([], ops)).gets
            for i, repo in enumerate(batch):
                tags, pulled = gets[2 * i], gets[2 * i + 1]
                found[repo] = (tags.mod_revision if tags else 0), (pulled.mod_revision if pulled else 0)
        return found

    async def every(self) -> AsyncIterator[tuple[str, str, float]]:
        """(repository, digest, last pulled) of every record, a page at a time, in key order."""
        async for page in pages(self.kv, keys.PULLED):
            for kv in page:
                repo, digest = keys.split_repo_key(kv.key, keys.PULLED)
                yield repo, digest, PullRecord.decode(kv.value).at


def forget(repo: str) -> list[Op]:
    """The ops that drop every last-pulled time of `repo` (with the repository's own records)."""
    return [Delete(keys.pulled_of(repo), prefix=True), Delete(keys.pulled_version(repo))]
