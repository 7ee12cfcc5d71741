"""Byte quotas on what repositories link, enforced atomically across nodes, at O(1) per admission.

Each scope has a counter record holding the bytes its links take (`{"v": 2, "used": N}`). Every
transaction that makes a link under a scope compares the counter's revision and writes it
increased, and every one that removes a link writes it decreased: two nodes that both saw room for
one more blob cannot both commit, the second reads the counter again and decides again. So a
quota is never overshot whatever the concurrency, and an admission reads one record per scope,
however many links the scope holds. A counter that does not exist yet (a scope newly configured,
or a store from before counters) is counted from the links once; garbage collection compares
every counter with the links it scans and repairs one that drifted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from . import keys
from .kv import KV, Compare, KeyValue, Put, pages

_VERSION = 2


@dataclass(frozen=True)
class QuotaScope:
    """A repository (`name`, exact) or a namespace (`name` ends with '/', every repository under it)."""

    name: str
    limit: int
    label: str

    @property
    def namespace(self) -> bool:
        return self.name.endswith("/")

    def links_prefix(self) -> str:
        return keys.LINKS + self.name if self.namespace else keys.links_of(self.name)

    def guard_key(self) -> str:
        return keys.quota_guard(self.name)

    def covers(self, repository: str) -> bool:
        return repository.startswith(self.name) if self.namespace else repository == self.name


class QuotaExceeded(Exception):
    def __init__(self, scope: QuotaScope, usage: int, size: int) -> None:
        super().__init__(f"quota of {scope.label} exceeded: {usage} of {scope.limit} bytes used, {size} more asked")
        self.scope = scope
        self.usage = usage
        self.size = size


def counted(found: KeyValue | None) -> int | None:
    """The bytes a counter record holds, or None when it is not a counter (yet)."""
    if found is None:
        return None
    data = json.loads(found.value)
    return int(data["used"]) if data.get("v") == _VERSION else None


def _record(used: int) -> bytes:
    return json.dumps({"v": _VERSION, "used": max(used, 0)}).encode()


async def scan_usage(kv: KV, scope: QuotaScope) -> int:
    """The bytes a scope's links take, by reading every one of them (for counters that start)."""
    total = 0
    async for page in pages(kv, scope.links_prefix()):
        total += sum(json.loads(item.value)["size"] for item in page)
    return total


async def counter(kv: KV, scope: QuotaScope) -> tuple[int, int]:
    """(bytes used, the counter's revision), starting the counter from the links if it has none."""
    while True:
        found = await kv.get(scope.guard_key())
        used = counted(found)
        if found is not None and used is not None:
            return used, found.mod_revision
        used = await scan_usage(kv, scope)
        revision = found.mod_revision if found is not None else 0
        # Only if no link moved meanwhile: every link write rewrites this record.
        started = await kv.txn(
            [Compare.unchanged(scope.guard_key(), revision)], [Put(scope.guard_key(), _record(used))]
        )
        if started.succeeded:
            return used, started.revision


async def usage(kv: KV, scope: QuotaScope) -> int:
    return (await counter(kv, scope))[0]


async def admit(kv: KV, scopes: list[QuotaScope], size: int) -> tuple[list[Compare], list[Put]]:
    """Guards and counter writes for a transaction that adds `size` linked bytes to every scope.

    Raises QuotaExceeded if a scope has no room.
    """
    compares: list[Compare] = []
    writes: list[Put] = []
    for scope in scopes:
        used, revision = await counter(kv, scope)
        if used + size > scope.limit:
            raise QuotaExceeded(scope, used, size)
        compares.append(Compare.unchanged(scope.guard_key(), revision))
        writes.append(Put(scope.guard_key(), _record(used + size)))
    return compares, writes


async def release(kv: KV, freed: dict[QuotaScope, int]) -> tuple[list[Compare], list[Put]]:
    """Guards and counter writes for a transaction that removes links of `freed[scope]` bytes."""
    compares: list[Compare] = []
    writes: list[Put] = []
    for scope, size in freed.items():
        if size <= 0:
            continue
        used, revision = await counter(kv, scope)
        compares.append(Compare.unchanged(scope.guard_key(), revision))
        writes.append(Put(scope.guard_key(), _record(used - size)))
    return compares, writes


def freed_by(links: Iterable[tuple[str, int]], scopes_of: QuotaScopes) -> dict[QuotaScope, int]:
    """Bytes per scope that removing `links` ((repository, size) pairs) frees."""
    freed: dict[QuotaScope, int] = {}
    for repository, size in links:
        for scope in scopes_of(repository):
            freed[scope] = freed.get(scope, 0) + size
    return freed


async def repair(kv: KV, scope: QuotaScope, exact: int, revision: int) -> bool:
    """Set a counter to `exact` (measured from the links) if it has not moved since `revision`."""
    result = await kv.txn([Compare.unchanged(scope.guard_key(), revision)], [Put(scope.guard_key(), _record(exact))])
    return result.succeeded


class QuotaScopes:
    """The scopes that cover each repository (a callable), as configured."""

    def __init__(self, scopes: Iterable[QuotaScope] = ()) -> None:
        self.scopes = list(scopes)

    def __call__(self, repository: str) -> list[QuotaScope]:
        return [scope for scope in self.scopes if scope.covers(repository)]

    def __bool__(self) -> bool:
        return bool(self.scopes)
