"""GET /v2/<name>/referrers/<digest>: manifests whose subject is a digest, as an OCI index."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from coordinator.metadata import ANNOTATIONS_IN_MANIFEST

from ..errors import ManifestUnknown
from ..manifest import OCI_INDEX
from ..reference import parse_digest
from .common import repository, services
from .manifests import manifest_bytes


async def list_referrers(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    digest = str(parse_digest(request.path_params["digest"]))
    descriptors = await svc.metadata.list_referrers(name, digest)
    for desc in descriptors:
        if desc.pop(ANNOTATIONS_IN_MANIFEST, False):
            try:
                desc["annotations"] = json.loads(await manifest_bytes(svc, desc["digest"])).get("annotations")
            except ManifestUnknown:
                pass  # deleted meanwhile: list it without them
    headers = {}
    wanted = request.query_params.get("artifactType")
    if wanted is not None:
        descriptors = [d for d in descriptors if d.get("artifactType") == wanted]
        headers["OCI-Filters-Applied"] = "artifactType"
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
    return Response(json.dumps(index).encode(), media_type=OCI_INDEX, headers=headers)
