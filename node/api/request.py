"""A handler's request: its services, validated path parameters, paging, conditional headers, URLs."""

from __future__ import annotations

from urllib.parse import quote

from starlette.requests import Request

from ..errors import PaginationNumberInvalid
from ..numbers import whole_number
from ..reference import validate_name
from ..services import Services


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def repository(request: Request) -> str:
    return validate_name(request.path_params["name"])


def url(request: Request, path: str) -> str:
    """A URL for a Location or Link header: under `http.prefix`, absolute when `http.host` is set
    (unless `http.relativeurls`), else relative, which every client since Docker 1.8 resolves."""
    http = services(request).config.http
    relative = http.prefix.rstrip("/") + path
    return relative if http.relativeurls or not http.host else http.host + relative


def not_modified(request: Request, digest: str) -> bool:
    """Whether If-None-Match names the ETag Wharf sends for `digest` (strong, weak, in a list, or `*`)."""
    header = request.headers.get("if-none-match")
    if header is None:
        return False
    quoted = f'"{digest}"'
    for candidate in header.split(","):
        tag = candidate.strip()
        if tag.startswith("W/"):
            tag = tag[2:]
        # Distribution also takes the bare digest.
        if tag == "*" or tag == quoted or tag == digest:
            return True
    return False


def page_size(request: Request, *, default: int | None, maximum: int) -> int | None:
    """The `n` query parameter: a non-negative whole number, clamped to `maximum`."""
    raw = request.query_params.get("n")
    if raw is None or raw == "":
        return default
    n = whole_number(raw)
    if n is None:
        raise PaginationNumberInvalid({"n": raw[:100]})
    return min(n, maximum)


def next_link(path: str, n: int, last: str) -> str:
    return f'<{path}?n={n}&last={quote(last, safe="")}>; rel="next"'
