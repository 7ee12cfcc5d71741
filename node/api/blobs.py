"""Blob HEAD, GET (with Range) and DELETE."""

from __future__ import annotations

import re

from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse

from ..errors import BlobUnknown, RangeInvalid, Unsupported
from ..reference import parse_digest
from .common import repository, services

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


class _BlobFile(FileResponse):
    chunk_size = 1 << 20


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for a single range; None means the whole blob."""
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        if "," in header:
            return None  # several ranges: answered with the whole blob, as RFC 9110 allows
        raise RangeInvalid({"range": header[:100]}, headers={"Content-Range": f"bytes */{size}"})
    first_text, last_text = match.groups()
    if first_text == "" and last_text == "":
        raise RangeInvalid({"range": header[:100]}, headers={"Content-Range": f"bytes */{size}"})
    if first_text == "":
        suffix = int(last_text)
        if suffix == 0:
            raise RangeInvalid({"range": header[:100]}, headers={"Content-Range": f"bytes */{size}"})
        return max(size - suffix, 0), size - 1
    first = int(first_text)
    last = int(last_text) if last_text else size - 1
    if first > last or first >= size:
        raise RangeInvalid({"range": header[:100]}, headers={"Content-Range": f"bytes */{size}"})
    return first, min(last, size - 1)


async def _linked_size(request: Request) -> tuple[str, str, int]:
    name = repository(request)
    digest = str(parse_digest(request.path_params["digest"]))
    svc = services(request)
    link = await svc.metadata.get_link(name, digest)
    if link is None:
        raise BlobUnknown({"digest": digest})
    if link.corrupt:
        # Never served as valid: a client told it is unknown uploads it again, which repairs it.
        raise BlobUnknown({"digest": digest, "reason": "the stored bytes do not match the digest; push it again"})
    # A client told that a blob exists will not upload it again: keep it past the next GC.
    await svc.touches.touch(digest)
    return name, digest, link.size


def _headers(digest: str, size: int) -> dict[str, str]:
    return {
        "Docker-Content-Digest": digest,
        "Content-Length": str(size),
        "Accept-Ranges": "bytes",
        "ETag": f'"{digest}"',
        "Cache-Control": "max-age=31536000",
    }


async def head_blob(request: Request) -> Response:
    _, digest, size = await _linked_size(request)
    return Response(status_code=200, headers=_headers(digest, size), media_type="application/octet-stream")


async def get_blob(request: Request) -> Response:
    _, digest, size = await _linked_size(request)
    svc = services(request)
    key = await svc.blobs.key(digest)
    if not svc.config.storage.redirect.disable:
        target = await svc.storage.redirect_url(key)
        if target is not None:
            return RedirectResponse(target, status_code=307, headers={"Docker-Content-Digest": digest})
    requested = request.headers.get("range")
    span = _byte_range(requested, size) if requested else None
    if span is None:
        path = svc.storage.local_path(key)
        if path is not None:
            return _BlobFile(
                path, headers=_headers(digest, size), media_type="application/octet-stream", stat_result=None
            )
        return StreamingResponse(
            svc.storage.read(key), headers=_headers(digest, size), media_type="application/octet-stream"
        )
    first, last = span
    headers = _headers(digest, last - first + 1)
    headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    return StreamingResponse(
        svc.storage.read(key, first, last - first + 1),
        status_code=206,
        headers=headers,
        media_type="application/octet-stream",
    )


async def delete_blob(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    digest = str(parse_digest(request.path_params["digest"]))
    if not svc.config.storage.delete.enabled:
        raise Unsupported({"reason": "deletion is disabled (storage.delete.enabled)"})
    if not await svc.metadata.unlink_blob(name, digest, quotas=svc.policies.quota_scopes(name)):
        raise BlobUnknown({"digest": digest})
    return Response(status_code=202, headers={"Content-Length": "0"})
