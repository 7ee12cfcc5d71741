"""Blob uploads: POST (monolithic, session or mount), PATCH, PUT, GET status and DELETE."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response

from coordinator.uploads import UploadSession

from ..errors import BlobUploadInvalid, BlobUploadUnknown, DigestInvalid, RangeInvalid, SizeInvalid, UploadStateStale
from ..numbers import whole_number
from ..reference import parse_digest, validate_name
from ..upload import UploadMoved, check_algorithm
from ..uploadstate import PARAM, BadUploadState
from .request import repository, services, url

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_CONTENT_RANGE = re.compile(r"(?:bytes[ =])?([0-9]+)-([0-9]+)(?:/(?:[0-9]+|\*))?")


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    length = whole_number(raw)
    if length is None:
        raise SizeInvalid({"content-length": raw[:50]})
    return length


def _progress_headers(request: Request, session: UploadSession) -> dict[str, str]:
    state = services(request).uploader.states.sign(session)
    return {
        "Location": url(request, f"/v2/{session.repository}/blobs/uploads/{session.id}?{PARAM}={state}"),
        "Range": f"0-{max(session.offset - 1, 0)}",
        "Docker-Upload-UUID": session.id,
        "Content-Length": "0",
    }


def _committed(request: Request, name: str, digest: str) -> Response:
    return Response(
        status_code=201,
        headers={
            "Location": url(request, f"/v2/{name}/blobs/{digest}"),
            "Docker-Content-Digest": digest,
            "Content-Length": "0",
        },
    )


def _owner(request: Request) -> str:
    """Whose upload sessions these are, for the per-owner bound: the user, or the address."""
    user = request.scope.get("state", {}).get("user")
    if user:
        return f"user {user}"
    return f"address {request.client.host if request.client else 'unknown'}"


def _upload_id(request: Request) -> str:
    upload_id: str = request.path_params["uuid"]
    if not _UUID.fullmatch(upload_id):
        raise BlobUploadUnknown({"upload": upload_id[:100]})
    return upload_id


def _query(request: Request) -> dict[str, str]:
    """The query as the client meant it: a script that glued `?digest=...` onto a Location that
    already had a query (`?_state=S?digest=D`, worked while Locations had none) means both."""
    query = dict(request.query_params)
    state = query.get(PARAM)
    if state is not None and "?" in state:
        query[PARAM], _, rest = state.partition("?")
        for key, value in parse_qsl(rest):
            query.setdefault(key, value)
    return query


async def _url_offset(request: Request, name: str, upload_id: str) -> int | None:
    """The offset the request's URL was handed out at (None for a URL without state); refused if forged."""
    uploader = services(request).uploader
    await uploader.states.ready()  # the answer's Location is signed, whatever this URL carries
    state = _query(request).get(PARAM)
    if state is None:
        return None  # a URL from an earlier Wharf
    try:
        return uploader.states.offset(state, upload_id, name)
    except BadUploadState:
        await uploader.session(name, upload_id)  # an upload that is not (or no longer) there is unknown
        raise BlobUploadInvalid({"upload": upload_id, "reason": "the upload URL's state is not valid"}) from None


def _check_state(request: Request, session: UploadSession, offset: int | None, length: int | None) -> None:
    """416 when a body without Content-Range would land where its URL did not expect (node/uploadstate.py).

    A Content-Range says where its bytes go by itself and is checked against the upload alone; a
    request without a body (no Content-Length or 0, and not chunked) writes nothing anywhere.
    """
    body = length != 0 if length is not None else "transfer-encoding" in request.headers
    if body and offset is not None and offset != session.offset and "content-range" not in request.headers:
        raise UploadStateStale(
            {"upload": session.id, "url offset": offset, "offset": session.offset},
            headers=_progress_headers(request, session),
        )


async def _session(request: Request) -> UploadSession:
    """The upload the URL names (its state, if any, verified)."""
    name = repository(request)
    upload_id = _upload_id(request)
    await _url_offset(request, name, upload_id)
    return await services(request).uploader.session(name, upload_id)


