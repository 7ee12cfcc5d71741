"""Bad input (invalid names, tags, digests; odd headers, queries, paths, bodies): a 4xx with an OCI body, no 5xx."""

from __future__ import annotations

import json
import socket
import uuid
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from api_suite import DISTRIBUTION_CODES, EMPTY_DIGEST, UUID
from oci_client import (
    OCI_INDEX,
    OCI_MANIFEST,
    SPEC_ERROR_CODES,
    OCIClient,
    assert_error,
    digest_of,
    error_codes,
    raw_request,
    read_response,
)
from wharf_process import WharfProcess

# A whole number of 5,000 digits, past Python's limit for int() of a text.
HUGE = "9" * 5000
# (method, path after /v2/<name>) for every endpoint that takes a repository name.
NAMED_ENDPOINTS = [
    ("GET", "/tags/list"),
    ("GET", "/manifests/latest"),
    ("HEAD", "/manifests/latest"),
    ("PUT", "/manifests/latest"),
    ("DELETE", "/manifests/latest"),
    ("GET", f"/blobs/{EMPTY_DIGEST}"),
    ("HEAD", f"/blobs/{EMPTY_DIGEST}"),
    ("DELETE", f"/blobs/{EMPTY_DIGEST}"),
    ("POST", "/blobs/uploads/"),
    ("POST", f"/blobs/uploads/?digest={EMPTY_DIGEST}"),
    ("POST", f"/blobs/uploads/?mount={EMPTY_DIGEST}&from=library/base"),
    ("GET", f"/blobs/uploads/{UUID}"),
    ("PATCH", f"/blobs/uploads/{UUID}"),
    ("PUT", f"/blobs/uploads/{UUID}?digest={EMPTY_DIGEST}"),
    ("DELETE", f"/blobs/uploads/{UUID}"),
    ("GET", f"/referrers/{EMPTY_DIGEST}"),
]

INVALID_NAMES = {
    "uppercase": "Library/Ubuntu",
    "uppercase-component": "library/Ubuntu",
    "dot-dot-encoded": "library/%2E%2E/ubuntu",
    "dot-dot-component": "%2E%2E/ubuntu",
    "double-dot": "foo..bar",
    "leading-slash": "/library/ubuntu",
    "empty-component": "library//ubuntu",
    "trailing-slash": "library/ubuntu/",
    "leading-dash": "-library",
    "trailing-separator": "library_",
    "triple-underscore": "a___b",
    "space": "library%20ubuntu",
    "colon": "library:ubuntu",
    "at-sign": "library@ubuntu",
    "too-long": "a" * 256,
    "too-long-components": "/".join(["abcdefghij"] * 24),
}


def request_body(method: str) -> dict[str, Any]:
    if method in ("PUT", "PATCH", "POST"):
        return {"content": b"{}", "headers": {"Content-Type": OCI_MANIFEST}}
    return {}


@pytest.mark.parametrize(
    ("method", "suffix"), NAMED_ENDPOINTS, ids=[f"{m} {s.split('?')[0]}" for m, s in NAMED_ENDPOINTS]
)
@pytest.mark.parametrize("case", sorted(INVALID_NAMES))
def test_invalid_repository_name_is_name_invalid(http: httpx.Client, case: str, method: str, suffix: str) -> None:
    response = http.request(method, f"/v2/{INVALID_NAMES[case]}{suffix}", **request_body(method))
    assert_error(response, 400, "NAME_INVALID")


@pytest.mark.parametrize(
    "path", ["/v2/library/../ubuntu/tags/list", "/v2/../etc/tags/list", f"/v2/a/../b/blobs/{EMPTY_DIGEST}"]
)
def test_literal_dot_dot_in_name_is_name_invalid(wharf: WharfProcess, path: str) -> None:
    status, headers, body = raw_request("127.0.0.1", wharf.port, "GET", path)
    assert status == 400, body
    assert headers["content-type"].startswith("application/json")
    assert json.loads(body)["errors"][0]["code"] == "NAME_INVALID"


