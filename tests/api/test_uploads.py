"""Blob uploads: monolithic, POST then PUT, chunked PATCHes, status, cancel, restarts, and cross-repository mounts."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from api_suite import EMPTY_DIGEST, MIB, Backend, client_for, new_repo, upload_id
from oci_client import OCIClient, assert_error, digest_of
from services import wait_until
from wharf_process import WharfProcess


def test_single_post_with_digest_creates_blob(http: httpx.Client, repo: str) -> None:
    data = b"monolithic blob"
    digest = digest_of(data)
    response = http.post(
        f"/v2/{repo}/blobs/uploads/",
        params={"digest": digest},
        content=data,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    assert urlsplit(response.headers["Location"]).path == f"/v2/{repo}/blobs/{digest}"
    assert response.headers["Docker-Content-Digest"] == digest
    assert http.get(response.headers["Location"]).content == data


def test_post_then_put_uploads_blob(http: httpx.Client, repo: str) -> None:
    data = b"post then put"
    digest = digest_of(data)
    started = http.post(f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
    assert started.status_code == 202, started.text
    location = started.headers["Location"]
    assert started.headers["Docker-Upload-UUID"] in location
    finished = http.put(
        location, params={"digest": digest}, content=data, headers={"Content-Type": "application/octet-stream"}
    )
    assert finished.status_code == 201, finished.text
    assert urlsplit(finished.headers["Location"]).path == f"/v2/{repo}/blobs/{digest}"
    assert finished.headers["Docker-Content-Digest"] == digest
    assert http.get(f"/v2/{repo}/blobs/{digest}").content == data


def test_chunked_patches_with_content_range_then_put(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    data = bytes(range(256)) * 40
    chunks = [data[:3000], data[3000:7000], data[7000:]]
    location = oci.start_upload(repo)
    offset = 0
    for chunk in chunks:
        response = http.patch(
            location,
            content=chunk,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
            },
        )
        offset += len(chunk)
        assert response.status_code == 202, response.text
        assert response.headers["Range"] == f"0-{offset - 1}"
        assert response.headers["Docker-Upload-UUID"] == upload_id(response.headers["Location"])
        location = response.headers["Location"]
    finished = http.put(location, params={"digest": digest_of(data)}, headers={"Content-Length": "0"})
    assert finished.status_code == 201, finished.text
    assert http.get(f"/v2/{repo}/blobs/{digest_of(data)}").content == data


def test_final_chunk_may_come_with_the_closing_put(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    data = b"0123456789" * 100
    location = oci.start_upload(repo)
    first = http.patch(
        location, content=data[:600], headers={"Content-Range": "0-599", "Content-Type": "application/octet-stream"}
    )
    assert first.status_code == 202, first.text
    finished = http.put(
        first.headers["Location"],
        params={"digest": digest_of(data)},
        content=data[600:],
        headers={"Content-Range": f"600-{len(data) - 1}", "Content-Type": "application/octet-stream"},
    )
    assert finished.status_code == 201, finished.text
    assert http.get(f"/v2/{repo}/blobs/{digest_of(data)}").content == data


def test_closing_put_of_a_small_blob_cut_short_keeps_what_arrived(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    """A closing PUT whose body is a whole small blob is read before it is written; cut short, the
    bytes that arrived are kept as a PATCH's are, and the client resumes from there."""
    data = os.urandom(4000)
    location = urlsplit(oci.start_upload(repo))
    query = f"{location.query}&" if location.query else ""
    head = (
        f"PUT {location.path}?{query}digest={digest_of(data)} HTTP/1.1\r\n"
        f"Host: {http.base_url.host}\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", http.base_url.port or 80), timeout=10) as sock:
        sock.sendall(head + data[:1500])
        sock.shutdown(socket.SHUT_WR)  # FIN after the last byte: all of them reach the server
        sock.recv(1)  # the server gives up on the body and closes (or answers)
    status = f"{location.path}?{location.query}" if location.query else location.path
    wait_until(lambda: http.get(status).headers.get("range") == "0-1499", timeout=15, what="the bytes that arrived")
    finished = http.put(
        status,
        params={"digest": digest_of(data)},
        content=data[1500:],
        headers={"Content-Range": f"1500-{len(data) - 1}", "Content-Type": "application/octet-stream"},
    )
    assert finished.status_code == 201, finished.text
    assert http.get(f"/v2/{repo}/blobs/{digest_of(data)}").content == data


