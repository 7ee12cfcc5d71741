"""Upload URLs' signed `_state`: stale URLs without Content-Range are refused before a byte is written,
forged ones with an OCI error; clients that follow each Location, reuse the first one with Content-Range,
or hold a URL without state all keep working."""

from __future__ import annotations

import functools
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, urlsplit

import httpx
from api_suite import upload_id
from oci_client import OCIClient, assert_error, digest_of, read_response
from wharf_process import WharfProcess

OCTETS = {"Content-Type": "application/octet-stream"}


def _with_digest(location: str, digest: str) -> str:
    """The closing PUT's URL, its state kept (httpx's `params=` would replace the whole query)."""
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


def _state(location: str) -> str:
    return parse_qs(urlsplit(location).query)["_state"][0]


def _without_state(location: str) -> str:
    return urlsplit(location).path


def _range(http: httpx.Client, location: str) -> str:
    status = http.get(location)
    assert status.status_code == 204, status.text
    return status.headers["Range"]


def _patch(http: httpx.Client, location: str, body: bytes, start: int | None = None) -> httpx.Response:
    headers = dict(OCTETS)
    if start is not None:
        headers["Content-Range"] = f"{start}-{start + len(body) - 1}"
    return http.patch(location, content=body, headers=headers)


def _finish(http: httpx.Client, location: str, repo: str, data: bytes) -> None:
    done = http.put(_with_digest(location, digest_of(data)))
    assert done.status_code == 201, done.text
    assert http.get(f"/v2/{repo}/blobs/{digest_of(data)}").content == data


