"""Manifest HEAD, GET, PUT and DELETE, by tag or by digest."""

from __future__ import annotations

import json
import time

from starlette.requests import Request
from starlette.responses import Response

from coordinator.metadata import BeingCollected, ManifestRecord, MissingReferences, TagFrozen

from .. import manifest as manifests
from ..audit import note
from ..errors import (
    Denied,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestTooLarge,
    ManifestUnknown,
    TagInvalid,
    Unsupported,
)
from ..reference import Reference, parse_reference
from ..services import Services
from ..storage import layout
from .common import repository, services, url


def _existing_reference(request: Request) -> Reference:
    """The URL's reference for reading or deleting: a malformed tag cannot exist, so 404."""
    raw = request.path_params["reference"]
    try:
        return parse_reference(raw)
    except TagInvalid:
        raise ManifestUnknown({"reference": raw[:300]}) from None


# Larger annotations are left in the manifest bytes instead of the coordinator's record.
MAX_RECORD_ANNOTATIONS = 16 * 1024


async def manifest_bytes(svc: Services, digest: str) -> bytes:
    """A manifest's bytes by digest, from the cache or storage; MANIFEST_UNKNOWN if gone."""
    body = svc.manifests.get(digest)
    if body is None:
        try:
            body = await svc.storage.read_bytes(layout.blob_key(digest))
        except FileNotFoundError:
            raise ManifestUnknown({"digest": digest, "reason": "manifest content missing from storage"}) from None
        svc.manifests.put(digest, body)
    return body


async def _load(request: Request) -> tuple[str, str, bytes]:
    """(digest, media type, bytes) of the manifest a URL names, or MANIFEST_UNKNOWN."""
    svc = services(request)
    name = repository(request)
    ref = _existing_reference(request)
    if ref.tag is not None:
        tag = await svc.metadata.get_tag(name, ref.tag)
        if tag is None:
            raise ManifestUnknown({"tag": ref.tag})
        digest, media_type = tag.digest, tag.media_type
        if not manifests.accepts(request.headers.getlist("accept"), media_type):
            raise ManifestUnknown(
                {"tag": ref.tag, "reason": f"the manifest is {media_type}, which the Accept header does not admit"}
            )
    else:
        digest = str(ref.digest)
        record = await svc.metadata.get_manifest(name, digest)
        if record is None:
            raise ManifestUnknown({"digest": digest})
        media_type = record.media_type
    return digest, media_type, await manifest_bytes(svc, digest)


def _headers(digest: str, media_type: str, size: int) -> dict[str, str]:
    return {
        "Docker-Content-Digest": digest,
        "Content-Type": media_type,
        "Content-Length": str(size),
        "ETag": f'"{digest}"',
    }


async def head_manifest(request: Request) -> Response:
    digest, media_type, body = await _load(request)
    return Response(headers=_headers(digest, media_type, len(body)))


async def get_manifest(request: Request) -> Response:
    digest, media_type, body = await _load(request)
    return Response(body, headers=_headers(digest, media_type, len(body)))


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > manifests.MAX_MANIFEST_BYTES:
        raise ManifestTooLarge({"limit": manifests.MAX_MANIFEST_BYTES})
    parts: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > manifests.MAX_MANIFEST_BYTES:
            raise ManifestTooLarge({"limit": manifests.MAX_MANIFEST_BYTES})
        parts.append(chunk)
    return b"".join(parts)


async def put_manifest(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    ref = parse_reference(request.path_params["reference"])
    body = await _read_body(request)
    parsed = manifests.parse(body, request.headers.get("content-type"))
    algorithm = ref.digest.algorithm if ref.digest is not None else "sha256"
    digest = manifests.compute_digest(body, algorithm)
    if ref.digest is not None and digest != str(ref.digest):
        raise DigestInvalid({"expected": str(ref.digest), "actual": digest})
    large_annotations = len(json.dumps(parsed.annotations or {})) > MAX_RECORD_ANNOTATIONS
    record = ManifestRecord(
        digest=digest,
        media_type=parsed.media_type,
        size=len(body),
        blobs=parsed.blobs,
        manifests=parsed.manifests,
        subject=parsed.subject,
        artifact_type=parsed.artifact_type,
        annotations=parsed.annotations if not large_annotations else None,
        annotations_in_manifest=large_annotations,
        pushed=time.time(),
    )
    frozen = svc.policies.immutability.rule_for(name, ref.tag) if ref.tag is not None else None
    key = layout.blob_key(digest)
    # Content first, then the records that make it visible: a reader never finds a record
    # whose bytes are missing.
    if await svc.storage.stat(key) != len(body):
        await svc.storage.write_bytes(key, body)
    try:
        try:
            await svc.metadata.put_manifest(name, record, tag=ref.tag, storage_key=key, frozen_tag=frozen is not None)
        except BeingCollected:
            # Garbage collection was deleting these very bytes: wait, store them again, retry.
            await svc.metadata.wait_collected(digest)
            await svc.storage.write_bytes(key, body)
            await svc.metadata.put_manifest(name, record, tag=ref.tag, storage_key=key, frozen_tag=frozen is not None)
    except MissingReferences as exc:
        raise ManifestBlobUnknown({"blobs": exc.blobs, "manifests": exc.manifests}) from None
    except TagFrozen as exc:
        raise Denied(
            {"tag": exc.tag, "digest": exc.digest, "rule": frozen},
            message=f"tag {exc.tag} is immutable (rule: {frozen}) and cannot be moved",
            refused_by="immutability",
            rule=frozen,
            audit={"digest": digest},  # the manifest refused; the tag keeps exc.digest
        ) from None
    svc.manifests.put(digest, body)
    headers = {
        "Location": url(request, f"/v2/{name}/manifests/{digest}"),
        "Docker-Content-Digest": digest,
        "Content-Length": "0",
    }
    if parsed.subject:
        headers["OCI-Subject"] = parsed.subject
    return Response(status_code=201, headers=headers)


async def check_deletable(svc: Services, name: str, ref: Reference) -> None:
    """DENIED if the deletion would remove an immutable tag."""
    immutability = svc.policies.immutability
    if not immutability:
        return
    if ref.tag is not None:
        tags = [ref.tag]
    else:
        tags = [t for t, r in (await svc.metadata.tag_records(name)).items() if r.digest == str(ref.digest)]
    for tag in tags:
        rule = immutability.rule_for(name, tag)
        if rule is not None:
            if ref.digest is not None:
                digest: str | None = str(ref.digest)
            else:
                record = await svc.metadata.get_tag(name, tag)
                digest = record.digest if record is not None else None
            raise Denied(
                {"tag": tag, "rule": rule},
                message=f"tag {tag} is immutable (rule: {rule}) and cannot be deleted",
                refused_by="immutability",
                rule=rule,
                audit={"digest": digest},
            )


async def delete_manifest(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    ref = _existing_reference(request)
    if not svc.config.storage.delete.enabled:
        raise Unsupported({"reason": "deletion is disabled (storage.delete.enabled)"})
    await check_deletable(svc, name, ref)
    if ref.tag is not None:
        deleted = await svc.metadata.delete_tag(name, ref.tag)
        if deleted is None:
            raise ManifestUnknown({"tag": ref.tag})
        note(request.scope, digest=deleted.digest)
    elif not await svc.metadata.delete_manifest(name, str(ref.digest)):
        raise ManifestUnknown({"digest": str(ref.digest)})
    return Response(status_code=202, headers={"Content-Length": "0"})
