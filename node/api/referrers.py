"""GET /v2/<name>/referrers/<digest>: manifests whose subject is a digest, as an OCI index, in pages."""

from __future__ import annotations

import json
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response

from coordinator.metadata import ANNOTATIONS_IN_MANIFEST

from ..errors import ManifestUnknown
from ..manifest import OCI_INDEX
from ..reference import parse_digest
from .manifests import manifest_bytes
from .request import repository, services, url

# The most a page may be: clients (oras-go, containerd) refuse larger index responses. A page ends,
# with a Link to the next one, before adding a descriptor would cross it.
MAX_PAGE_BYTES = 4 * 1024 * 1024
_BATCH = 100


async def list_referrers(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    digest = str(parse_digest(request.path_params["digest"]))
    last = request.query_params.get("last") or None
    after = str(parse_digest(last)) if last is not None else None
    wanted = request.query_params.get("artifactType")
    head = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})[:-2]
    page: list[str] = []
    size = len(head) + 2
    last_listed: str | None = None
    more = False
    while not more:
        batch = await svc.metadata.list_referrers(name, digest, after=after, limit=_BATCH)
        for desc in batch:
            after = desc["digest"]
            if wanted is not None and desc.get("artifactType") != wanted:
                continue
            if desc.pop(ANNOTATIONS_IN_MANIFEST, False):
                try:
                    desc["annotations"] = json.loads(await manifest_bytes(svc, desc["digest"])).get("annotations")
                except ManifestUnknown:
                    pass  # deleted meanwhile: list it without them
            encoded = json.dumps(desc)
            if page and size + len(encoded) + 2 > MAX_PAGE_BYTES:
                more = True
                break
            page.append(encoded)
            size += len(encoded) + 2
            last_listed = desc["digest"]
        if len(batch) < _BATCH:
            break
    headers = {}
    if wanted is not None:
        headers["OCI-Filters-Applied"] = "artifactType"
    if more and last_listed is not None:
        query = f"last={quote(last_listed, safe='')}"
        if wanted is not None:
            query += f"&artifactType={quote(wanted, safe='')}"
        headers["Link"] = f'<{url(request, f"/v2/{name}/referrers/{digest}")}?{query}>; rel="next"'
    body = head + ", ".join(page) + "]}"
    return Response(body.encode(), media_type=OCI_INDEX, headers=headers)