def test_location_carries_a_state_signed_at_the_offset_it_was_handed_out(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    location = oci.start_upload(repo)
    assert _state(location).startswith("0.")
    patched = _patch(http, location, b"x" * 42)
    assert _state(patched.headers["Location"]).startswith("42.")
    assert _state(http.get(location).headers["Location"]) == _state(patched.headers["Location"])


def test_replayed_older_location_without_content_range_is_416_with_the_upload_range_and_writes_nothing(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    first, second = os.urandom(3000), os.urandom(2000)
    started = oci.start_upload(repo)
    one = _patch(http, started, first)
    assert one.status_code == 202, one.text
    two = _patch(http, one.headers["Location"], second)
    assert two.status_code == 202, two.text
    for stale in (started, one.headers["Location"]):  # the same chunk sent again through an older URL
        replayed = _patch(http, stale, second)
        assert_error(replayed, 416, "BLOB_UPLOAD_INVALID")
        assert replayed.headers["Range"] == f"0-{len(first) + len(second) - 1}"
        assert upload_id(replayed.headers["Location"]) == upload_id(started)
        assert _state(replayed.headers["Location"]) == _state(two.headers["Location"])
    assert _range(http, started) == f"0-{len(first) + len(second) - 1}"
    # The 416's Location continues the upload; the blob holds each chunk once.
    third = _patch(http, replayed.headers["Location"], b"tail")
    assert third.status_code == 202, third.text
    _finish(http, third.headers["Location"], repo, first + second + b"tail")


def test_replayed_chunk_with_its_content_range_is_416_range_invalid(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    data = os.urandom(2000)
    started = oci.start_upload(repo)
    assert _patch(http, started, data[:1000], 0).status_code == 202
    replayed = _patch(http, started, data[:1000], 0)
    assert_error(replayed, 416, "RANGE_INVALID")
    assert replayed.headers["Range"] == "0-999"
    assert _range(http, started) == "0-999"
    rest = _patch(http, replayed.headers["Location"], data[1000:], 1000)
    assert rest.status_code == 202, rest.text
    _finish(http, rest.headers["Location"], repo, data)


def test_every_chunk_sent_to_the_first_location_with_its_content_range_is_accepted(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    data = os.urandom(5000)
    started = oci.start_upload(repo)
    for start in range(0, len(data), 1000):
        patched = _patch(http, started, data[start : start + 1000], start)
        assert patched.status_code == 202, patched.text
        assert patched.headers["Range"] == f"0-{start + 999}"
    _finish(http, started, repo, data)  # and the closing PUT through it too


def test_closing_put_with_its_last_chunk_and_content_range_through_the_first_location_commits(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    data = os.urandom(3000)
    started = oci.start_upload(repo)
    assert _patch(http, started, data[:1000], 0).status_code == 202
    done = http.put(
        _with_digest(started, digest_of(data)),
        content=data[1000:],
        headers={**OCTETS, "Content-Range": f"1000-{len(data) - 1}"},
    )
    assert done.status_code == 201, done.text
    assert http.get(f"/v2/{repo}/blobs/{digest_of(data)}").content == data


def test_closing_put_without_any_body_headers_through_the_first_location_commits(
    http: httpx.Client, oci: OCIClient, repo: str, wharf: WharfProcess
) -> None:
    """No Content-Length, no Transfer-Encoding: no body (what `curl -X PUT` sends)."""
    data = os.urandom(2000)
    started = oci.start_upload(repo)
    assert _patch(http, started, data).status_code == 202
    with socket.create_connection(("127.0.0.1", wharf.port), timeout=10) as sock:
        target = _with_digest(started, digest_of(data))
        sock.sendall(f"PUT {target} HTTP/1.1\r\nHost: {wharf.host}\r\nConnection: close\r\n\r\n".encode())
        answer = read_response(sock)
    assert answer is not None and answer[0] == 201, answer
    assert http.get(f"/v2/{repo}/blobs/{digest_of(data)}").content == data


def test_closing_put_with_a_body_without_content_range_through_a_stale_location_is_416_and_commits_nothing(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    data = os.urandom(3000)
    started = oci.start_upload(repo)
    patched = _patch(http, started, data[:1000])
    wrong = http.put(_with_digest(started, digest_of(data[1000:])), content=data[1000:], headers=OCTETS)
    assert_error(wrong, 416, "BLOB_UPLOAD_INVALID")
    assert wrong.headers["Range"] == "0-999"
    assert http.head(f"/v2/{repo}/blobs/{digest_of(data[1000:])}").status_code == 404
    done = http.put(_with_digest(patched.headers["Location"], digest_of(data)), content=data[1000:], headers=OCTETS)
    assert done.status_code == 201, done.text
    assert http.get(f"/v2/{repo}/blobs/{digest_of(data)}").content == data


def test_forged_state_is_400_with_an_oci_error_and_changes_nothing(
    http: httpx.Client, oci: OCIClient, repo: str, repo2: str
) -> None:
    data = os.urandom(1500)
    started = oci.start_upload(repo)
    patched = _patch(http, started, data[:1000])
    offset, mac = _state(patched.headers["Location"]).split(".")
    path = _without_state(started)
    other = oci.start_upload(repo2)
    forged = [
        f"{path}?_state=1000.{'A' * len(mac)}",  # the right offset, a made-up signature
        f"{path}?_state=0.{mac}",  # another offset under the signature of 1000
        f"{path}?_state={_state(other)}",  # another upload's
        f"{path}?_state=garbage",
        f"{path}?_state=%C2%B2.{mac}",  # a digit that is not ASCII
        f"{path}?_state=",
    ]
    for url in forged:
        for response in (
            _patch(http, url, data[1000:]),
            _patch(http, url, data[1000:], 1000),
            http.put(_with_digest(url, digest_of(data)), content=data[1000:], headers=OCTETS),
            http.put(_with_digest(url, digest_of(data[:1000]))),
            http.get(url),
            http.delete(url),
        ):
            error = assert_error(response, 400, "BLOB_UPLOAD_INVALID")
            assert error["message"] and response.headers["Content-Type"].startswith("application/json")
    assert _range(http, started) == "0-999"
    for digest in (digest_of(data), digest_of(data[:1000])):
        assert http.head(f"/v2/{repo}/blobs/{digest}").status_code == 404
    done = http.put(_with_digest(patched.headers["Location"], digest_of(data)), content=data[1000:], headers=OCTETS)
    assert done.status_code == 201, done.text
    assert _range(http, other) == "0-0"  # the other upload was not touched either


def test_forged_state_on_an_upload_that_is_not_there_is_404_blob_upload_unknown(
    http: httpx.Client, oci: OCIClient, repo: str, repo2: str
) -> None:
    started = oci.start_upload(repo)
    ours = f"{_without_state(started)}?_state=0.{'A' * 22}"
    foreign = f"/v2/{repo2}/blobs/uploads/{upload_id(started)}?_state={_state(started)}"
    assert_error(_patch(http, foreign, b"data"), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(http.get(foreign), 404, "BLOB_UPLOAD_UNKNOWN")
    assert http.delete(started).status_code == 204
    for url in (ours, started):
        assert_error(_patch(http, url, b"data"), 404, "BLOB_UPLOAD_UNKNOWN")


def test_upload_resumes_from_the_location_a_status_get_gives(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    data = os.urandom(4000)
    started = oci.start_upload(repo)
    assert _patch(http, started, data[:2500]).status_code == 202  # its response lost, say
    status = http.get(started)  # through the stale URL: the upload as it stands
    assert status.status_code == 204
    assert status.headers["Range"] == "0-2499"
    assert _state(status.headers["Location"]).startswith("2500.")
    resumed = _patch(http, status.headers["Location"], data[2500:])
    assert resumed.status_code == 202, resumed.text
    _finish(http, resumed.headers["Location"], repo, data)


def test_patch_after_the_session_is_deleted_is_404_blob_upload_unknown(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    started = oci.start_upload(repo)
    patched = _patch(http, started, b"partial")
    assert http.delete(patched.headers["Location"]).status_code == 204
    for url in (started, patched.headers["Location"], _without_state(started)):
        assert_error(_patch(http, url, b"more"), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(_patch(http, url, b"more", 7), 404, "BLOB_UPLOAD_UNKNOWN")
        assert_error(
            http.put(_with_digest(url, digest_of(b"partialmore")), content=b"more"), 404, "BLOB_UPLOAD_UNKNOWN"
        )
    assert http.head(f"/v2/{repo}/blobs/{digest_of(b'partial')}").status_code == 404


def test_location_without_state_from_an_earlier_wharf_is_accepted(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    parts = [os.urandom(1200), os.urandom(800), os.urandom(300)]
    bare = _without_state(oci.start_upload(repo))
    for part in parts[:2]:  # streamed: each appends, as before upload URLs had state
        assert _patch(http, bare, part).status_code == 202
    with_range = _patch(http, bare, parts[2], 2000)
    assert with_range.status_code == 202, with_range.text
    assert _state(with_range.headers["Location"]).startswith("2300.")
    assert http.get(bare).headers["Range"] == "0-2299"
    _finish(http, bare, repo, b"".join(parts))


def test_digest_glued_with_a_second_question_mark_after_the_state_commits(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    """A script that appends `?digest=` to the Location, as it could while Locations had no query."""
    data = os.urandom(1000)
    patched = _patch(http, oci.start_upload(repo), data)
    done = http.put(f"{patched.headers['Location']}?digest={digest_of(data)}")
    assert done.status_code == 201, done.text
    assert http.get(f"/v2/{repo}/blobs/{digest_of(data)}").content == data


def _racing_patch(client: httpx.Client, *, location: str, body: bytes, start: int | None) -> httpx.Response:
    return _patch(client, location, body, start)


def _race(http: httpx.Client, calls: list[Callable[[httpx.Client], httpx.Response]]) -> list[httpx.Response]:
    """Every call at the same moment, each on its own connection."""
    barrier = threading.Barrier(len(calls))
    base = str(http.base_url)

    def run(call: Callable[[httpx.Client], httpx.Response]) -> httpx.Response:
        with httpx.Client(base_url=base, timeout=60) as client:
            client.get("/v2/")
            barrier.wait(10)
            return call(client)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def test_two_patches_racing_through_one_location_one_is_taken_the_other_refused_and_the_blob_is_right(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    for with_range in (False, True, False, True):
        head = os.urandom(700)
        started = oci.start_upload(repo)
        first = _patch(http, started, head)
        assert first.status_code == 202
        location = first.headers["Location"]
        bodies = [os.urandom(60_000), os.urandom(60_000)]
        start = len(head) if with_range else None
        calls = [functools.partial(_racing_patch, location=location, body=body, start=start) for body in bodies]
        racing = _race(http, calls)
        for response in racing:
            assert response.status_code in (202, 416), response.text
        taken = [body for body, response in zip(bodies, racing, strict=True) if response.status_code == 202]
        assert len(taken) == 1, [r.status_code for r in racing]
        refused = next(r for r in racing if r.status_code == 416)
        assert_error(refused, 416, "RANGE_INVALID" if with_range else "BLOB_UPLOAD_INVALID")
        assert refused.headers["Range"] == f"0-{len(head) + 60_000 - 1}"
        assert _range(http, started) == f"0-{len(head) + 60_000 - 1}"
        _finish(http, refused.headers["Location"], repo, head + taken[0])
