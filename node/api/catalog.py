"""GET /v2/_catalog: repositories, paginated with n and last, from the coordinator."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from .common import next_link, page_size, services, url

MAX_PAGE = 1000


async def list_repositories(request: Request) -> Response:
    svc = services(request)
    n = page_size(request, default=MAX_PAGE, maximum=MAX_PAGE)
    assert n is not None
    last = request.query_params.get("last") or None
    names = await svc.metadata.list_repositories(last=last, limit=n + 1) if n else []
    headers = {}
    if len(names) > n:
        names = names[:n]
        headers["Link"] = next_link(url(request, "/v2/_catalog"), n, names[-1])
    return Response(json.dumps({"repositories": names}).encode(), media_type="application/json", headers=headers)
