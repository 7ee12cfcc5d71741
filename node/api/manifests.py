"""Manifest HEAD, GET, PUT and DELETE, by tag or by digest."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from coordinator.kv import Op
from coordinator.metadata import BeingCollected, ManifestRecord, MissingReferences, RepositoryDeleting, TagFrozen
from coordinator.uploads import CommitIntent, UploadSession

from .. import cosign
from .. import manifest as manifests
from ..config import SignaturePolicy
from ..context import note
from ..errors import (
    BeingDeleted,
    Denied,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestTooLarge,
    ManifestUnknown,
    TagInvalid,
    Unsupported,
)
from ..notifications import references
from ..numbers import whole_number
from ..reference import Reference, parse_reference
from ..services import Services
from ..storage import layout
from ..trust import Verdict
from ..upload import COLLECTED_TRIES, collected_busy
from .request import not_modified, repository, services, url

log = logging.getLogger("wharf.manifests")


def _existing_reference(request: Request) -> Reference:
    """The URL's reference for reading or deleting: a malformed tag cannot exist, so 404."""
    raw = request.path_params["reference"]
    try:
        return parse_reference(raw)
    except TagInvalid:
        raise ManifestUnknown({"reference": raw[:300]}) from None


async def manifest_bytes(svc: Services, digest: str) -> bytes:
    """A manifest's bytes by digest, from the cache or storage; MANIFEST_UNKNOWN if gone."""
    body = svc.manifests.get(digest)
    if body is None:
        try:
            key = layout.blob_key(digest)
            # With regions: from the nearest region that has it, while replication catches up.
            body = await (svc.regions.read_bytes(digest, key) if svc.regions else svc.storage.read_bytes(key))
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


async def _resolve(
    request: Request, svc: Services, name: str, *, pull: bool = False
) -> tuple[str, str, str | None, _Policy | None]:
    """(digest, media type, tag if named by one, the signature policy a pull must pass) of the
    manifest a URL names, or MANIFEST_UNKNOWN.

    For a `pull` (GET) in a repository under a signature policy, the marks of the verdict this node
    holds are checked in the same coordinator read as the tag or record, so a verified pull makes no
    extra round trip and a deleted signature counts at once.
    """
    ref = _existing_reference(request)
    rule = svc.trust.rule_for(name) if pull else None
    held = svc.trust.held(name, digest=str(ref.digest) if ref.digest else None, tag=ref.tag) if rule else None
    marks = held.marks if held is not None else ()
    if ref.tag is not None:
        tag, unchanged = await svc.metadata.get_tag_checked(name, ref.tag, marks)
        if tag is None:
            raise ManifestUnknown({"tag": ref.tag})
        digest, media_type = tag.digest, tag.media_type
        if not manifests.accepts(request.headers.getlist("accept"), media_type):
            raise ManifestUnknown(
                {"tag": ref.tag, "reason": f"the manifest is {media_type}, which the Accept header does not admit"}
            )
    else:
        digest = str(ref.digest)
        found, unchanged = await svc.metadata.manifest_media_type_checked(name, digest, marks)
        if found is None:
            raise ManifestUnknown({"digest": digest})
        media_type = found
    policy = _Policy(rule, held if unchanged else None) if rule is not None else None
    return digest, media_type, ref.tag, policy


async def _pull_through(request: Request, svc: Services, name: str) -> None:
    """A manifest of a cached repository: fetched on a miss, its tag asked about past the TTL."""
    if svc.proxy.covers(name):
        await svc.proxy.manifest(request, name, _existing_reference(request))


@dataclass(frozen=True)
class _Policy:
    """The signature policy a pull must pass, and the verdict this node held (if still current)."""

    rule: SignaturePolicy
    held: Verdict | None