def test_streamed_patch_without_content_range(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    parts = [b"streamed " * 1000, b"and more " * 500]

    def body(part: bytes) -> Iterator[bytes]:
        for i in range(0, len(part), 700):
            yield part[i : i + 700]

    location = oci.start_upload(repo)
    total = 0
    for part in parts:
        response = http.patch(location, content=body(part), headers={"Content-Type": "application/octet-stream"})
        total += len(part)
        assert response.status_code == 202, response.text
        assert response.headers["Range"] == f"0-{total - 1}"
        location = response.headers["Location"]
    data = b"".join(parts)
    finished = http.put(location, params={"digest": digest_of(data)})
    assert finished.status_code == 201, finished.text
    assert http.get(f"/v2/{repo}/blobs/{digest_of(data)}").content == data


def test_out_of_order_chunk_is_416_and_upload_can_resume(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    data = b"abcdefghij" * 3
    location = oci.start_upload(repo)
    first = http.patch(
        location, content=data[:10], headers={"Content-Range": "0-9", "Content-Type": "application/octet-stream"}
    )
    assert first.status_code == 202
    location = first.headers["Location"]

    for start, end in [(20, 29), (0, 9), (5, 14)]:  # skipping ahead, rewinding, overlapping
        skipped = http.patch(
            location,
            content=data[start : end + 1],
            headers={"Content-Range": f"{start}-{end}", "Content-Type": "application/octet-stream"},
        )
        assert_error(skipped, 416, "RANGE_INVALID")
        assert skipped.headers["Range"] == "0-9"
        assert upload_id(skipped.headers["Location"]) == upload_id(location)

    status = http.get(location)
    assert status.status_code == 204
    assert status.headers["Range"] == "0-9"
    rest = http.patch(
        status.headers["Location"],
        content=data[10:],
        headers={"Content-Range": "10-29", "Content-Type": "application/octet-stream"},
    )
    assert rest.status_code == 202, rest.text
    finished = http.put(rest.headers["Location"], params={"digest": digest_of(data)})
    assert finished.status_code == 201, finished.text
    assert http.get(f"/v2/{repo}/blobs/{digest_of(data)}").content == data


def test_out_of_order_final_chunk_in_put_is_416(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    data = b"0123456789" * 2
    location = oci.start_upload(repo)
    first = http.patch(
        location, content=data[:10], headers={"Content-Range": "0-9", "Content-Type": "application/octet-stream"}
    )
    assert first.status_code == 202
    wrong = http.put(
        first.headers["Location"],
        params={"digest": digest_of(data)},
        content=data[5:],
        headers={"Content-Range": "5-19", "Content-Type": "application/octet-stream"},
    )
    assert_error(wrong, 416, "RANGE_INVALID")
    assert wrong.headers["Range"] == "0-9"
    assert http.head(f"/v2/{repo}/blobs/{digest_of(data)}").status_code == 404


def test_upload_status_reports_range_and_uuid(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    location = oci.start_upload(repo)
    http.patch(location, content=b"x" * 42, headers={"Content-Type": "application/octet-stream"})
    status = http.get(location)
    assert status.status_code == 204
    assert status.content == b""
    assert status.headers["Range"] == "0-41"
    assert status.headers["Docker-Upload-UUID"] == upload_id(location)
    assert upload_id(status.headers["Location"]) == upload_id(location)


def test_cancelled_upload_is_unknown_afterwards(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    location = oci.start_upload(repo)
    http.patch(location, content=b"partial", headers={"Content-Type": "application/octet-stream"})
    cancelled = http.delete(location)
    assert cancelled.status_code == 204
    assert_error(http.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(http.patch(location, content=b"more"), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(http.put(location, params={"digest": digest_of(b"partial")}), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(http.delete(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert http.head(f"/v2/{repo}/blobs/{digest_of(b'partial')}").status_code == 404


def test_finished_upload_session_is_gone(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    location = oci.start_upload(repo)
    assert http.put(location, params={"digest": digest_of(b"done")}, content=b"done").status_code == 201
    assert_error(http.get(location), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(http.patch(location, content=b"late"), 404, "BLOB_UPLOAD_UNKNOWN")


def test_digest_mismatch_at_put_is_rejected_and_nothing_is_visible(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    data, claimed = b"actual bytes", digest_of(b"other bytes")
    location = oci.start_upload(repo)
    assert http.patch(location, content=data).status_code == 202
    assert_error(http.put(location, params={"digest": claimed}), 400, "DIGEST_INVALID")
    assert_error(http.head(f"/v2/{repo}/blobs/{claimed}"), 404, "BLOB_UNKNOWN")
    assert_error(http.get(f"/v2/{repo}/blobs/{claimed}"), 404, "BLOB_UNKNOWN")
    assert_error(http.get(f"/v2/{repo}/blobs/{digest_of(data)}"), 404, "BLOB_UNKNOWN")


def test_digest_mismatch_on_single_post_is_rejected_and_nothing_is_visible(http: httpx.Client, repo: str) -> None:
    data, claimed = b"single post bytes", digest_of(b"something else")
    response = http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": claimed}, content=data)
    assert_error(response, 400, "DIGEST_INVALID")
    assert_error(http.get(f"/v2/{repo}/blobs/{claimed}"), 404, "BLOB_UNKNOWN")
    assert_error(http.get(f"/v2/{repo}/blobs/{digest_of(data)}"), 404, "BLOB_UNKNOWN")


def test_closing_put_without_digest_is_400(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    location = oci.start_upload(repo)
    assert_error(http.put(location, content=b"no digest"), 400, "DIGEST_INVALID")


def test_upload_session_of_another_repository_is_unknown(
    http: httpx.Client, oci: OCIClient, repo: str, repo2: str
) -> None:
    location = oci.start_upload(repo)
    foreign = f"/v2/{repo2}/blobs/uploads/{upload_id(location)}"
    assert_error(http.get(foreign), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(http.patch(foreign, content=b"data"), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(http.put(foreign, params={"digest": digest_of(b"data")}, content=b"data"), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(http.delete(foreign), 404, "BLOB_UPLOAD_UNKNOWN")
    # The session is untouched in its own repository.
    finished = http.put(location, params={"digest": digest_of(b"mine")}, content=b"mine")
    assert finished.status_code == 201, finished.text


@pytest.mark.parametrize("upload", ["5f0c9a4e-8d1b-4c2e-9a7f-3b6d2e1c0a94", "not-a-uuid", "%2E%2E"])
def test_unknown_upload_id_is_404(http: httpx.Client, repo: str, upload: str) -> None:
    path = f"/v2/{repo}/blobs/uploads/{upload}"
    assert_error(http.get(path), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(http.patch(path, content=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(http.put(path, params={"digest": digest_of(b"x")}, content=b"x"), 404, "BLOB_UPLOAD_UNKNOWN")
    assert_error(http.delete(path), 404, "BLOB_UPLOAD_UNKNOWN")


def test_empty_blob_can_be_pushed_both_ways(http: httpx.Client, oci: OCIClient, repo: str, repo2: str) -> None:
    assert http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": EMPTY_DIGEST}, content=b"").status_code == 201
    location = oci.start_upload(repo2)
    assert http.put(location, params={"digest": EMPTY_DIGEST}).status_code == 201
    for name in (repo, repo2):
        head = http.head(f"/v2/{name}/blobs/{EMPTY_DIGEST}")
        assert head.status_code == 200
        assert head.headers["Content-Length"] == "0"
        assert http.get(f"/v2/{name}/blobs/{EMPTY_DIGEST}").content == b""


def test_same_blob_pushed_twice_and_into_two_repositories(
    http: httpx.Client, oci: OCIClient, repo: str, repo2: str
) -> None:
    data = b"shared layer"
    for name in (repo, repo, repo2):
        assert oci.push_blob(name, data) == digest_of(data)
    for name in (repo, repo2):
        assert http.get(f"/v2/{name}/blobs/{digest_of(data)}").content == data


def test_large_blob_in_mebibyte_chunks_reads_back_whole_and_by_range(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    data = bytes((i * 31 + i // 4096) % 256 for i in range(5 * MIB + 123))
    location = oci.start_upload(repo)
    for start in range(0, len(data), MIB):
        chunk = data[start : start + MIB]
        response = http.patch(location, content=chunk, headers={"Content-Range": f"{start}-{start + len(chunk) - 1}"})
        assert response.status_code == 202, response.text
        location = response.headers["Location"]
    assert http.put(location, params={"digest": digest_of(data)}).status_code == 201
    path = f"/v2/{repo}/blobs/{digest_of(data)}"
    assert http.get(path).content == data
    first, last = MIB - 10, 3 * MIB + 10  # across the server's read chunks
    ranged = http.get(path, headers={"Range": f"bytes={first}-{last}"})
    assert ranged.status_code == 206
    assert ranged.content == data[first : last + 1]


def test_upload_continues_after_a_restart(tmp_path: Path, backend: Backend) -> None:
    """Nothing an upload needs lives in one process's memory."""
    data = b"before restart|after restart"
    with WharfProcess(tmp_path / "restart", **backend.settings()) as process:
        with client_for(process) as client:
            location = OCIClient(client).start_upload("restart/repo")
            assert client.patch(location, content=data[:15], headers={"Content-Range": "0-14"}).status_code == 202
        process.restart()
        with client_for(process) as client:
            assert client.get(location).headers["Range"] == "0-14"
            finished = client.put(
                location,
                params={"digest": digest_of(data)},
                content=data[15:],
                headers={"Content-Range": f"15-{len(data) - 1}"},
            )
            assert finished.status_code == 201, finished.text
            assert client.get(f"/v2/restart/repo/blobs/{digest_of(data)}").content == data


def test_blob_push_with_sha512_is_supported_or_refused_with_400(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    """Spec, pushing blobs: a digest of an unsupported algorithm SHOULD get 400 Bad Request.

    And a session opened with `digest-algorithm=sha512` (end-4c) must not accept the bytes only to
    refuse the digest at the end.
    """
    data = b"sha512 blob"
    digest = digest_of(data, "sha512")
    single = http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest}, content=data)
    if single.status_code == 201:
        assert http.get(f"/v2/{repo}/blobs/{digest}").content == data
    else:
        assert_error(single, 400, "DIGEST_INVALID", "UNSUPPORTED")
    started = http.post(
        f"/v2/{repo}/blobs/uploads/", params={"digest-algorithm": "sha512"}, headers={"Content-Length": "0"}
    )
    if started.status_code == 400:
        assert_error(started, 400, "DIGEST_INVALID", "UNSUPPORTED")
        return
    assert started.status_code == 202, started.text
    finished = http.put(started.headers["Location"], params={"digest": digest}, content=data)
    assert finished.status_code == 201, finished.text
    assert http.get(f"/v2/{repo}/blobs/{digest}").content == data


# -- cross-repository mounts --------------------------------------------------------------------


def test_cross_repository_mount_is_201(http: httpx.Client, repo: str, repo2: str, blob2k: tuple[str, bytes]) -> None:
    digest, data = blob2k
    mounted = http.post(f"/v2/{repo2}/blobs/uploads/", params={"mount": digest, "from": repo})
    assert mounted.status_code == 201, mounted.text
    assert urlsplit(mounted.headers["Location"]).path == f"/v2/{repo2}/blobs/{digest}"
    assert mounted.headers["Docker-Content-Digest"] == digest
    assert http.get(mounted.headers["Location"]).content == data


@pytest.mark.parametrize("source", ["without-blob", "nonexistent"])
def test_mount_that_cannot_be_done_falls_back_to_an_upload_session(
    http: httpx.Client, oci: OCIClient, repo: str, repo2: str, source: str
) -> None:
    data = b"not in the source"
    if source == "without-blob":
        oci.push_blob(repo, b"something else")
        source_repo = repo
    else:
        source_repo = new_repo()
    response = http.post(f"/v2/{repo2}/blobs/uploads/", params={"mount": digest_of(data), "from": source_repo})
    assert response.status_code == 202, response.text
    assert_error(http.head(f"/v2/{repo2}/blobs/{digest_of(data)}"), 404, "BLOB_UNKNOWN")
    finished = http.put(response.headers["Location"], params={"digest": digest_of(data)}, content=data)
    assert finished.status_code == 201, finished.text
    assert http.get(f"/v2/{repo2}/blobs/{digest_of(data)}").content == data


def test_mount_within_the_same_repository_is_201(http: httpx.Client, repo: str, blob2k: tuple[str, bytes]) -> None:
    digest, _ = blob2k
    response = http.post(f"/v2/{repo}/blobs/uploads/", params={"mount": digest, "from": repo})
    assert response.status_code == 201, response.text
    assert urlsplit(response.headers["Location"]).path == f"/v2/{repo}/blobs/{digest}"


def test_mount_of_a_deleted_blob_falls_back_to_an_upload_session(
    http: httpx.Client, repo: str, repo2: str, blob2k: tuple[str, bytes]
) -> None:
    digest, _ = blob2k
    assert http.delete(f"/v2/{repo}/blobs/{digest}").status_code == 202
    response = http.post(f"/v2/{repo2}/blobs/uploads/", params={"mount": digest, "from": repo})
    assert response.status_code == 202, response.text
    assert_error(http.head(f"/v2/{repo2}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
