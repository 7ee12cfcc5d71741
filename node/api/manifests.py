"""Manifest HEAD, GET, PUT and DELETE, by tag or by digest."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable

from starlette.requests import Request
from starlette.responses import Response

from coordinator.metadata import BeingCollected, ManifestRecord, MissingReferences, TagFrozen
from coordinator.uploads import CommitIntent, UploadSession

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

log = logging.getLogger("wharf.manifests")


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
        if manifests.compute_digest(body, digest.split(":", 1)[0]) != digest and not _schema1(body):
            # Bit rot or a hand-edited file: never served as valid, and said loudly.
            svc.metrics.storage_corrupt.labels("manifest").inc()
            log.error("manifest %s in storage does not match its digest", digest, extra={"fields": {"digest": digest}})
            raise ManifestUnknown({"digest": digest, "reason": "the stored manifest does not match its digest"})
        svc.manifests.put(digest, body)
    return body


def _schema1(body: bytes) -> bool:
    """Signed schema1 manifests (adopted from registry:2) are named by their payload, not their bytes."""
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    return isinstance(doc, dict) and doc.get("schemaVersion") == 1


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
    parsed = manifests.parse(body, request.headers.get("content-type"), url_refused=svc.config.validation.url_refused)
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
    content = _ManifestContent(svc, name, digest, key, body)
    try:
        if await svc.storage.stat(key) != len(body):
            await content.write()
        await _record_manifest(svc, name, record, ref.tag, content, frozen)
    except BaseException:
        await content.reclaim()
        raise
    svc.manifests.put(digest, body)
    headers = {
        "Location": url(request, f"/v2/{name}/manifests/{digest}"),
        "Docker-Content-Digest": digest,
        "Content-Length": "0",
    }
    if parsed.subject:
        headers["OCI-Subject"] = parsed.subject
    return Response(status_code=201, headers=headers)


class _ManifestContent:
    """A manifest's bytes in storage, written only under an intent record.

    Content goes first, then the records that make it visible, so a reader never finds a record
    whose bytes are missing. The upload session written before the bytes names them, so bytes a
    crash leaves unrecorded are reclaimed by the purge, and those of a refused manifest right here.
    """

    def __init__(self, svc: Services, repository: str, digest: str, key: str, body: bytes) -> None:
        self.svc, self.repository, self.digest, self.key, self.body = svc, repository, digest, key, body
        self.intent: UploadSession | None = None

    async def write(self) -> None:
        if self.intent is None:
            existed = await self.svc.storage.stat(self.key) is not None
            self.intent = await self.svc.sessions.create(
                self.svc.sessions.new_id(), self.repository, {}, commit=CommitIntent(self.digest, self.key, existed)
            )
        await self.svc.storage.write_bytes(self.key, self.body)

    async def reclaim(self) -> None:
        if self.intent is not None:
            await self.svc.uploader.reclaim(self.intent, self.key)


async def _record_manifest(
    svc: Services, name: str, record: ManifestRecord, tag: str | None, content: _ManifestContent, frozen: str | None
) -> None:
    def put() -> Awaitable[None]:
        return svc.metadata.put_manifest(
            name,
            record,
            tag=tag,
            storage_key=content.key,
            frozen_tag=frozen is not None,
            intent=content.intent,
        )

    try:
        try:
            await put()
        except BeingCollected:
            # Garbage collection was deleting these very bytes: wait, store them again, retry.
            await svc.metadata.wait_collected(record.digest)
            await content.write()
            await put()
    except MissingReferences as exc:
        raise ManifestBlobUnknown({"blobs": exc.blobs, "manifests": exc.manifests}) from None
    except TagFrozen as exc:
        raise Denied(
            {"tag": exc.tag, "digest": exc.digest, "rule": frozen},
            message=f"tag {exc.tag} is immutable (rule: {frozen}) and cannot be moved",
            refused_by="immutability",
            rule=frozen,
            audit={"digest": record.digest},  # the manifest refused; the tag keeps exc.digest
        ) from None


async def check_deletable(svc: Services, name: str, ref: Reference) -> None:
    """DENIED if the deletion would remove an immutable tag."""
    immutability = svc.policies.immutability
    if not immutability:
        return
    if ref.tag is not None:
        tags = [ref.tag]
    else:
        tags = list(await svc.metadata.tags_of_digest(name, str(ref.digest)))
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
