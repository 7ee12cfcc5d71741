"""Blob HEAD, GET (with Range) and DELETE."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import AsyncIterator, Callable

import anyio
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from ..errors import BlobUnknown, RangeInvalid, Unsupported
from ..notifications import BLOB_MEDIA_TYPE
from ..numbers import whole_number
from ..reference import parse_digest
from ..regions import Regions
from ..services import Services
from .request import not_modified, repository, services

log = logging.getLogger("wharf.blobs")

_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)


class _BlobFile(FileResponse):
    """A blob sent from a local file; a file gone from storage is BLOB_UNKNOWN, not a failed send."""

    chunk_size = 1 << 20

    def __init__(self, path: str, headers: dict[str, str], missing: Callable[[], BlobUnknown]) -> None:
        super().__init__(path, headers=headers, media_type="application/octet-stream", stat_result=None)
        self._missing = missing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The file is looked at once here anyway (for its headers): no extra call to find it gone.
        if self.stat_result is None:
            try:
                self.stat_result = await anyio.to_thread.run_sync(os.stat, self.path)
            except FileNotFoundError:
                raise self._missing() from None
            self.set_stat_headers(self.stat_result)
        if any(name == b"range" for name, _ in scope["headers"]):
            # Ranges were decided already (none applies: whole blob); the file sender must not redo it.
            scope = {**scope, "headers": [(n, v) for n, v in scope["headers"] if n != b"range"]}
        await super().__call__(scope, receive, send)


def _content_missing(svc: Services, name: str, digest: str, key: str) -> BlobUnknown:
    """A linked blob whose bytes are not in storage: say so for repair, answer as if it were unknown."""
    svc.metrics.blobs_missing.inc()
    log.error(
        "blob content missing from storage: %s in %s (key %s); push it again or restore the object",
        digest,
        name,
        key,
        extra={"fields": {"digest": digest, "repository": name, "key": key, "repair": "blob content missing"}},
    )
    return BlobUnknown({"digest": digest, "reason": "the blob's content is missing from storage"})


async def _stream(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


async def _opened(
    svc: Services, name: str, digest: str, key: str, offset: int, length: int | None
) -> AsyncIterator[bytes]:
    """The blob's bytes, its first chunk read before any header is sent (so a missing object is a 404)."""
    chunks = svc.storage.read(key, offset, length).__aiter__()
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        first = b""
    except FileNotFoundError:
        raise _content_missing(svc, name, digest, key) from None
    return _stream(first, chunks)


