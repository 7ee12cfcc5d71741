"""Byte quotas on what repositories link, enforced atomically across nodes.

Usage is never stored: it is the sum of a scope's blob links, read when a new link would be
made. Each scope has a guard key that every new link under it rewrites in the same transaction,
so two nodes that both measured room for one more blob cannot both commit: the second finds the
guard moved and measures again. A quota is therefore never overshot, whatever the concurrency.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import keys
from .kv import KV, Compare, Put


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


class QuotaExceeded(Exception):
    def __init__(self, scope: QuotaScope, usage: int, size: int) -> None:
        super().__init__(f"quota of {scope.label} exceeded: {usage} of {scope.limit} bytes used, {size} more asked")
        self.scope = scope
        self.usage = usage
        self.size = size


async def usage(kv: KV, scope: QuotaScope) -> int:
    total = 0
    start: str | None = None
    prefix = scope.links_prefix()
    while True:
        page = await kv.range(prefix, start=start, limit=1000)
        total += sum(json.loads(item.value)["size"] for item in page)
        if len(page) < 1000:
            return total
        start = keys.after(page[-1].key)


async def admit(kv: KV, scopes: list[QuotaScope], size: int) -> tuple[list[Compare], list[Put]]:
    """Guards and guard writes for a transaction that adds `size` linked bytes to every scope.

    Raises QuotaExceeded if a scope has no room. The guard revisions are read before usage is
    measured, so a link committed by anyone after the measurement makes the transaction fail.
    """
    compares: list[Compare] = []
    writes: list[Put] = []
    for scope in scopes:
        guard = await kv.get(scope.guard_key())
        revision = guard.mod_revision if guard is not None else 0
        used = await usage(kv, scope)
        if used + size > scope.limit:
            raise QuotaExceeded(scope, used, size)
        compares.append(Compare.unchanged(scope.guard_key(), revision))
        writes.append(Put(scope.guard_key(), json.dumps({"used": used + size}).encode()))
    return compares, writes
