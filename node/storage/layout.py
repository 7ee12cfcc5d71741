"""The one place that maps digests, repositories and upload ids to storage keys.

Blob keys are the ones CNCF Distribution uses, so a Distribution storage tree can be read as is.
"""

from __future__ import annotations

ROOT = "docker/registry/v2"
BLOBS = f"{ROOT}/blobs/"
REPOSITORIES = f"{ROOT}/repositories/"
# Wharf's own objects, beside Distribution's tree: registry:2 never looks here.
WHARF_DIR = "wharf"
WHARF = f"{WHARF_DIR}/"
STORE_IDENTITY = f"{WHARF}store.json"


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


def upload_of_key(key: str) -> str | None:
    """The upload id of a key under some repository's `_uploads/<id>/`, or None."""
    if not key.startswith(REPOSITORIES):
        return None
    head, sep, tail = key.partition("/_uploads/")
    upload = tail.split("/", 1)[0]
    return upload if sep and upload and head != REPOSITORIES.rstrip("/") else None