def _byte_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for a single range; None means the whole blob.

    A range in another unit than bytes is ignored, as RFC 9110 says: the whole blob is sent.
    """
    if not header.lstrip()[:6].lower().startswith("bytes="):
        return None
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        if "," in header:
            return None  # several ranges: answered with the whole blob, as RFC 9110 allows
        raise RangeInvalid({"range": header[:100]}, headers={"Content-Range": f"bytes */{size}"})
    first_text, last_text = match.groups()
    if first_text == "" and last_text == "":
        raise RangeInvalid({"range": header[:100]}, headers={"Content-Range": f"bytes */{size}"})
    if first_text == "":
        suffix = whole_number(last_text) or 0
        if suffix == 0:
            raise RangeInvalid({"range": header[:100]}, headers={"Content-Range": f"bytes */{size}"})
        return max(size - suffix, 0), size - 1
    first = whole_number(first_text) or 0
    last = whole_number(last_text) or 0 if last_text else size - 1
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


def _not_modified(digest: str) -> Response:
    return Response(
        status_code=304,
        headers={"Docker-Content-Digest": digest, "ETag": f'"{digest}"', "Cache-Control": "max-age=31536000"},
    )


async def _pulled(request: Request, svc: Services, name: str, digest: str, size: int) -> None:
    """Record the pull for notifications (as Distribution, for GET and HEAD alike)."""
    notifier = svc.notifier
    if notifier.enabled and notifier.wants("pull", BLOB_MEDIA_TYPE):
        await notifier.record(notifier.blob(request, "pull", name, digest, size))


async def _pulled_through(request: Request, *, head: bool) -> Response | None:
    """A blob of a cached repository that is not here yet, from its upstream (None: serve it as usual)."""
    svc = services(request)
    name = repository(request)
    if not svc.proxy.covers(name):
        return None
    digest = str(parse_digest(request.path_params["digest"]))
    return await svc.proxy.blob(request, name, digest, head=head, headers=_headers)


async def head_blob(request: Request) -> Response:
    fetched = await _pulled_through(request, head=True)
    if fetched is not None:
        return fetched
    name, digest, size = await _linked_size(request)
    if not_modified(request, digest):
        return _not_modified(digest)
    await _pulled(request, services(request), name, digest, size)
    return Response(status_code=200, headers=_headers(digest, size), media_type="application/octet-stream")


async def get_blob(request: Request) -> Response:
    fetched = await _pulled_through(request, head=False)
    if fetched is not None:
        return fetched
    name, digest, size = await _linked_size(request)
    if not_modified(request, digest):
        return _not_modified(digest)
    svc = services(request)
    key = await svc.blobs.key(digest)
    await _pulled(request, svc, name, digest, size)
    if svc.regions is not None:
        return await _get_from_regions(request, svc, svc.regions, name, digest, size, key)
    if not svc.config.storage.redirect.disable:
        target = await svc.storage.redirect_url(key)
        if target is not None:
            return RedirectResponse(target, status_code=307, headers={"Docker-Content-Digest": digest})
    requested = request.headers.get("range")
    span = _byte_range(requested, size) if requested else None
    if span is None:
        path = svc.storage.local_path(key)
        if path is not None:
            return _BlobFile(path, _headers(digest, size), lambda: _content_missing(svc, name, digest, key))
        return StreamingResponse(
            await _opened(svc, name, digest, key, 0, None),
            headers=_headers(digest, size),
            media_type="application/octet-stream",
        )
    first, last = span
    headers = _headers(digest, last - first + 1)
    headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    return StreamingResponse(
        await _opened(svc, name, digest, key, first, last - first + 1),
        status_code=206,
        headers=headers,
        media_type="application/octet-stream",
    )


async def _get_from_regions(
    request: Request, svc: Services, regions: Regions, name: str, digest: str, size: int, key: str
) -> Response:
    """A GET with regions: redirected to (or sent from) this region's copy; else streamed from the
    nearest region that has one, so a pull never fails because replication lags or a storage is down."""
    requested = request.headers.get("range")
    span = _byte_range(requested, size) if requested else None
    first, length = (0, None) if span is None else (span[0], span[1] - span[0] + 1)
    for place in await regions.places(digest, key):
        storage = place.region.storage
        try:
            if place.region.local and (not place.recorded or not place.region.up):
                # No copy record (a blob from before regions) or a failing storage: look before sending.
                if await storage.stat(place.key) is None:
                    continue
            if place.region.local and not svc.config.storage.redirect.disable:
                target = await storage.redirect_url(place.key)
                if target is not None:
                    return RedirectResponse(target, status_code=307, headers={"Docker-Content-Digest": digest})
            path = storage.local_path(place.key) if place.region.local and span is None else None
            if path is not None and os.path.isfile(path):
                return _BlobFile(path, _headers(digest, size), lambda: _content_missing(svc, name, digest, key))
            chunks = storage.read(place.key, first, length).__aiter__()
            try:
                head = await chunks.__anext__()
            except StopAsyncIteration:
                head = b""
        except FileNotFoundError:
            continue
        except Exception as exc:
            regions.failed(place.region, exc)
            continue
        regions.served(place.region)
        if span is None:
            return StreamingResponse(
                _stream(head, chunks), headers=_headers(digest, size), media_type="application/octet-stream"
            )
        headers = _headers(digest, span[1] - span[0] + 1)
        headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
        return StreamingResponse(
            _stream(head, chunks), status_code=206, headers=headers, media_type="application/octet-stream"
        )
    raise _content_missing(svc, name, digest, key)


async def delete_blob(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    digest = str(parse_digest(request.path_params["digest"]))
    if not svc.config.storage.delete.enabled:
        raise Unsupported({"reason": "deletion is disabled (storage.delete.enabled)"})
    notifier = svc.notifier
    events = notifier.ops(notifier.deleted(request, name, digest=digest)) if notifier.wants("delete") else []
    if not await svc.metadata.unlink_blob(name, digest, quotas=svc.policies.quota_scopes(name), events=events):
        raise BlobUnknown({"digest": digest})
    return Response(status_code=202, headers={"Content-Length": "0"})
