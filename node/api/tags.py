"""GET /v2/<name>/tags/list, paginated with n and last."""

from __future__ import annotations

import bisect
import json

from starlette.requests import Request
from starlette.responses import Response

from ..errors import NameUnknown
from .request import next_link, page_size, repository, services, url

MAX_PAGE = 10_000


async def list_tags(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    n = page_size(request, default=None, maximum=MAX_PAGE)
    last = request.query_params.get("last") or None
    every = await svc.tag_lists.get(name, lambda known: svc.metadata.tag_list(name, known))
    if svc.proxy.covers(name):
        every = await svc.proxy.tag_list(name, every)  # with the upstream's tags
    if not every and not await svc.metadata.repository_exists(name):
        raise NameUnknown({"name": name})
    if n is None and not last:
        # The whole list: its body is made once for as long as the list stands.
        body = svc.tag_lists.rendered(name, every, lambda tags: _body(name, tags))
        return Response(body, media_type="application/json")
    start = bisect.bisect_right(every, last) if last else 0
    tags = every[start:] if n is None else every[start : start + n]
    headers = {}
    if n and start + n < len(every):
        headers["Link"] = next_link(url(request, f"/v2/{name}/tags/list"), n, tags[-1])
    return Response(_body(name, tags), media_type="application/json", headers=headers)


def _body(name: str, tags: list[str]) -> bytes:
    return json.dumps({"name": name, "tags": tags}).encode()
