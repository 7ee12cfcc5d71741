"""GET /wharf/v1/repositories/<name>/tags: every tag with its details, sorted, filtered and paged."""

from __future__ import annotations

import json
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response

from ..errors import NameUnknown, QueryInvalid
from ..inventory import SORTS
from .request import page_size, repository, services, url

DEFAULT_PAGE = 100
MAX_PAGE = 1000
_MAX_PARAMETER = 300


def _parameter(request: Request, name: str) -> str | None:
    value = request.query_params.get(name) or None
    if value is not None and len(value) > _MAX_PARAMETER:
        raise QueryInvalid({name: value[:100], "reason": f"longer than {_MAX_PARAMETER} characters"})
    return value


async def list_tag_details(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    n = page_size(request, default=DEFAULT_PAGE, maximum=MAX_PAGE)
    assert n is not None
    sort = _parameter(request, "sort") or "name"
    if sort not in SORTS:
        raise QueryInvalid({"sort": sort[:100], "reason": f"sort is one of {', '.join(SORTS)}"})
    pattern = _parameter(request, "pattern")
    last = _parameter(request, "last")
    page = await svc.tag_details.page(name, sort=sort, n=n, last=last, pattern=pattern)
    if not page.rows and not last and not pattern and not await svc.metadata.repository_exists(name):
        raise NameUnknown({"name": name})
    headers = {}
    if page.next is not None:
        query = {"n": n, "sort": sort, **({"pattern": pattern} if pattern else {}), "last": page.next}
        link = url(request, f"/wharf/v1/repositories/{name}/tags") + "?" + urlencode(query)
        headers["Link"] = f'<{link}>; rel="next"'
    body = json.dumps({"name": name, "tags": page.rows}).encode()
    return Response(body, media_type="application/json", headers=headers)
