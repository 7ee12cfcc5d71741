"""Each upstream's byte budget (`maxbytes`): least recently pulled images evicted until the rest fit.

The leader looks after every fetch (an upstream's counts moved) and every few minutes anyway. What an
upstream's cache uses is the bytes of every manifest and blob its cached images name and this
registry stores, each digest once. Eviction deletes whole images, least recently pulled first, and
only manifests: the blobs they leave unused go with the next garbage collection (which the leader
runs at once), and a blob any remaining image (cached or hosted) names is never among them. Hosted
repositories are never looked at: only the repositories under the upstream's prefix are.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from coordinator.cache import EvictionRun, LastPulled, cache_contents, evict, read_counts, record_eviction

from .pullthrough import Cache, PullThrough

log = logging.getLogger("wharf.proxy")

# Usage is measured again at least this often, fetched or not (retention and GC change it too).
_MEASURE_SECONDS = 300.0


@dataclass
class _Seen:
    fetched: int  # the upstream's miss count when usage was last measured
    at: float


class Budgets:
    """The leader's enforcement of every upstream's budget."""

    def __init__(self, proxy: PullThrough, last_pulled: LastPulled) -> None:
        self.proxy = proxy
        self.last_pulled = last_pulled
        self._seen: dict[str, _Seen] = {}

    @property
    def any(self) -> bool:
        return any(cache.upstream.maxbytes for cache in self.proxy.caches)

    async def enforce(self) -> int:
        """Evict what is over each budget; returns how many images went (their blobs await a GC cycle)."""
        evicted = 0
        for cache in self.proxy.caches:
            if cache.upstream.maxbytes and await self._due(cache):
                evicted += await self._enforce(cache)
        return evicted

    async def _due(self, cache: Cache) -> bool:
        counts = await read_counts(self.proxy.kv, cache.name)
        seen = self._seen.get(cache.name)
        now = time.monotonic()
        if seen is not None and seen.fetched == counts.misses and now - seen.at < _MEASURE_SECONDS:
            return False
        self._seen[cache.name] = _Seen(counts.misses, now)
        return True

    async def _enforce(self, cache: Cache) -> int:
        budget = cache.upstream.maxbytes
        kv = self.proxy.kv
        contents = await cache_contents(kv, cache.upstream.prefix, self.last_pulled)
        usage = contents.usage
        metrics = self.proxy.metrics
        metrics.proxy_usage.labels(cache.name).set(usage)
        if usage <= budget:
            return 0
        images = contents.over_budget(budget)
        freed = await evict(kv, contents, images)
        left = usage - freed
        metrics.proxy_usage.labels(cache.name).set(left)
        metrics.proxy_evictions.labels(cache.name).inc(len(images))
        metrics.proxy_evicted_bytes.labels(cache.name).inc(freed)
        cache.counts.evictions += len(images)
        cache.counts.evicted_bytes += freed
        await record_eviction(kv, cache.name, EvictionRun(time.time(), len(images), freed, left))
        log.info(
            "cache of upstream %s over its budget (%d of %d bytes): evicted %d least recently pulled images (%d bytes)",
            cache.name,
            usage,
            budget,
            len(images),
            freed,
            extra={
                "fields": {
                    "upstream": cache.name,
                    "usage": usage,
                    "budget": budget,
                    "evicted": [f"{i.repository}@{i.digest}" for i in images],
                    "freed": freed,
                }
            },
        )
        if len(images) == len(contents.images):
            log.warning(
                "cache of upstream %s evicted every image: its budget of %d bytes is smaller than the newest",
                cache.name,
                budget,
                extra={"fields": {"upstream": cache.name, "budget": budget}},
            )
        return len(images)
