"""Requests outside the route table (404, 405 with Allow) and HTTP/1.1 connection handling."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from api_suite import EMPTY_DIGEST, UUID
from oci_client import assert_error, read_response
from wharf_process import WharfProcess

UNKNOWN_ENDPOINTS = [
    ("GET", "/index.html"),
    ("GET", "/v3/"),
    ("GET", "/v2/library/ubuntu"),
    ("GET", "/v2/library/ubuntu/tags"),
    ("GET", "/v2/library/ubuntu/manifests/"),
    ("GET", "/v2/library/ubuntu/unknown/latest"),
    ("POST", "/v1/search"),
]

WRONG_METHODS = [
    ("PUT", "/v2/"),
    ("POST", "/v2/_catalog"),
    ("DELETE", "/v2/_catalog"),
    ("POST", "/v2/library/ubuntu/tags/list"),
    ("POST", "/v2/library/ubuntu/manifests/latest"),
    ("PATCH", "/v2/library/ubuntu/manifests/latest"),
    ("PUT", f"/v2/library/ubuntu/blobs/{EMPTY_DIGEST}"),
    ("POST", f"/v2/library/ubuntu/blobs/{EMPTY_DIGEST}"),
    ("PATCH", f"/v2/library/ubuntu/blobs/{EMPTY_DIGEST}"),
    ("GET", "/v2/library/ubuntu/blobs/uploads/"),
    ("PUT", "/v2/library/ubuntu/blobs/uploads/"),
    ("POST", f"/v2/library/ubuntu/blobs/uploads/{UUID}"),
    ("DELETE", f"/v2/library/ubuntu/referrers/{EMPTY_DIGEST}"),
    ("PUT", f"/v2/library/ubuntu/referrers/{EMPTY_DIGEST}"),
]


@pytest.mark.parametrize(("method", "path"), UNKNOWN_ENDPOINTS)
def test_unknown_endpoint_is_404_with_an_oci_error(http: httpx.Client, method: str, path: str) -> None:
    assert_error(http.request(method, path), 404, "UNSUPPORTED")


def test_the_root_answers_200_and_nothing_else_as_registry2_does(http: httpx.Client) -> None:
    # Orchestrators' probes written for registry:2 ask `/`.
    for method in ("GET", "HEAD"):
        root = http.request(method, "/")
        assert root.status_code == 200 and root.content == b"", root.text
        assert root.headers["cache-control"] == "no-cache"
    assert_error(http.request("POST", "/"), 405, "UNSUPPORTED")


@pytest.mark.parametrize(("method", "path"), WRONG_METHODS)
def test_wrong_method_is_405_with_an_oci_error(http: httpx.Client, method: str, path: str) -> None:
    assert_error(http.request(method, path), 405, "UNSUPPORTED")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", "/v2/", {"GET"}),
        ("POST", "/v2/library/ubuntu/manifests/latest", {"GET", "HEAD", "PUT", "DELETE"}),
        ("PUT", f"/v2/library/ubuntu/blobs/{EMPTY_DIGEST}", {"GET", "HEAD", "DELETE"}),
        ("POST", f"/v2/library/ubuntu/blobs/uploads/{UUID}", {"GET", "PATCH", "PUT", "DELETE"}),
    ],
)
def test_405_lists_the_allowed_methods(http: httpx.Client, method: str, path: str, allowed: set[str]) -> None:
    """RFC 9110 15.5.6: a 405 response MUST carry an Allow header with the methods the resource supports."""
    response = http.request(method, path)
    assert_error(response, 405, "UNSUPPORTED")
    assert "allow" in response.headers, dict(response.headers)
    assert allowed <= {m.strip().upper() for m in response.headers["allow"].split(",")}


# -- HTTP/1.1 connection handling ---------------------------------------------------------------


def test_connection_is_not_dropped_silently_after_an_early_error(wharf: WharfProcess) -> None:
    """RFC 9112 9.6: a server that closes a connection after a response says `Connection: close` in it.

    The registry answers some requests before reading their body (a bad name here). When the body
    arrives after that answer, the connection must stay usable or be announced as closing; otherwise
    a client that reuses it (httpx, Go's net/http) fails its next request with "server disconnected".
    """
    head = (
        f"PATCH /v2/Bad/blobs/uploads/{UUID} HTTP/1.1\r\nHost: {wharf.host}\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 4\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", wharf.port), timeout=10) as sock:
        sock.sendall(head)
        first = read_response(sock)
        assert first is not None
        status, headers, body = first
        assert status == 400
        assert json.loads(body)["errors"][0]["code"] == "NAME_INVALID"
        try:
            sock.sendall(b"body" + f"GET /v2/ HTTP/1.1\r\nHost: {wharf.host}\r\n\r\n".encode())
            second = read_response(sock)
        except OSError:
            second = None
    announced = "close" in headers.get("connection", "").lower()
    assert announced or (second is not None and second[0] == 200), (
        f"connection closed without `Connection: close` in the response: {headers}"
    )