def test_name_of_255_characters_is_accepted(http: httpx.Client, oci: OCIClient) -> None:
    name = "n" + uuid.uuid4().hex[:10] + "/" + "a" * 243
    assert len(name) == 255
    oci.push_blob(name, b"long name")
    assert http.get(f"/v2/{name}/blobs/{digest_of(b'long name')}").content == b"long name"


INVALID_TAGS = {
    "leading-dash": "-tag",
    "leading-dot": ".tag",
    "too-long": "t" * 129,
    "bang": "tag!",
    "space": "tag%20x",
    "plus": "tag+x",
}


@pytest.mark.parametrize("case", sorted(INVALID_TAGS))
def test_invalid_tag_is_rejected(http: httpx.Client, oci: OCIClient, repo: str, case: str) -> None:
    image = oci.push_image(repo, "good")
    tag = INVALID_TAGS[case]
    response = oci.put_manifest(repo, tag, image.body, image.media_type)
    assert_error(response, 400, "TAG_INVALID", "MANIFEST_INVALID")
    for method in ("GET", "HEAD", "DELETE"):
        response = http.request(method, f"/v2/{repo}/manifests/{tag}")
        if response.status_code == 404:
            assert_error(response, 404, "MANIFEST_UNKNOWN")
        else:
            assert_error(response, 400, "TAG_INVALID", "MANIFEST_INVALID")
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] == ["good"]


def test_tag_of_128_characters_is_accepted(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    tag = "_" + "T" * 127
    image = oci.push_image(repo, tag)
    assert http.get(f"/v2/{repo}/manifests/{tag}").content == image.body


MALFORMED_DIGESTS = {
    "bad-hex": "sha256:xyz",
    "bad-digest-string": "sha256:baddigeststring",
    "md5": "md5:d41d8cd98f00b204e9800998ecf8427e",
    "short": "sha256:abcd",
    "long": EMPTY_DIGEST + "0",
    "uppercase": "sha256:" + EMPTY_DIGEST.split(":")[1].upper(),
    "empty-hex": "sha256:",
    "no-algorithm": ":" + EMPTY_DIGEST.split(":")[1],
    "unknown-algorithm": "sha3:" + EMPTY_DIGEST.split(":")[1],
    "no-colon": "sha256" + EMPTY_DIGEST.split(":")[1],
}
# Without a colon a manifest reference is a tag, not a digest.
COLON_DIGESTS = sorted(k for k, v in MALFORMED_DIGESTS.items() if ":" in v)


@pytest.mark.parametrize("case", sorted(MALFORMED_DIGESTS))
def test_malformed_digest_on_blob_endpoints_is_digest_invalid(
    http: httpx.Client, oci: OCIClient, repo: str, case: str
) -> None:
    digest = MALFORMED_DIGESTS[case]
    oci.push_blob(repo, b"present")
    for method in ("GET", "HEAD", "DELETE"):
        assert_error(http.request(method, f"/v2/{repo}/blobs/{digest}"), 400, "DIGEST_INVALID")
    assert_error(
        http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=b"x"), 400, "DIGEST_INVALID"
    )
    assert_error(http.post(f"/v2/{repo}/blobs/uploads/", params={"mount": digest, "from": repo}), 400, "DIGEST_INVALID")
    location = oci.start_upload(repo)
    assert_error(http.put(location, params={"digest": digest}, content=b"x"), 400, "DIGEST_INVALID")
    assert_error(http.get(f"/v2/{repo}/referrers/{digest}"), 400, "DIGEST_INVALID")


@pytest.mark.parametrize("case", COLON_DIGESTS)
def test_malformed_digest_on_manifest_endpoints_is_digest_invalid(
    http: httpx.Client, oci: OCIClient, repo: str, case: str
) -> None:
    digest = MALFORMED_DIGESTS[case]
    image = oci.push_image(repo, "v1")
    for method in ("GET", "HEAD", "DELETE"):
        assert_error(http.request(method, f"/v2/{repo}/manifests/{digest}"), 400, "DIGEST_INVALID")
    assert_error(oci.put_manifest(repo, digest, image.body, image.media_type), 400, "DIGEST_INVALID")


