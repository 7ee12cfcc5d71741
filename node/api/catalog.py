"""GET /v2/_catalog: repositories, paginated with n and last, from the coordinator."""

from __future__ import annotations

import bisect
import itertools
import json
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from .request import next_link, page_size, services, url


async def list_repositories(request: Request) -> Response:
    svc = services(request)
    # catalog.maxentries, as in Distribution: the page without `n` and the largest one (a larger `n`
    # gets this many and a Link, where Distribution refuses it).
    most = svc.config.catalog.maxentries
    n = page_size(request, default=most, maximum=most)
    assert n is not None
    last = request.query_params.get("last") or None
    every = await svc.catalog.get("", svc.metadata.repository_list)
    visible = request.scope.get("state", {}).get("catalog_filter")
    start = bisect.bisect_right(every, last) if last else 0
    names = _page(every, start, n + 1, visible) if n else []
    headers = {}
    if len(names) > n:
        names = names[:n]
        headers["Link"] = next_link(url(request, "/v2/_catalog"), n, names[-1])
    return Response(json.dumps({"repositories": names}).encode(), media_type="application/json", headers=headers)


def _page(every: list[str], start: int, want: int, visible: Callable[[str], bool] | None) -> list[str]:
    """Up to `want` names from `start` on that pass the caller's filter (set by auth: what it may pull)."""
    if visible is None:
        return every[start : start + want]
    names: list[str] = []
    for name in itertools.islice(every, start, None):
        if visible(name):
            names.append(name)
            if len(names) == want:
                break
    return names
