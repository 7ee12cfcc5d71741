"""OCI distribution error codes as exceptions, and the one handler that renders them."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The checks that refuse requests, as the audit log names them in `refused_by`. Each raises a
# RegistryError with `refused_by` (and `rule`: which rule or limit) and is audited with nothing more
# to do: a read-only mode, for one, refuses with `refused_by="readonly"`.
REFUSERS = ("signin", "access", "quota", "immutability", "ratelimit", "readonly", "signature")

# Where the error a request was answered with is kept in scope["state"], for its audit line.
ERROR_KEY = "wharf.error"


class RegistryError(Exception):
    """An error the client sees as an OCI error body.

    `refused_by` and `rule` say which check refused the request and by which rule or limit;
    `audit` holds further facts for its audit line (the digest refused, the user who failed to
    sign in). None of them reaches the client.
    """

    code = "UNKNOWN"
    status = 500
    message = "unknown error"

    def __init__(
        self,
        detail: Any = None,
        *,
        message: str | None = None,
        headers: dict[str, str] | None = None,
        refused_by: str | None = None,
        rule: str | None = None,
        audit: dict[str, Any] | None = None,
    ):
        super().__init__(message or self.message)
        self.detail = detail
        if message is not None:
            self.message = message
        self.headers = headers or {}
        assert refused_by is None or refused_by in REFUSERS, refused_by
        self.refused_by = refused_by
        self.rule = rule
        self.audit = audit or {}

    def body(self) -> bytes:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


class BlobUnknown(RegistryError):
    code, status, message = "BLOB_UNKNOWN", 404, "blob unknown to registry"


class BlobUploadInvalid(RegistryError):
    code, status, message = "BLOB_UPLOAD_INVALID", 400, "blob upload invalid"


class UploadStateStale(RegistryError):
    """A URL handed out at an offset the upload has since moved past: resume from the Range given."""

    code, status, message = "BLOB_UPLOAD_INVALID", 416, "the upload moved on since this URL was handed out"


class BlobUploadUnknown(RegistryError):
    code, status, message = "BLOB_UPLOAD_UNKNOWN", 404, "blob upload unknown to registry"


class DigestInvalid(RegistryError):
    code, status, message = "DIGEST_INVALID", 400, "provided digest did not match uploaded content"


class ManifestBlobUnknown(RegistryError):
    code, status, message = "MANIFEST_BLOB_UNKNOWN", 400, "manifest references a manifest or blob unknown to registry"


class ManifestInvalid(RegistryError):
    code, status, message = "MANIFEST_INVALID", 400, "manifest invalid"


class ManifestUnknown(RegistryError):
    code, status, message = "MANIFEST_UNKNOWN", 404, "manifest unknown to registry"


class NameInvalid(RegistryError):
    code, status, message = "NAME_INVALID", 400, "invalid repository name"


class NameUnknown(RegistryError):
    code, status, message = "NAME_UNKNOWN", 404, "repository name not known to registry"


class SizeInvalid(RegistryError):
    code, status, message = "SIZE_INVALID", 400, "provided length did not match content length"


class TagInvalid(RegistryError):
    # The spec's table has no tag code; a tag that breaks the grammar makes the manifest PUT invalid.
    code, status, message = "MANIFEST_INVALID", 400, "invalid tag"


class Unauthorized(RegistryError):
    code, status, message = "UNAUTHORIZED", 401, "authentication required"


class Denied(RegistryError):
    code, status, message = "DENIED", 403, "requested access to the resource is denied"


class BeingDeleted(Denied):
    """A write into a repository that a whole-repository (or namespace) delete is removing right now."""

    def __init__(self, repository: str) -> None:
        super().__init__(
            {"repository": repository, "reason": "the repository is being deleted"},
            message=f"repository {repository} is being deleted; push again once the deletion is over",
        )


class Unsupported(RegistryError):
    code, status, message = "UNSUPPORTED", 405, "the operation is unsupported"


class QueryInvalid(RegistryError):
    # The spec's UNSUPPORTED covers "an invalid set of parameters"; Wharf's API answers it with 400.
    code, status, message = "UNSUPPORTED", 400, "invalid query parameter"


class TooManyRequests(RegistryError):
    code, status, message = "TOOMANYREQUESTS", 429, "too many requests"


class PaginationNumberInvalid(RegistryError):
    code, status, message = "PAGINATION_NUMBER_INVALID", 400, "invalid number of results requested"


class RangeInvalid(RegistryError):
    code, status, message = "RANGE_INVALID", 416, "invalid content range"


class ManifestTooLarge(RegistryError):
    code, status, message = "SIZE_INVALID", 413, "manifest exceeds the size limit"


class Unavailable(RegistryError):
    code, status, message = "UNAVAILABLE", 503, "service unavailable"


class InternalError(RegistryError):
    """The last-chance answer to a failure no handler expected (node/context.py logs its traceback)."""

    code, status, message = "UNKNOWN", 500, "internal server error"


def error_response(exc: RegistryError, method: str = "GET") -> Response:
    # The body's own length wins over any Content-Length an error borrowed from progress headers.
    headers = {k: v for k, v in exc.headers.items() if k.lower() != "content-length"}
    headers["Content-Type"] = "application/json; charset=utf-8"
    body = b"" if method == "HEAD" else exc.body()
    response = Response(body, status_code=exc.status, headers=headers)
    if method == "HEAD":
        response.headers["Content-Length"] = str(len(exc.body()))
    return response


async def send_error(exc: RegistryError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer with `exc` from ASGI middleware, kept for the audit line like a handler's error."""
    scope.setdefault("state", {})[ERROR_KEY] = exc
    await error_response(exc, scope["method"])(scope, receive, send)


async def handle_registry_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RegistryError)
    request.scope.setdefault("state", {})[ERROR_KEY] = exc
    return error_response(exc, request.method)


async def handle_contention(request: Request, exc: Exception) -> Response:
    """Records that kept changing under an optimistic transaction: nothing was half-written, retry."""
    error = TooManyRequests(
        {"reason": "concurrent changes to the same records kept winning; nothing was changed, retry"},
        message="the registry is busy with concurrent changes",
        headers={"Retry-After": "1"},
    )
    return error_response(error, request.method)


# An exception handler: the response that answers the exception, as Starlette's handlers give it.
Handler = Callable[[Request, Exception], Awaitable[Response]]


class HandledErrors:
    """ASGI: the application's exception handlers, around the router.

    It stands where Starlette's ExceptionMiddleware would, and answers as it would (a handler by the
    exception's class, or by an HTTPException's status), at less cost per request: the Request a
    handler takes is built only when one is needed. It also installs the handlers where Starlette's
    own route wrapper looks for them (plain-function routes, 405), so both ask the same ones.
    """

    def __init__(self, app: ASGIApp, handlers: Mapping[Any, Handler]) -> None:
        self.app = app
        self._by_class = {key: value for key, value in handlers.items() if not isinstance(key, int)}
        self._by_status = {key: value for key, value in handlers.items() if isinstance(key, int)}
        self._installed = (self._by_class, self._by_status)

    def _handler(self, exc: Exception) -> Handler | None:
        if isinstance(exc, HTTPException) and exc.status_code in self._by_status:
            return self._by_status[exc.status_code]
        for cls in type(exc).__mro__:
            if cls in self._by_class:
                return self._by_class[cls]
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope["starlette.exception_handlers"] = self._installed
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            if started:
                raise RuntimeError("an exception with a handler came after the response started") from exc
            response = await handler(Request(scope, receive, send), exc)
            await response(scope, receive, sending)
            exc.__traceback__ = None  # a reused exception would gather tracebacks across requests
