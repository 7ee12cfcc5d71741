"""Storage figures from a node: the leader counts what changed, takes emptied repositories out of the
catalog, and publishes the largest repositories and namespaces (and the total) as metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

from coordinator.repositories import prune_empty
from coordinator.usage import ScopeUsage, Settled, Usage

from .services import Services

log = logging.getLogger("wharf.usage")

# How often the leader counts waiting changes, and publishes the largest scopes when something moved.
SETTLE_SECONDS = 2.0
_PUBLISH_SECONDS = 30.0
OTHER = "_other"  # no repository or namespace name starts with '_'


class FigureKeeper:
    """The leader's job: settle the marks into the figures, prune, publish."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.usage = Usage(services.kv)
        self._built = False
        self._published = 0.0
        self._moved = True

    async def once(self) -> None:
        await self.count()

    async def count(self) -> Settled:
        """Count what changed (the store whole, the first time), prune, and publish when due."""
        if not self._built:
            marked = await self.usage.build()
            if marked:
                log.info("counting the storage of a store from before the figures: %d holdings marked", marked)
            self._built = True
        settled = await self.usage.settle()
        if settled.emptied and not self.services.readonly.active:
            pruned = await prune_empty(self.services.kv, settled.emptied)
            for repo in pruned:
                log.info("repository %s holds no tag or manifest: it left the catalog", repo)
        if await self.usage.recount_noted():
            log.info("a whole-repository delete stopped before counting: the figures were checked whole")
        self._moved = self._moved or bool(settled.marks)
        if self._moved and time.monotonic() - self._published >= _PUBLISH_SECONDS:
            await self.publish()
        return settled

    async def publish(self) -> None:
        top = await self.usage.top(self.services.config.inventory.metricstop)
        figures: dict[str, Any] = {"total": top.total.report(), "repositories": {}, "namespaces": {}}
        for scope, largest, rest in (
            ("repositories", top.repositories, top.repositories_rest),
            ("namespaces", top.namespaces, top.namespaces_rest),
        ):
            figures[scope] = {name: values.report() for name, values in largest}
            if rest:
                figures[scope][OTHER] = rest.report()
        self.services.metrics.storage.publish(figures)
        self._published = time.monotonic()
        self._moved = False

    def stop(self) -> None:
        """Leadership ended: another node publishes now."""
        self.services.metrics.storage.publish(None)


def figures(scope: str, usage: ScopeUsage) -> dict[str, Any]:
    """One scope's figures as the API and `wharf du --json` give them."""
    return {"scope": scope, **usage.report()}
