"""The one place that maps digests, repositories and upload ids to storage keys.

Every key is the one CNCF Distribution uses (its `registry/storage/paths.go`), so a Distribution
storage tree can be read as is and written back for Distribution to serve.
"""

from __future__ import annotations

import calendar
import re
import time
from dataclasses import dataclass

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


# -- a repository's links: small objects whose content is one digest ---------------------------
# Names, tags and digests must already be validated. A repository name's components never start
# with "_", so the first component that does ends the name.


def repository_prefix(repository: str) -> str:
    return f"{REPOSITORIES}{repository}/"


def _digest_path(digest: str) -> str:
    return digest.replace(":", "/", 1)


def layer_link_key(repository: str, digest: str) -> str:
    """A blob is visible in the repository while this link exists (Distribution links every blob here)."""
    return f"{REPOSITORIES}{repository}/_layers/{_digest_path(digest)}/link"


def revision_link_key(repository: str, digest: str) -> str:
    """A manifest is visible in the repository while this link exists."""
    return f"{REPOSITORIES}{repository}/_manifests/revisions/{_digest_path(digest)}/link"


def tag_current_key(repository: str, tag: str) -> str:
    return f"{REPOSITORIES}{repository}/_manifests/tags/{tag}/current/link"


def tag_index_key(repository: str, tag: str, digest: str) -> str:
    """Every manifest the tag has named: Distribution adds one when it tags, and reads it to untag."""
    return f"{REPOSITORIES}{repository}/_manifests/tags/{tag}/index/{_digest_path(digest)}/link"


@dataclass(frozen=True)
class RepositoryKey:
    """A parsed key under REPOSITORIES; names, tags and digests are as found, not yet validated."""

    repository: str
    area: str  # the first component starting with "_": "_layers", "_manifests", "_uploads" ...
    kind: str  # "layer", "revision", "tag", "tag_index", or "other" (upload data, older layouts)
    digest: str | None = None
    tag: str | None = None


def parse_repository_key(key: str) -> RepositoryKey | None:
    """What a key under REPOSITORIES is, or None when it lies in no repository's area."""
    parts = key[len(REPOSITORIES) :].split("/") if key.startswith(REPOSITORIES) else []
    split = next((i for i, part in enumerate(parts) if part.startswith("_")), 0)
    if split == 0:
        return None
    name, area, rest = "/".join(parts[:split]), parts[split], parts[split + 1 :]
    if area == "_layers" and len(rest) == 3 and rest[2] == "link":
        return RepositoryKey(name, area, "layer", digest=f"{rest[0]}:{rest[1]}")
    if area == "_manifests" and len(rest) == 4 and rest[0] == "revisions" and rest[3] == "link":
        return RepositoryKey(name, area, "revision", digest=f"{rest[1]}:{rest[2]}")
    if area == "_manifests" and len(rest) == 4 and rest[0] == "tags" and rest[2:] == ["current", "link"]:
        return RepositoryKey(name, area, "tag", tag=rest[1])
    if area == "_manifests" and len(rest) == 6 and rest[0] == "tags" and rest[2] == "index" and rest[5] == "link":
        return RepositoryKey(name, area, "tag_index", digest=f"{rest[3]}:{rest[4]}", tag=rest[1])
    return RepositoryKey(name, area, "other")


def upload_of_key(key: str) -> str | None:
    """The upload id of a key under some repository's `_uploads/<id>/`, or None."""
    if not key.startswith(REPOSITORIES):
        return None
    head, sep, tail = key.partition("/_uploads/")
    upload = tail.split("/", 1)[0]
    return upload if sep and upload and head != REPOSITORIES.rstrip("/") else None


# Coordinator snapshots (coordinator/snapshot.py) the leader keeps in the storage, beside
# Distribution's tree. A target of `wharf backup` holds the same names at its top (prefix "").
SNAPSHOTS = "wharf/snapshots/"
_SNAPSHOT_NAME = re.compile(r"wharf-coordinator-(\d{8}T\d{6})\.(\d{3})Z-r(\d+)\.jsonl\.gz")


def snapshot_key(created: float, revision: int, prefix: str = SNAPSHOTS) -> str:
    """Names sort as the snapshots' times do (UTC, to the millisecond)."""
    whole, millis = divmod(round(created * 1000), 1000)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(whole))
    return f"{prefix}wharf-coordinator-{stamp}.{millis:03d}Z-r{revision}.jsonl.gz"


def snapshot_from_key(key: str, prefix: str = SNAPSHOTS) -> tuple[float, int] | None:
    """(created, revision) of a key `snapshot_key` made directly under `prefix`; None for any other key."""
    match = _SNAPSHOT_NAME.fullmatch(key[len(prefix) :]) if key.startswith(prefix) else None
    if match is None:
        return None
    stamp, millis, revision = match.groups()
    try:
        seconds = calendar.timegm(time.strptime(stamp, "%Y%m%dT%H%M%S"))
    except ValueError:
        return None
    return seconds + int(millis) / 1000, int(revision)
