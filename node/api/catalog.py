"""GET /v2/_catalog: repositories, paginated with n and last, from the coordinator."""

from __future__ import annotations

import json
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response

from ..services import Services
from .common import next_link, page_size, services, url

MAX_PAGE = 1000


async def list_repositories(request: Request) -> Response:
    svc = services(request)
    n = page_size(request, default=MAX_PAGE, maximum=MAX_PAGE)
    assert n is not None
    last = request.query_params.get("last") or None
    visible = request.scope.get("state", {}).get("catalog_filter")
    if visible is None:
        names = await svc.metadata.list_repositories(last=last, limit=n + 1) if n else []
    else:
        names = await _visible(svc, visible, last, n + 1) if n else []
    headers = {}
    if len(names) > n:
        names = names[:n]
        headers["Link"] = next_link(url(request, "/v2/_catalog"), n, names[-1])
    return Response(json.dumps({"repositories": names}).encode(), media_type="application/json", headers=headers)


async def _visible(svc: Services, visible: Callable[[str], bool], last: str | None, want: int) -> list[str]:
    """Up to `want` names after `last` that pass the caller's filter (set by auth: what it may pull)."""
    names: list[str] = []
    batch = max(want, 100)
    while len(names) < want:
        page = await svc.metadata.list_repositories(last=last, limit=batch)
        names.extend(name for name in page if visible(name))
        if len(page) < batch:
            break
        last = page[-1]
    return names[:want]
