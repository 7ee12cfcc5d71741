"""GET /v2/<name>/referrers/<digest>: manifests whose subject is a digest, as an OCI index."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from ..manifest import OCI_INDEX
from ..reference import parse_digest
from .common import repository, services


async def list_referrers(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    digest = str(parse_digest(request.path_params["digest"]))
    descriptors = await svc.metadata.list_referrers(name, digest)
    headers = {}
    wanted = request.query_params.get("artifactType")
    if wanted is not None:
        descriptors = [d for d in descriptors if d.get("artifactType") == wanted]
        headers["OCI-Filters-Applied"] = "artifactType"
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    return Response(json.dumps(index).encode(), media_type=OCI_INDEX, headers=headers)
