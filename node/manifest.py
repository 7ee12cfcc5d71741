"""Parsing and checking manifests: media types, descriptors and what a manifest references."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coordinator.metadata import ManifestRecord

from .errors import ManifestInvalid
from .reference import parse_digest

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)

IMAGE_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
SUPPORTED_TYPES = IMAGE_TYPES + INDEX_TYPES

# Layers that live elsewhere (Windows base layers) need not be pushed to the registry.
_FOREIGN_LAYER_TYPES = (
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
)

MAX_MANIFEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class ParsedManifest:
    media_type: str
    blobs: list[str]
    manifests: list[str]
    subject: str | None
    artifact_type: str | None
    annotations: dict[str, str] | None


# Annotations larger than this stay in the manifest only: its record says to read them there.
MAX_RECORD_ANNOTATIONS = 16 * 1024


def record_of(parsed: ParsedManifest, digest: str, size: int, pushed: float) -> ManifestRecord:
    """The coordinator's record of a manifest: what the API and GC need without reading its bytes."""
    large = parsed.annotations is not None and len(json.dumps(parsed.annotations)) > MAX_RECORD_ANNOTATIONS
    return ManifestRecord(
        digest=digest,
        media_type=parsed.media_type,
        size=size,
        blobs=parsed.blobs,
        manifests=parsed.manifests,
        subject=parsed.subject,
        artifact_type=parsed.artifact_type,
        annotations=None if large else parsed.annotations,
        annotations_in_manifest=large,
        pushed=pushed,
    )


def compute_digest(body: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, body).hexdigest()}"


def _media_type_of(header: str | None) -> str | None:
    if not header:
        return None
    return header.split(";", 1)[0].strip().lower() or None


def parse(
    body: bytes, content_type: str | None, *, url_refused: Callable[[str], str | None] | None = None
) -> ParsedManifest:
    """Check a manifest body and list what it references; MANIFEST_INVALID on anything wrong.

    `url_refused` says why a foreign layer may not name a URL (Distribution's `validation`
    section), or None when it may; without it every URL is taken.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ManifestInvalid({"reason": f"not valid JSON: not UTF-8 ({exc.reason} at byte {exc.start})"}) from exc
    return _check(_decode(text), content_type, url_refused)


def _decode(text: str) -> Any:
    """A manifest's JSON as Go's decoder, which every client's is, reads it: no byte order mark, no
    NaN or Infinity; a number too long for int64 is kept as one past it (Python would refuse a text
    of thousands of digits), which a field that must be an int64 refuses and any other ignores."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_int=_int64_or_past)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ManifestInvalid({"reason": f"not valid JSON: {str(exc)[:200]}"}) from exc


def _int64_or_past(text: str) -> int:
    if len(text) <= 19:
        return int(text)
    return -_PAST_INT64 if text.startswith("-") else _PAST_INT64


def _check(doc: Any, content_type: str | None, url_refused: Callable[[str], str | None] | None) -> ParsedManifest:
    if not isinstance(doc, dict):
        raise ManifestInvalid({"reason": "a manifest is a JSON object"})
    header_type = _media_type_of(content_type)
    body_type = doc.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise ManifestInvalid({"reason": "mediaType must be a string"})
    if header_type in DOCKER_SCHEMA1 or body_type in DOCKER_SCHEMA1 or doc.get("schemaVersion") == 1:
        raise ManifestInvalid(
            {"reason": "Docker schema1 manifests are not supported; push an OCI or Docker schema2 image"},
            message="schema1 manifest not supported",
        )
    media_type = body_type or header_type or _guess_media_type(doc)
    if (
        header_type
        and header_type not in ("application/json", "application/octet-stream")
        and header_type != media_type
    ):
        raise ManifestInvalid(
            {"reason": f"Content-Type {header_type} does not match the manifest's mediaType {media_type}"}
        )
    if media_type not in SUPPORTED_TYPES:
        raise ManifestInvalid({"reason": f"unsupported manifest media type {media_type}"})
    version = doc.get("schemaVersion")
    if version != 2 or type(version) is not int:  # 2.0 is no int to a Go client
        raise ManifestInvalid({"reason": "schemaVersion must be 2"})

    blobs: list[str] = []
    manifests: list[str] = []
    if media_type in IMAGE_TYPES:
        config = doc.get("config")
        blobs.append(_descriptor(config, "config")["digest"])
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ManifestInvalid({"reason": "layers must be a list"})
        for i, layer in enumerate(layers):
            desc = _descriptor(layer, f"layers[{i}]")
            if desc.get("mediaType") in _FOREIGN_LAYER_TYPES and desc.get("urls"):
                _check_urls(desc["urls"], f"layers[{i}].urls", url_refused)
                continue
            blobs.append(desc["digest"])
    else:
        children = doc.get("manifests")
        if not isinstance(children, list):
            raise ManifestInvalid({"reason": "manifests must be a list"})
        for i, child in enumerate(children):
            manifests.append(_descriptor(child, f"manifests[{i}]")["digest"])

    subject = None
    if doc.get("subject") is not None:
        subject = _descriptor(doc["subject"], "subject")["digest"]
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestInvalid({"reason": "artifactType must be a string"})
    if artifact_type is None and media_type == OCI_MANIFEST:
        artifact_type = doc["config"].get("mediaType")
    annotations = doc.get("annotations")
    if annotations is not None and (
        not isinstance(annotations, dict) or not all(isinstance(v, str) for v in annotations.values())
    ):
        raise ManifestInvalid({"reason": "annotations must map strings to strings"})
    return ParsedManifest(
        media_type,
        list(dict.fromkeys(blobs)),
        list(dict.fromkeys(manifests)),
        subject,
        artifact_type,
        annotations or None,
    )


