"""GET /v2/<name>/tags/list, paginated with n and last."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from ..errors import NameUnknown
from .common import next_link, page_size, repository, services, url

MAX_PAGE = 10_000


async def list_tags(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    n = page_size(request, default=None, maximum=MAX_PAGE)
    last = request.query_params.get("last") or None
    if n == 0:
        tags: list[str] = []
    else:
        tags = await svc.metadata.list_tags(name, last=last, limit=(n + 1) if n else 0)
    if not tags and not await svc.metadata.repository_exists(name):
        raise NameUnknown({"name": name})
    headers = {}
    if n and len(tags) > n:
        tags = tags[:n]
        headers["Link"] = next_link(url(request, f"/v2/{name}/tags/list"), n, tags[-1])
    body = json.dumps({"name": name, "tags": tags}).encode()
    return Response(body, media_type="application/json", headers=headers)
