"""The name lists a node keeps (tags, the catalog) and what it renders from them."""

from __future__ import annotations

import asyncio

from node.caches import ListCache
from node.metrics import Metrics


def test_a_kept_list_is_rendered_once_until_it_changes() -> None:
    cache = ListCache(Metrics(), "tag_list")
    renders: list[list[str]] = []

    def render(names: list[str]) -> bytes:
        renders.append(names)
        return ",".join(names).encode()

    async def fetch(version: int, names: list[str]) -> list[str]:
        async def read(known: int | None) -> tuple[int, list[str] | None]:
            return version, None if known == version else list(names)

        return await cache.get("repo", read)

    first = asyncio.run(fetch(1, ["a", "b"]))
    assert cache.rendered("repo", first, render) == b"a,b"
    assert cache.rendered("repo", asyncio.run(fetch(1, ["a", "b"])), render) == b"a,b"
    assert len(renders) == 1
    moved = asyncio.run(fetch(2, ["a", "c"]))
    assert cache.rendered("repo", moved, render) == b"a,c"
    assert cache.rendered("repo", ["a", "b"], render) == b"a,b"  # not the kept list: rendered, not kept
    assert cache.rendered("repo", moved, render) == b"a,c"
    assert len(renders) == 3