def _check_urls(urls: Any, where: str, url_refused: Callable[[str], str | None] | None) -> None:
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ManifestInvalid({"reason": f"{where} must be a list of URLs"})
    for url in urls:
        reason = url_refused(url) if url_refused is not None else None
        if reason is not None:
            raise ManifestInvalid({"reason": f"{where}: {url[:200]!r}: {reason}"}, message="foreign layer URL refused")


def _guess_media_type(doc: dict[str, Any]) -> str:
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc or "layers" in doc:
        return OCI_MANIFEST
    raise ManifestInvalid({"reason": "no mediaType and no Content-Type"})


# A descriptor's size is an int64 in every client.
_MAX_SIZE = (1 << 63) - 1
_PAST_INT64 = 1 << 64


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _descriptor(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ManifestInvalid({"reason": f"{where} must be a descriptor object"})
    digest = value.get("digest")
    size = value.get("size")
    media_type = value.get("mediaType")
    if not isinstance(digest, str):
        raise ManifestInvalid({"reason": f"{where}.digest is missing"})
    try:
        parse_digest(digest)
    except Exception as exc:
        raise ManifestInvalid({"reason": f"{where}.digest {digest[:200]!r} is not a valid digest"}) from exc
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _MAX_SIZE:
        raise ManifestInvalid({"reason": f"{where}.size must be a non-negative integer (64 bits)"})
    if media_type is not None and not isinstance(media_type, str):
        raise ManifestInvalid({"reason": f"{where}.mediaType must be a string"})
    return value


def accepts(accept_headers: list[str], media_type: str) -> bool:
    """Whether a client's Accept headers admit a manifest media type (no header admits all)."""
    offered = _offered(tuple(accept_headers))
    if not offered:
        return True
    return media_type in offered or "*/*" in offered or "application/*" in offered


@functools.lru_cache(maxsize=256)
def _offered(accept_headers: tuple[str, ...]) -> frozenset[str]:
    """The media types Accept headers name; clients send the same few headers on every pull."""
    offered = (part.split(";", 1)[0].strip().lower() for header in accept_headers for part in header.split(","))
    return frozenset(o for o in offered if o)


def parse_stored(body: bytes) -> ParsedManifest:
    """A manifest found in a store Wharf adopts: what `parse` accepts, and Docker schema1 as it is.

    Wharf refuses schema1 pushes but serves schema1 manifests an adopted registry:2 store holds, as
    registry:2 did; their layers are the `fsLayers` blob sums.
    """
    # Go takes bytes that are not UTF-8 inside strings (as U+FFFD), so registry:2 may hold such a
    # manifest: read it the same way (its digest is of its bytes, which stay as they are).
    doc = _decode(body.decode("utf-8", errors="replace"))
    if isinstance(doc, dict) and doc.get("schemaVersion") == 1:
        layers = doc.get("fsLayers")
        if not isinstance(layers, list):
            raise ManifestInvalid({"reason": "schema1 manifest without fsLayers"})
        sums = [
            _descriptor({"digest": layer.get("blobSum") if isinstance(layer, dict) else None, "size": 0}, "fsLayers")
            for layer in layers
        ]
        media_type = DOCKER_SCHEMA1[1] if "signatures" in doc else DOCKER_SCHEMA1[0]
        return ParsedManifest(media_type, list(dict.fromkeys(d["digest"] for d in sums)), [], None, None, None)
    return _check(doc, None, None)
