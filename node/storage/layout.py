"""The one place that maps digests, repositories and upload ids to storage keys.

Blob keys are the ones CNCF Distribution uses, so a Distribution storage tree can be read as is.
"""

from __future__ import annotations

ROOT = "docker/registry/v2"
BLOBS = f"{ROOT}/blobs/"
REPOSITORIES = f"{ROOT}/repositories/"


def blob_key(digest: str) -> str:
    """`digest` must already be validated (node.reference.parse_digest)."""
    algorithm, hexpart = digest.split(":", 1)
    return f"{BLOBS}{algorithm}/{hexpart[:2]}/{hexpart}/data"


def digest_from_blob_key(key: str) -> str | None:
    parts = key[len(BLOBS) :].split("/") if key.startswith(BLOBS) else []
    if len(parts) != 4 or parts[3] != "data":
        return None
    return f"{parts[0]}:{parts[2]}"


def upload_key(repository: str, upload_id: str) -> str:
    """`repository` and `upload_id` must already be validated."""
    return f"{REPOSITORIES}{repository}/_uploads/{upload_id}/data"
