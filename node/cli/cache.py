"""`wharf cache ls|status`: what the pull-through cache holds, and how it is doing, per upstream."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from coordinator.cache import CacheRecords, cache_contents, last_eviction, read_counts

from ..config import Config
from ..services import Services
from .output import size, table
from .registry import Commands, store_command, with_services


def add_commands(commands: Commands) -> None:
    group = commands.add_parser("cache", help="the pull-through cache: cached images and hit ratio")
    actions = group.add_subparsers(dest="cache_action", required=True)
    listing = store_command(
        actions, "ls", run_cache_ls, help="every cached image: tags, size, when cached and last pulled"
    )
    listing.add_argument("--upstream", help="only the upstream of this name (its prefix, or its URL)")
    store_command(
        actions, "status", run_cache_status, help="per upstream: usage and budget, hits, misses, errors, evictions"
    )


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    ago = time.time() - ts
    return f"{ago:.0f}s ago" if ago < 120 else time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts))


def run_cache_ls(args: argparse.Namespace, config: Config) -> int:
    async def listing(services: Services) -> int:
        rows: list[dict[str, Any]] = []
        for cache in services.proxy.caches:
            if args.upstream and args.upstream not in (cache.name, cache.upstream.prefix, cache.upstream.remoteurl):
                continue
            contents = await cache_contents(services.kv, cache.upstream.prefix, services.proxy.last_pulled)
            for image in sorted(contents.images, key=lambda i: (i.repository, i.tags, i.digest)):
                rows.append(
                    {
                        "upstream": cache.name,
                        "repository": image.repository,
                        "tags": image.tags,
                        "digest": image.digest,
                        "media_type": image.media_type,
                        "size": image.size,
                        "complete": image.complete,
                        "cached": image.cached,
                        "last_pulled": image.last_pulled,
                    }
                )
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        if not services.proxy.caches:
            print("no pull-through cache configured (proxy.remoteurl or proxy.upstreams)")
            return 0
        if not rows:
            print("nothing cached yet")
            return 0
        shown = [
            {
                "repository": r["repository"],
                "tags": ",".join(r["tags"]) or "(by digest)",
                "digest": r["digest"][:19],
                "size": size(r["size"]) + ("" if r["complete"] else " (partial)"),
                "cached": _when(r["cached"]),
                "pulled": _when(r["last_pulled"]),
            }
            for r in rows
        ]
        columns = [
            ("repository", "REPOSITORY"),
            ("tags", "TAGS"),
            ("digest", "DIGEST"),
            ("size", "SIZE"),
            ("cached", "CACHED"),
            ("pulled", "LAST PULLED"),
        ]
        print("\n".join(table(shown, columns)))
        return 0

    return asyncio.run(with_services(config, listing, readonly=True))


def run_cache_status(args: argparse.Namespace, config: Config) -> int:
    async def status(services: Services) -> int:
        rows: list[dict[str, Any]] = []
        fetching = await CacheRecords(services.kv).fetches()
        for cache in services.proxy.caches:
            upstream = cache.upstream
            counts = await read_counts(services.kv, cache.name)
            contents = await cache_contents(services.kv, upstream.prefix)
            evicted = await last_eviction(services.kv, cache.name)
            rows.append(
                {
                    "upstream": cache.name,
                    "remoteurl": upstream.remoteurl,
                    "prefix": upstream.prefix,
                    "ttl": upstream.ttl,
                    "budget": upstream.maxbytes,
                    "used": contents.usage,
                    "images": len(contents.images),
                    "hits": counts.hits,
                    "misses": counts.misses,
                    "hit_ratio": counts.hit_ratio,
                    "stale": counts.stale,
                    "upstream_bytes": counts.upstream_bytes,
                    "upstream_errors": counts.upstream_errors,
                    "evictions": counts.evictions,
                    "evicted_bytes": counts.evicted_bytes,
                    "last_eviction": evicted.at if evicted is not None else None,
                }
            )
        if args.json:
            print(json.dumps({"upstreams": rows, "fetching": [d for d, _ in fetching]}, indent=2))
            return 0
        if not rows:
            print("no pull-through cache configured (proxy.remoteurl or proxy.upstreams)")
            return 0
        for r in rows:
            ratio = f"{100 * r['hit_ratio']:.1f}%" if r["hit_ratio"] is not None else "-"
            budget = f" of {size(r['budget'])}" if r["budget"] else " (no budget)"
            where = f"{r['prefix']}* from " if r["prefix"] else "every repository from "
            print(f"upstream {r['upstream']}: {where}{r['remoteurl']}, tags checked after {r['ttl']:.0f}s")
            print(f"  cached: {r['images']} images, {size(r['used'])}{budget}")
            print(f"  pulls: {r['hits']} hits, {r['misses']} misses (hit ratio {ratio}), {r['stale']} served stale")
            print(f"  upstream: {size(r['upstream_bytes'])} fetched, {r['upstream_errors']} errors")
            print(f"  evicted: {r['evictions']} images, {size(r['evicted_bytes'])}, last {_when(r['last_eviction'])}")
        if fetching:
            print(f"fetching now: {len(fetching)} blobs")
        return 0

    return asyncio.run(with_services(config, status, readonly=True))