async def start_upload(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    params = request.query_params
    mount = params.get("mount")
    if mount is not None:
        digest = str(parse_digest(mount))
        source = params.get("from")
        if source:
            validate_name(source)
            mounted = svc.notifier.blob_events(request, "mount", name, digest, source=source)
            if source != name and await svc.uploader.mount(name, digest, source, events=mounted):
                await svc.touches.touch(digest)
                return _committed(request, name, digest)
            if source == name and await svc.metadata.get_link(name, digest) is not None:
                await svc.touches.touch(digest)
                return _committed(request, name, digest)
        # Not mountable: an ordinary upload session instead, as the spec allows.
    elif params.get("digest") is not None:
        digest_param = parse_digest(params["digest"])
        check_algorithm(digest_param.algorithm)
        pushed = svc.notifier.blob_events(request, "push", name, str(digest_param))
        await svc.uploader.monolithic(
            name, digest_param, request.stream(), _content_length(request), _owner(request), events=pushed
        )
        return _committed(request, name, str(digest_param))
    if "digest-algorithm" in params:
        check_algorithm(params["digest-algorithm"])
    await svc.uploader.check_room(name)
    await svc.uploader.states.ready()
    session = await svc.uploader.start(name, _owner(request))
    return Response(status_code=202, headers=_progress_headers(request, session))


def _check_range(request: Request, session: UploadSession, length: int | None) -> int | None:
    """The chunk length a Content-Range promises; 416 when it does not continue the upload."""
    header = request.headers.get("content-range")
    if header is None:
        return length
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None:
        raise RangeInvalid({"content-range": header[:100]}, headers=_progress_headers(request, session))
    first, last = whole_number(match.group(1)) or 0, whole_number(match.group(2)) or 0
    if first != session.offset or last < first:
        raise RangeInvalid(
            {"content-range": header[:100], "offset": session.offset}, headers=_progress_headers(request, session)
        )
    if length is not None and length != last - first + 1:
        raise RangeInvalid(
            {"reason": "Content-Length does not match Content-Range"}, headers=_progress_headers(request, session)
        )
    return last - first + 1


def _moved(request: Request, exc: UploadMoved) -> RangeInvalid:
    """Another request moved the upload on: 416 with the offset to resume from."""
    return RangeInvalid(
        {"reason": "the upload moved on since this request began", "offset": exc.session.offset},
        headers=_progress_headers(request, exc.session),
    )


async def patch_upload(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    upload_id = _upload_id(request)
    offset = await _url_offset(request, name, upload_id)
    length = _content_length(request)
    promised = [length]

    def check(session: UploadSession) -> None:
        _check_state(request, session, offset, length)
        promised[0] = _check_range(request, session, length)

    # One coordinator transaction reads and claims the session; `check` refuses before a byte is written.
    claim = await svc.uploader.claim_checked(name, upload_id, check)
    session = await svc.uploader.append(claim, request.stream(), length=promised[0])
    return Response(status_code=202, headers=_progress_headers(request, session))


async def finish_upload(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    upload_id = _upload_id(request)
    offset = await _url_offset(request, name, upload_id)
    session = await svc.uploader.session(name, upload_id)
    raw_digest = _query(request).get("digest")
    if not raw_digest:
        raise DigestInvalid({"reason": "the digest query parameter is required to finish an upload"})
    digest = parse_digest(raw_digest)
    check_algorithm(digest.algorithm)
    length = _content_length(request)
    _check_state(request, session, offset, length)  # without a body, the digest alone decides
    if length != 0:
        length = _check_range(request, session, length)
    pushed = svc.notifier.blob_events(request, "push", session.repository, str(digest))
    try:
        await svc.uploader.finish(
            session, digest, request.stream() if length != 0 else None, length=length, events=pushed
        )
    except UploadMoved as exc:
        raise _moved(request, exc) from None
    return _committed(request, session.repository, str(digest))


async def upload_status(request: Request) -> Response:
    session = await _session(request)
    return Response(status_code=204, headers=_progress_headers(request, session))


async def cancel_upload(request: Request) -> Response:
    svc = services(request)
    session = await _session(request)
    await svc.uploader.cancel(session)
    return Response(status_code=204, headers={"Content-Length": "0"})