async def _check_pull(
    request: Request,
    svc: Services,
    rule: SignaturePolicy,
    name: str,
    digest: str,
    body: bytes,
    tag: str | None,
    held: Verdict | None,
) -> None:
    """Apply the repository's signature policy to one pull: DENIED if it refuses, a warning if it warns."""
    decision = await svc.trust.decide(rule, name, digest, body, tag=tag, held=held)
    state = request.scope.setdefault("state", {})
    state["signature"] = decision.audit_fields  # for the audit line
    if decision.outcome == "refused":
        state["signature"] = {**decision.audit_fields, "digest": digest}  # no Docker-Content-Digest header
        raise Denied(
            {"rule": rule.name, "repository": name, "digest": digest, "reason": decision.how},
            message=f"pull of {name}@{digest} refused by signature policy {rule.name}: {decision.how}",
            refused_by="signature",
            rule=rule.name,
        )
    if decision.outcome == "warned":
        log.warning(
            "serving %s@%s without a valid signature (signature policy %s, mode warn)",
            name,
            digest,
            rule.name,
            extra={"fields": {"repository": name, "digest": digest, "rule": rule.name}},
        )


def _headers(digest: str, media_type: str, size: int) -> dict[str, str]:
    return {
        "Docker-Content-Digest": digest,
        "Content-Type": media_type,
        "Content-Length": str(size),
        "ETag": f'"{digest}"',
    }


def _not_modified(digest: str) -> Response:
    return Response(status_code=304, headers={"Docker-Content-Digest": digest, "ETag": f'"{digest}"'})


async def _pulled(
    request: Request, svc: Services, name: str, digest: str, media_type: str, tag: str | None, body: bytes
) -> None:
    """Record the pull for notifications (as Distribution, for GET and HEAD alike)."""
    notifier = svc.notifier
    if notifier.enabled and notifier.wants("pull", media_type):
        refs = references(body) if notifier.include_references else ()
        await notifier.record(
            notifier.manifest(request, "pull", name, digest, media_type, len(body), tag=tag, references=refs)
        )