def test_digest_without_colon_is_a_tag_for_manifests(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    image = oci.push_image(repo, "v1")
    reference = MALFORMED_DIGESTS["no-colon"]
    assert_error(http.get(f"/v2/{repo}/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
    assert oci.put_manifest(repo, reference, image.body, image.media_type).status_code == 201


# -- bad input: anything else must be a 4xx with an OCI body, never a 5xx ----------------------


def assert_client_error(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (
        f"{response.request.method} {response.request.url}: {response.status_code} {response.text[:300]}"
    )
    if response.request.method != "HEAD":
        codes = error_codes(response)
        assert set(codes) <= SPEC_ERROR_CODES | DISTRIBUTION_CODES, codes


def test_odd_upload_headers_are_client_errors(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    # A number of thousands of digits is past what Python's int() takes from text (HUGE in node/numbers.py).
    for content_range in [
        "bytes */*",
        "abc",
        "5-2",
        "-",
        "0-",
        "0-99999999999999999999999",
        "1-0",
        "0-" + HUGE,
        "0-\xb2",
    ]:
        location = oci.start_upload(repo)
        response = http.patch(location, content=b"abc", headers={"Content-Range": content_range.encode("latin-1")})
        assert response.status_code in (202, 400, 416), (content_range, response.status_code, response.text)
        if response.status_code != 202:
            assert_client_error(response)
    location = oci.start_upload(repo)
    short = http.patch(location, content=b"abc", headers={"Content-Range": "0-9"})  # promises 10, sends 3
    assert_client_error(short)


@pytest.mark.parametrize(
    "header",
    [
        "bytes=abc",
        "items=0-1",
        "bytes=1-2,5-6",
        "bytes=",
        "bytes=-",
        "bytes=99999999999999999999999-",
        "bytes=0-" + HUGE,
        "bytes=" + HUGE + "-",
        "bytes=-" + HUGE,
        "bytes=\xb2-",
    ],
)
def test_odd_range_headers_are_not_server_errors(
    http: httpx.Client, repo: str, blob2k: tuple[str, bytes], header: str
) -> None:
    digest, data = blob2k
    response = http.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": header.encode("latin-1")})
    if response.status_code in (200, 206):
        return
    assert_error(response, 416, "RANGE_INVALID")


@pytest.mark.parametrize(
    "query",
    [
        {"n": "99999999999999999999999"},
        {"n": HUGE},
        {"n": "\u00b2"},  # '²': str.isdigit() says yes, int() says no
        {"n": "\u0661"},  # an Arabic-Indic one: int() reads it as 1, no client means it
        {"last": "\x7f"},
        {"last": "\x00"},
        {"last": "a" * 2000},
        {"n": ""},
        {"last": ""},
    ],
)
def test_odd_pagination_queries_are_not_server_errors(
    http: httpx.Client, repo: str, tagged: list[str], query: dict[str, str]
) -> None:
    for path in (f"/v2/{repo}/tags/list", "/v2/_catalog"):
        response = http.get(path, params=query)
        if response.status_code != 200:
            assert_client_error(response)


def test_manifest_json_a_go_client_cannot_read_is_manifest_invalid(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    image = oci.push_image(repo, None)
    text = image.body.decode().rstrip()
    assert text.endswith("}")
    layer_size = json.loads(text)["config"]["size"]
    bodies = {
        "NaN": text[:-1] + ', "x": NaN}',
        "Infinity": text[:-1] + ', "x": -Infinity}',
        "a size of 5000 digits": text.replace(f'"size":{layer_size}', f'"size":{HUGE}', 1).replace(
            f'"size": {layer_size}', f'"size": {HUGE}', 1
        ),
        "a byte order mark": "\ufeff" + text,
        "schemaVersion 2.0": text.replace('"schemaVersion":2', '"schemaVersion":2.0').replace(
            '"schemaVersion": 2', '"schemaVersion": 2.0'
        ),
        "a size past int64": text.replace(f'"size":{layer_size}', f'"size":{10**30}', 1).replace(
            f'"size": {layer_size}', f'"size": {10**30}', 1
        ),
    }
    for case, body in bodies.items():
        assert body != text, case
        response = http.put(
            f"/v2/{repo}/manifests/odd", content=body.encode(), headers={"Content-Type": image.media_type}
        )
        assert_error(response, 400, "MANIFEST_INVALID")
    utf16 = http.put(
        f"/v2/{repo}/manifests/odd", content=text.encode("utf-16"), headers={"Content-Type": image.media_type}
    )
    assert_error(utf16, 400, "MANIFEST_INVALID")
    assert http.get(f"/v2/{repo}/manifests/odd").status_code == 404  # none of them was stored
    # A field no client reads may hold any JSON number, as Go's decoder skips it: stored as sent.
    odd = (text[:-1] + ', "x": ' + HUGE + "}").encode()
    stored = http.put(f"/v2/{repo}/manifests/odd", content=odd, headers={"Content-Type": image.media_type})
    assert stored.status_code == 201, stored.text
    assert http.get(f"/v2/{repo}/manifests/odd", headers={"Accept": image.media_type}).content == odd


def test_manifest_put_with_odd_content_types_is_not_a_server_error(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    image = oci.push_image(repo, None)
    for content_type in ["", "text/plain", OCI_INDEX, "application/vnd.oci.image.manifest.v1+json; charset=utf-8"]:
        headers = {"Content-Type": content_type} if content_type else {}
        response = http.put(f"/v2/{repo}/manifests/odd", content=image.body, headers=headers)
        if response.status_code != 201:
            assert_client_error(response)
            assert error_codes(response)[0] == "MANIFEST_INVALID"


@pytest.mark.parametrize(
    "path",
    [
        "/v2/%ZZ/tags/list",
        "/v2/a%00b/tags/list",
        f"/v2/a/blobs/sha256:%00{EMPTY_DIGEST[8:]}",
        "/v2/a/manifests/%ff",
        "/v2/a/manifests/sha256:%ff",
        "/v2/a/referrers/%00",
        "/v2/a/blobs/uploads/%00",
        "/v2/_catalog?last=%ff%fe&n=%00",
        "/v2/a/tags/list?last=%ed%a0%80",
    ],
)
def test_undecodable_paths_and_queries_are_client_errors(wharf: WharfProcess, oci: OCIClient, path: str) -> None:
    oci.push_image("a", "v1")
    status, headers, body = raw_request("127.0.0.1", wharf.port, "GET", path)
    assert status < 500, body
    if status >= 400:
        assert headers["content-type"].startswith("application/json"), body
        assert json.loads(body)["errors"][0]["code"] in SPEC_ERROR_CODES | DISTRIBUTION_CODES


def _short_body(wharf: WharfProcess, head: str, declared: int, sent: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """Send a request whose body stops short of its Content-Length, close our side, read the answer."""
    with socket.create_connection(("127.0.0.1", wharf.port), timeout=30) as sock:
        request = f"{head} HTTP/1.1\r\nHost: {wharf.host}\r\nContent-Length: {declared}\r\n"
        sock.sendall(request.encode() + b"Content-Type: application/vnd.oci.image.manifest.v1+json\r\n\r\n" + sent)
        sock.shutdown(socket.SHUT_WR)
        return read_response(sock)


def test_body_shorter_than_its_content_length_is_400(
    http: httpx.Client, oci: OCIClient, wharf: WharfProcess, repo: str
) -> None:
    location = urlsplit(oci.start_upload(repo)).path
    cases = [
        f"PUT /v2/{repo}/manifests/v1",
        f"POST /v2/{repo}/blobs/uploads/?digest={digest_of(b'x' * 100)}",
        f"PATCH {location}",
    ]
    for head in cases:
        answer = _short_body(wharf, head, 100, b"x" * 40)
        assert answer is not None, head
        status, headers, body = answer
        assert status == 400, (head, status, body)
        assert json.loads(body)["errors"][0]["code"] == "SIZE_INVALID"
    assert_error(http.get(f"/v2/{repo}/manifests/v1", headers={"Accept": OCI_MANIFEST}), 404, "MANIFEST_UNKNOWN")
    assert_error(http.head(f"/v2/{repo}/blobs/{digest_of(b'x' * 100)}"), 404, "BLOB_UNKNOWN")
    # What did arrive of the chunk is kept: the client resumes from there.
    assert http.get(location).headers["Range"] == "0-39"