async def head_manifest(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    await _pull_through(request, svc, name)
    digest, media_type, tag, _ = await _resolve(request, svc, name)
    if not_modified(request, digest):
        return _not_modified(digest)
    body = await manifest_bytes(svc, digest)
    await _pulled(request, svc, name, digest, media_type, tag, body)
    return Response(headers=_headers(digest, media_type, len(body)))


async def get_manifest(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    await _pull_through(request, svc, name)
    digest, media_type, tag, policy = await _resolve(request, svc, name, pull=True)
    if policy is not None:
        # Refused whether or not the client holds the bytes already.
        body = await manifest_bytes(svc, digest)
        await _check_pull(request, svc, policy.rule, name, digest, body, tag, policy.held)
    # A pull, whether or not the client held the bytes already; last-pulled times go out in batches.
    if not_modified(request, digest):
        svc.pulls.record(name, digest)
        return _not_modified(digest)
    body = await manifest_bytes(svc, digest)
    svc.pulls.record(name, digest)
    await _pulled(request, svc, name, digest, media_type, tag, body)
    return Response(body, headers=_headers(digest, media_type, len(body)))


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    length = whole_number(declared) if declared is not None else None
    if length is not None and length > manifests.MAX_MANIFEST_BYTES:
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
    record = manifests.record_of(parsed, digest, len(body), time.time())
    frozen = svc.policies.immutability.rule_for(name, ref.tag) if ref.tag is not None else None
    if ref.tag is not None:
        await _check_signed_tag(svc, name, ref.tag, digest, body)
    key = layout.blob_key(digest)
    content = _ManifestContent(svc, name, digest, key, body)
    notifier = svc.notifier
    events = []
    if notifier.wants("push", parsed.media_type):
        refs = references(body) if notifier.include_references else ()
        pushed = notifier.manifest(
            request, "push", name, digest, parsed.media_type, len(body), tag=ref.tag, references=refs
        )
        events = notifier.ops(pushed)
    if svc.regions is not None:
        # This region's copy, and the copies the others still need: recorded with the manifest.
        events = [*events, *await svc.regions.placed(digest, len(body), key)]
    try:
        stored = await svc.uploader.stat(key)
        if stored != len(body):
            await content.write(existed=stored is not None)
        await _record_manifest(svc, name, record, ref.tag, content, frozen, events)
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


async def _check_signed_tag(svc: Services, name: str, tag: str, digest: str, body: bytes) -> None:
    """DENIED if a policy with `requiresignedtags` covers the repository and the image is unsigned."""
    rule = svc.trust.rule_for(name)
    if rule is None or not rule.requiresignedtags or cosign.is_artifact_tag(tag) or not svc.trust.image(digest, body):
        return
    verdict = await svc.trust.verify(rule, name, digest)
    if not verdict.signed:
        svc.metrics.signature_tags_refused.labels(rule.name).inc()
        raise Denied(
            {"rule": rule.name, "tag": tag, "digest": digest, "reason": verdict.how},
            message=f"tag {tag} may point only at a signed image (signature policy {rule.name}): {verdict.how}",
            refused_by="signature",
            rule=rule.name,
        )


class _ManifestContent:
    """A manifest's bytes in storage, written only under an intent record.

    Content goes first, then the records that make it visible, so a reader never finds a record
    whose bytes are missing. The upload session written before the bytes names them, so bytes a
    crash leaves unrecorded are reclaimed by the purge, and those of a refused manifest right here.
    """

    def __init__(self, svc: Services, repository: str, digest: str, key: str, body: bytes) -> None:
        self.svc, self.repository, self.digest, self.key, self.body = svc, repository, digest, key, body
        self.intent: UploadSession | None = None

    async def write(self, *, existed: bool | None = None) -> None:
        """Write the bytes under an intent made first; `existed`: whether the caller just found an object there."""
        if self.intent is None:
            if existed is None:
                existed = await self.svc.storage.stat(self.key) is not None
            self.intent = await self.svc.sessions.create(
                self.svc.sessions.new_id(), self.repository, {}, commit=CommitIntent(self.digest, self.key, existed)
            )
        try:
            await self.svc.uploader.wait_to_write(self.digest)  # a refused twin's reclaim must not take them
        except BaseException:
            await self.reclaim()
            raise
        await self.svc.storage.write_bytes(self.key, self.body)

    async def reclaim(self) -> None:
        if self.intent is not None:
            await self.svc.uploader.reclaim(self.intent, self.key)


async def _record_manifest(
    svc: Services,
    name: str,
    record: ManifestRecord,
    tag: str | None,
    content: _ManifestContent,
    frozen: str | None,
    events: Sequence[Op] = (),
) -> None:
    def put() -> Awaitable[None]:
        return svc.metadata.put_manifest(
            name,
            record,
            tag=tag,
            storage_key=content.key,
            frozen_tag=frozen is not None,
            intent=content.intent,
            events=events,
        )

    try:
        for _ in range(COLLECTED_TRIES):
            try:
                await put()
                break
            except BeingCollected:
                # Garbage collection (or a refused twin's reclaim) was deleting these very bytes:
                # wait, store them again, retry.
                await svc.metadata.wait_collected(record.digest)
                await content.write()
        else:
            raise collected_busy(record.digest, "manifest")
    except MissingReferences as exc:
        raise ManifestBlobUnknown({"blobs": exc.blobs, "manifests": exc.manifests}) from None
    except RepositoryDeleting:
        raise BeingDeleted(name) from None
    except TagFrozen as exc:
        raise Denied(
            {"tag": exc.tag, "digest": exc.digest, "rule": frozen},
            message=f"tag {exc.tag} is immutable (rule: {frozen}) and cannot be moved",
            refused_by="immutability",
            rule=frozen,
            audit={"digest": record.digest},  # the manifest refused; the tag keeps exc.digest
        ) from None


async def delete_manifest(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    ref = _existing_reference(request)
    if not svc.config.storage.delete.enabled:
        raise Unsupported({"reason": "deletion is disabled (storage.delete.enabled)"})
    await svc.policies.immutability.check_delete(svc.metadata, name, ref)
    notifier = svc.notifier
    if ref.tag is not None:
        events = notifier.ops(notifier.deleted(request, name, tag=ref.tag)) if notifier.wants("delete") else []
        deleted = await svc.metadata.delete_tag(name, ref.tag, events=events)
        if deleted is None:
            raise ManifestUnknown({"tag": ref.tag})
        note(request.scope, digest=deleted.digest)
    elif not await svc.metadata.delete_manifest(
        name, str(ref.digest), events=notifier.delete_events(request, name, digest=str(ref.digest))
    ):
        raise ManifestUnknown({"digest": str(ref.digest)})
    return Response(status_code=202, headers={"Content-Length": "0"})
