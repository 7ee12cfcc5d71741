"""The OCI Distribution API over real HTTP, endpoint by endpoint, as the conformance suite sees it.

One `wharf serve` process serves the whole module, once per backend: embedded defaults (filesystem
storage, embedded coordinator), then S3 with the session's etcd: on moto, then on Ceph RGW. Every
test works in repositories of its own, named at random, so tests neither see nor disturb each other.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from oci_client import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    SPEC_ERROR_CODES,
    Image,
    OCIClient,
    assert_error,
    descriptor,
    digest_of,
    error_codes,
    manifest_bytes,
    raw_request,
    read_response,
)
from services import wait_until
from wharf_process import WharfProcess

# Codes a registry may answer with beyond the spec's table: Distribution's own, kept by Wharf.
DISTRIBUTION_CODES = {"RANGE_INVALID", "TAG_INVALID", "PAGINATION_NUMBER_INVALID"}
MIB = 1024 * 1024
EMPTY_DIGEST = digest_of(b"")
UNKNOWN_DIGEST = digest_of(b"never pushed anywhere")
LINK = re.compile(r'^<([^>]+)>;\s*rel="next"$')


class Backend:
    """Where a test's `wharf serve` keeps its content and metadata: the settings for WharfProcess.

    "embedded+filesystem" is the default configuration (storage and coordinator under the process's
    data dir). "etcd+s3" puts content in the session's S3 server (moto) and metadata in the session's
    etcd, each process under a root directory and key prefix of its own, removed when the module is
    done; "etcd+rgw" does the same on the session's Ceph RADOS Gateway.
    """

    def __init__(self, name: str, s3_server: Any = None, etcd: Any = None) -> None:
        self.name = name
        self.s3_server = s3_server
        self.etcd = etcd
        self._roots: list[str] = []
        self._prefixes: list[str] = []

    def settings(self, **storage: Any) -> dict[str, Any]:
        """WharfProcess keyword arguments for one process on this backend (`storage` keys override)."""
        if self.name == "embedded+filesystem":
            return {"storage": storage} if storage else {}
        token = uuid.uuid4().hex[:12]
        root, prefix = f"/api-{token}", f"/wharf-api-{token}/"
        self._roots.append(root)
        self._prefixes.append(prefix)
        s3 = dataclasses.asdict(self.s3_server.storage_config(root))
        return {
            # Blob GETs are served by the node, not redirected to a presigned URL: the suite checks
            # the registry's own answers (Docker-Content-Digest, ranges, 206/416) and a redirect
            # would hand those to the S3 server. test_cluster_haproxy.py covers redirects.
            "storage": {"s3": s3, "delete": {"enabled": True}, "redirect": {"disable": True}, **storage},
            "coordinator": {"etcd": {"endpoints": self.etcd.endpoints, "prefix": prefix}},
        }

    def cleanup(self) -> None:
        for root in self._roots:
            self.s3_server.remove_prefix(root.strip("/") + "/")
        if self._prefixes:
            from coordinator.etcd import EtcdKV

            endpoints = self.etcd.endpoints

            async def remove(prefix: str) -> None:
                kv = await EtcdKV.open(endpoints, prefix=prefix)
                try:
                    await kv.delete("", prefix=True)
                finally:
                    await kv.close()

            for prefix in self._prefixes:
                asyncio.run(remove(prefix))


# Each S3 variant's server: moto, and a real Ceph RADOS Gateway.
S3_SERVERS = {"etcd+s3": "s3_server", "etcd+rgw": "rgw_server"}


@pytest.fixture(scope="module", params=["embedded+filesystem", *S3_SERVERS])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param in S3_SERVERS:
        s3_server = request.getfixturevalue(S3_SERVERS[request.param])
        chosen = Backend(request.param, s3_server, request.getfixturevalue("etcd"))
    else:
        chosen = Backend(request.param)
    try:
        yield chosen
    finally:
        chosen.cleanup()


@pytest.fixture(scope="module")
def wharf(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[WharfProcess]:
    """Overrides conftest's per-test process: one process for this module is enough and faster."""
    with WharfProcess(tmp_path_factory.mktemp("wharf"), **backend.settings()) as process:
        yield process


def client_for(process: WharfProcess) -> httpx.Client:
    # One connection per request: the registry drops a kept-alive connection without saying so
    # after rejecting a request before its body arrived, which would make unrelated tests flaky.
    # test_connection_is_not_dropped_silently_after_an_early_error covers that on its own.
    return httpx.Client(base_url=process.url, trust_env=False, timeout=30, headers={"Connection": "close"})


@pytest.fixture(scope="module")
def http(wharf: WharfProcess) -> Iterator[httpx.Client]:
    with client_for(wharf) as client:
        yield client


@pytest.fixture(scope="module")
def oci(http: httpx.Client) -> OCIClient:
    return OCIClient(http)


def new_repo(prefix: str = "api") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def repo() -> str:
    return new_repo()


@pytest.fixture
def repo2() -> str:
    return new_repo()


def upload_id(location: str) -> str:
    return urlsplit(location).path.rstrip("/").rsplit("/", 1)[-1]


def next_link(response: httpx.Response) -> str | None:
    link = response.headers.get("link")
    if link is None:
        return None
    match = LINK.match(link)
    assert match, f"Link header is not RFC 5988 rel=next: {link!r}"
    return match.group(1)


# -- base ---------------------------------------------------------------------------------------


def test_version_check_answers_200_with_api_version_header(http: httpx.Client) -> None:
    response = http.get("/v2/")
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert http.head("/v2/").status_code == 200


# -- blob uploads -------------------------------------------------------------------------------


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


@pytest.mark.parametrize("upload", [str(uuid.uuid4()), "not-a-uuid", "%2E%2E"])
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


# -- blob reads, delete and mount ---------------------------------------------------------------


@pytest.fixture
def blob2k(oci: OCIClient, repo: str) -> tuple[str, bytes]:
    """A 2048-byte blob in `repo`, as the conformance suite uses for range requests."""
    data = bytes((i * 7) % 251 for i in range(2048))
    oci.push_blob(repo, data)
    return digest_of(data), data


def test_head_and_get_blob_report_digest_and_length(http: httpx.Client, repo: str, blob2k: tuple[str, bytes]) -> None:
    digest, data = blob2k
    head = http.head(f"/v2/{repo}/blobs/{digest}")
    assert head.status_code == 200
    assert head.headers["Docker-Content-Digest"] == digest
    assert head.headers["Content-Length"] == str(len(data))
    assert head.content == b""
    get = http.get(f"/v2/{repo}/blobs/{digest}")
    assert get.status_code == 200
    assert get.headers["Docker-Content-Digest"] == digest
    assert get.headers["Content-Length"] == str(len(data))
    assert get.content == data


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=500-1499", 500, 1499),
        ("bytes=500-", 500, 2047),
        ("bytes=-500", 1548, 2047),
        ("bytes=2000-5000", 2000, 2047),
        ("bytes=0-0", 0, 0),
    ],
)
def test_blob_range_request_is_206_with_content_range(
    http: httpx.Client, repo: str, blob2k: tuple[str, bytes], header: str, first: int, last: int
) -> None:
    digest, data = blob2k
    response = http.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": header})
    assert response.status_code == 206, response.text
    assert response.headers["Content-Range"] == f"bytes {first}-{last}/2048"
    assert response.headers["Content-Length"] == str(last - first + 1)
    assert response.content == data[first : last + 1]


@pytest.mark.parametrize("header", ["bytes=5000-10000", "bytes=2048-", "bytes=500-0", "bytes=-0"])
def test_unsatisfiable_blob_range_is_416(http: httpx.Client, repo: str, blob2k: tuple[str, bytes], header: str) -> None:
    digest, _ = blob2k
    response = http.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": header})
    assert_error(response, 416, "RANGE_INVALID")
    assert response.headers["Content-Range"] == "bytes */2048"


# Forms of If-None-Match that name the ETag Wharf sends ('"<digest>"'), as clients and caches write them.
def _if_none_match_forms(digest: str) -> list[str]:
    return [f'"{digest}"', f'W/"{digest}"', f'"sha256:{"0" * 64}", W/"{digest}"', "*", digest]


def test_blob_get_and_head_with_its_etag_in_if_none_match_are_304(
    http: httpx.Client, repo: str, blob2k: tuple[str, bytes]
) -> None:
    digest, _ = blob2k
    etag = http.head(f"/v2/{repo}/blobs/{digest}").headers["ETag"]
    assert etag == f'"{digest}"'
    for header in _if_none_match_forms(digest):
        for method in ("GET", "HEAD"):
            response = http.request(method, f"/v2/{repo}/blobs/{digest}", headers={"If-None-Match": header})
            assert response.status_code == 304, (method, header, response.status_code)
            assert response.content == b""
            assert response.headers["ETag"] == etag
            assert response.headers["Docker-Content-Digest"] == digest


def test_blob_get_with_another_etag_in_if_none_match_is_200(
    http: httpx.Client, repo: str, blob2k: tuple[str, bytes]
) -> None:
    digest, data = blob2k
    other = f'"sha256:{"0" * 64}", W/"{digest}x"'
    response = http.get(f"/v2/{repo}/blobs/{digest}", headers={"If-None-Match": other})
    assert response.status_code == 200 and response.content == data


def test_if_none_match_star_of_an_unknown_blob_is_404(http: httpx.Client, repo: str) -> None:
    assert_error(http.get(f"/v2/{repo}/blobs/{UNKNOWN_DIGEST}", headers={"If-None-Match": "*"}), 404, "BLOB_UNKNOWN")


@pytest.mark.parametrize("header", ["items=0-9", "none", "lines=1-2", "bytes 0-9"])
def test_range_in_another_unit_is_ignored_and_the_whole_blob_sent(
    http: httpx.Client, repo: str, blob2k: tuple[str, bytes], header: str
) -> None:
    digest, data = blob2k
    response = http.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": header})
    assert response.status_code == 200, response.text
    assert "Content-Range" not in response.headers
    assert response.content == data


def test_range_unit_is_case_insensitive(http: httpx.Client, repo: str, blob2k: tuple[str, bytes]) -> None:
    digest, data = blob2k
    response = http.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "Bytes=10-19"})
    assert response.status_code == 206 and response.content == data[10:20]


def _remove_blob_content(wharf: WharfProcess, backend: Backend, digest: str) -> None:
    """Delete a blob's bytes behind the registry's back, as a bad copy or a careless operator would."""
    hex_digest = digest.split(":", 1)[1]
    key = f"docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
    storage = wharf.config["storage"]
    if "filesystem" in storage:
        Path(storage["filesystem"]["rootdirectory"], key).unlink()
        return
    client = backend.s3_server.client()
    try:
        root = storage["s3"]["rootdirectory"].strip("/")
        client.delete_object(Bucket=backend.s3_server.bucket, Key=f"{root}/{key}")
    finally:
        client.close()


def test_blob_whose_content_vanished_is_blob_unknown_and_reported(
    http: httpx.Client, oci: OCIClient, wharf: WharfProcess, backend: Backend, repo: str
) -> None:
    data = b"soon gone " * 1000
    digest = oci.push_blob(repo, data)
    _remove_blob_content(wharf, backend, digest)
    since = len(wharf.log_text())
    for headers in ({}, {"Range": "bytes=10-19"}):
        body = assert_error(http.get(f"/v2/{repo}/blobs/{digest}", headers=headers), 404, "BLOB_UNKNOWN")
        assert body["detail"]["digest"] == digest

    def reports() -> list[str]:
        return [line for line in wharf.log_text()[since:].splitlines() if "blob content missing" in line]

    wait_until(lambda: len(reports()) >= 2, timeout=10, what="two repair reports in the log")
    assert all(digest in line and repo in line for line in reports())
    metrics = httpx.get(wharf.metrics_url, timeout=10, trust_env=False).text
    assert re.search(r"^wharf_blobs_missing_total [1-9]", metrics, re.MULTILINE)
    # Pushed again, it is whole again.
    oci.push_blob(repo, data)
    assert http.get(f"/v2/{repo}/blobs/{digest}").content == data


def test_unknown_blob_is_404_blob_unknown(http: httpx.Client, repo: str) -> None:
    assert_error(http.head(f"/v2/{repo}/blobs/{UNKNOWN_DIGEST}"), 404, "BLOB_UNKNOWN")
    assert_error(http.get(f"/v2/{repo}/blobs/{UNKNOWN_DIGEST}"), 404, "BLOB_UNKNOWN")
    assert_error(http.delete(f"/v2/{repo}/blobs/{UNKNOWN_DIGEST}"), 404, "BLOB_UNKNOWN")


def test_blob_is_visible_only_in_its_repository(
    http: httpx.Client, repo: str, repo2: str, blob2k: tuple[str, bytes]
) -> None:
    digest, _ = blob2k
    assert http.head(f"/v2/{repo}/blobs/{digest}").status_code == 200
    assert_error(http.get(f"/v2/{repo2}/blobs/{digest}"), 404, "BLOB_UNKNOWN")


def test_deleted_blob_is_unknown(http: httpx.Client, repo: str, blob2k: tuple[str, bytes]) -> None:
    digest, _ = blob2k
    deleted = http.delete(f"/v2/{repo}/blobs/{digest}")
    assert deleted.status_code == 202, deleted.text
    assert_error(http.head(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    assert_error(http.get(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    assert_error(http.delete(f"/v2/{repo}/blobs/{digest}"), 404, "BLOB_UNKNOWN")


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


# -- manifests ----------------------------------------------------------------------------------


def push_kind(oci: OCIClient, repo: str, kind: str, reference: str | None) -> Image:
    if kind == "oci-manifest":
        return oci.push_image(repo, reference, annotations={"org.example": "value"})
    if kind == "docker-manifest":
        return oci.push_image(repo, reference, media_type=DOCKER_MANIFEST)
    if kind == "oci-index":
        children = [oci.push_image(repo, None, layers=[f"layer {i}".encode()]) for i in range(2)]
        return oci.push_index(repo, reference, children)
    children = [
        oci.push_image(repo, None, media_type=DOCKER_MANIFEST, layers=[f"docker layer {i}".encode()]) for i in range(2)
    ]
    return oci.push_index(repo, reference, children, media_type=DOCKER_LIST)


KINDS = ["oci-manifest", "oci-index", "docker-manifest", "docker-list"]


def assert_manifest_served(http: httpx.Client, repo: str, reference: str, image: Image) -> None:
    got = http.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": image.media_type})
    assert got.status_code == 200, got.text
    assert got.content == image.body
    assert got.headers["Content-Type"] == image.media_type
    assert got.headers["Docker-Content-Digest"] == image.digest
    assert got.headers["Content-Length"] == str(len(image.body))
    head = http.head(f"/v2/{repo}/manifests/{reference}", headers={"Accept": image.media_type})
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["Content-Type"] == image.media_type
    assert head.headers["Docker-Content-Digest"] == image.digest
    assert head.headers["Content-Length"] == str(len(image.body))


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_put_by_tag_is_served_byte_for_byte(http: httpx.Client, oci: OCIClient, repo: str, kind: str) -> None:
    image = push_kind(oci, repo, kind, "v1")
    response = oci.put_manifest(repo, "v1", image.body, image.media_type)  # the same PUT again is fine
    assert response.status_code == 201
    assert urlsplit(response.headers["Location"]).path in (
        f"/v2/{repo}/manifests/{image.digest}",
        f"/v2/{repo}/manifests/v1",
    )
    assert response.headers["Docker-Content-Digest"] == image.digest
    assert http.get(response.headers["Location"]).content == image.body
    assert_manifest_served(http, repo, "v1", image)
    assert_manifest_served(http, repo, image.digest, image)
    assert http.get(f"/v2/{repo}/tags/list").json() == {"name": repo, "tags": ["v1"]}


@pytest.mark.parametrize("kind", KINDS)
def test_manifest_put_by_digest_is_served_without_a_tag(
    http: httpx.Client, oci: OCIClient, repo: str, kind: str
) -> None:
    image = push_kind(oci, repo, kind, None)
    assert_manifest_served(http, repo, image.digest, image)
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] in ([], None)


def test_manifest_get_and_head_with_its_etag_in_if_none_match_are_304(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    image = oci.push_image(repo, "v1")
    for reference in ("v1", image.digest):
        path = f"/v2/{repo}/manifests/{reference}"
        etag = http.get(path, headers={"Accept": OCI_MANIFEST}).headers["ETag"]
        assert etag == f'"{image.digest}"'
        for header in _if_none_match_forms(image.digest):
            for method in ("GET", "HEAD"):
                response = http.request(method, path, headers={"Accept": OCI_MANIFEST, "If-None-Match": header})
                assert response.status_code == 304, (method, reference, header, response.status_code)
                assert response.content == b""
                assert response.headers["ETag"] == etag
        moved = http.get(path, headers={"Accept": OCI_MANIFEST, "If-None-Match": f'"{digest_of(b"old")}"'})
        assert moved.status_code == 200 and moved.content == image.body


def test_get_by_tag_honours_accept(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    image = oci.push_image(repo, "latest")
    excluded = http.get(f"/v2/{repo}/manifests/latest", headers={"Accept": DOCKER_MANIFEST})
    assert_error(excluded, 404, "MANIFEST_UNKNOWN")
    assert_error(
        http.head(f"/v2/{repo}/manifests/latest", headers={"Accept": DOCKER_MANIFEST}), 404, "MANIFEST_UNKNOWN"
    )
    several = http.get(
        f"/v2/{repo}/manifests/latest",
        headers=[("Accept", f"{DOCKER_MANIFEST}, {DOCKER_LIST}"), ("Accept", f"{OCI_INDEX}, {OCI_MANIFEST};q=0.9")],
    )
    assert several.status_code == 200, several.text
    assert several.content == image.body
    assert http.get(f"/v2/{repo}/manifests/latest", headers={"Accept": "*/*"}).content == image.body
    assert http.get(f"/v2/{repo}/manifests/latest").content == image.body


def test_unknown_manifest_is_404_manifest_unknown(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    oci.push_image(repo, "exists")
    for reference in ("missing", UNKNOWN_DIGEST):
        assert_error(http.get(f"/v2/{repo}/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
        assert_error(http.head(f"/v2/{repo}/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
        assert_error(http.delete(f"/v2/{repo}/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
    nowhere = new_repo()
    for reference in ("latest", UNKNOWN_DIGEST):
        assert_error(http.get(f"/v2/{nowhere}/manifests/{reference}"), 404, "MANIFEST_UNKNOWN", "NAME_UNKNOWN")


def image_doc(config_digest: str, layer_digests: list[str], **fields: Any) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": 2},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": 10} for d in layer_digests
        ],
        **fields,
    }


def test_manifest_with_unknown_blob_is_rejected_and_nothing_is_stored(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    config = oci.push_blob(repo, b"{}")
    body = manifest_bytes(image_doc(config, [UNKNOWN_DIGEST]))
    response = oci.put_manifest(repo, "broken", body, OCI_MANIFEST)
    error = assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    assert UNKNOWN_DIGEST in json.dumps(error)
    assert_error(http.get(f"/v2/{repo}/manifests/broken"), 404, "MANIFEST_UNKNOWN")
    assert_error(http.get(f"/v2/{repo}/manifests/{digest_of(body)}"), 404, "MANIFEST_UNKNOWN")
    assert "broken" not in (http.get(f"/v2/{repo}/tags/list").json().get("tags") or [])


def test_manifest_with_blob_of_another_repository_is_rejected(
    http: httpx.Client, oci: OCIClient, repo: str, repo2: str
) -> None:
    config = oci.push_blob(repo, b"{}")
    layer = oci.push_blob(repo2, b"elsewhere")
    response = oci.put_manifest(repo, "cross", manifest_bytes(image_doc(config, [layer])), OCI_MANIFEST)
    assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    assert_error(http.get(f"/v2/{repo}/manifests/cross"), 404, "MANIFEST_UNKNOWN")


def test_index_with_unknown_child_manifest_is_rejected(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    child = oci.push_image(repo, None)
    missing = {"mediaType": OCI_MANIFEST, "digest": UNKNOWN_DIGEST, "size": 100}
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor(OCI_MANIFEST, child.body), missing]}
    response = oci.put_manifest(repo, "multi", manifest_bytes(doc), OCI_INDEX)
    assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")
    assert_error(http.get(f"/v2/{repo}/manifests/multi"), 404, "MANIFEST_UNKNOWN")


SCHEMA1 = {
    "schemaVersion": 1,
    "name": "library/hello",
    "tag": "latest",
    "architecture": "amd64",
    "fsLayers": [{"blobSum": EMPTY_DIGEST}],
    "history": [{"v1Compatibility": "{}"}],
    "signatures": [],
}


@pytest.mark.parametrize(
    "content_type",
    [
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/json",
    ],
)
def test_schema1_manifest_is_rejected(http: httpx.Client, oci: OCIClient, repo: str, content_type: str) -> None:
    response = oci.put_manifest(repo, "old", json.dumps(SCHEMA1).encode(), content_type)
    error = assert_error(response, 400, "MANIFEST_INVALID")
    assert "schema1" in json.dumps(error).lower()
    assert_error(http.get(f"/v2/{repo}/manifests/old"), 404, "MANIFEST_UNKNOWN")


VALID_CONFIG = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": EMPTY_DIGEST, "size": 0}

INVALID_MANIFESTS = {
    "not-json": b"{this is not json",
    "not-utf8": b"\xff\xfe{}",
    "empty": b"",
    "array": b"[]",
    "string": b'"manifest"',
    "no-schema-version": json.dumps({"mediaType": OCI_MANIFEST, "config": VALID_CONFIG, "layers": []}).encode(),
    "schema-version-3": json.dumps(
        {"schemaVersion": 3, "mediaType": OCI_MANIFEST, "config": VALID_CONFIG, "layers": []}
    ).encode(),
    "unknown-media-type": json.dumps(
        {"schemaVersion": 2, "mediaType": "text/plain", "config": VALID_CONFIG, "layers": []}
    ).encode(),
    "no-config": json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode(),
    "layers-not-a-list": json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": VALID_CONFIG, "layers": {}}
    ).encode(),
    "layer-not-an-object": json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": VALID_CONFIG, "layers": [1]}
    ).encode(),
    "bad-descriptor-digest": json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {**VALID_CONFIG, "digest": "sha256:xyz"},
            "layers": [],
        }
    ).encode(),
    "negative-size": json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {**VALID_CONFIG, "size": -1}, "layers": []}
    ).encode(),
    "string-size": json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {**VALID_CONFIG, "size": "0"}, "layers": []}
    ).encode(),
    "index-without-manifests": json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX}).encode(),
    "annotations-not-strings": json.dumps(
        {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": VALID_CONFIG, "layers": [], "annotations": {"a": 1}}
    ).encode(),
    "bad-subject": json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": VALID_CONFIG,
            "layers": [],
            "subject": {"digest": "sha256:xyz", "size": 1},
        }
    ).encode(),
    "deeply-nested": b'{"schemaVersion": 2, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("case", sorted(INVALID_MANIFESTS))
def test_invalid_manifest_is_manifest_invalid(http: httpx.Client, oci: OCIClient, repo: str, case: str) -> None:
    oci.push_blob(repo, b"")  # so that only the manifest itself can be wrong
    response = oci.put_manifest(
        repo, "bad", INVALID_MANIFESTS[case], OCI_MANIFEST if case != "index-without-manifests" else OCI_INDEX
    )
    assert_error(response, 400, "MANIFEST_INVALID")
    assert_error(http.get(f"/v2/{repo}/manifests/bad"), 404, "MANIFEST_UNKNOWN")


def padded_manifest(config_digest: str, size: int) -> bytes:
    """An image manifest of exactly `size` bytes, padded with an annotation."""
    doc = image_doc(config_digest, [], annotations={"pad": ""})
    base = len(json.dumps(doc).encode())
    doc["annotations"]["pad"] = "x" * (size - base)
    body = json.dumps(doc).encode()
    assert len(body) == size
    return body


def test_manifest_of_4_mib_is_accepted(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    config = oci.push_blob(repo, b"{}")
    body = padded_manifest(config, 4 * MIB)
    response = oci.put_manifest(repo, "big", body, OCI_MANIFEST)
    assert response.status_code == 201, response.text
    assert http.get(f"/v2/{repo}/manifests/big").content == body


def test_image_with_130_layers_is_accepted(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    """The spec sets no limit on layers (artifacts often carry many files): a manifest is one record
    however many blobs it references, whatever the coordinator's limits on one transaction."""
    config = oci.push_blob(repo, b"{}")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        layers = list(pool.map(lambda i: oci.push_blob(repo, f"layer {i} of many".encode()), range(130)))
    body = manifest_bytes(image_doc(config, layers))
    response = oci.put_manifest(repo, "many", body, OCI_MANIFEST)
    assert response.status_code == 201, response.text
    assert http.get(f"/v2/{repo}/manifests/many").content == body


def test_manifest_over_4_mib_is_413(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    config = oci.push_blob(repo, b"{}")
    body = padded_manifest(config, 4 * MIB + 1)
    response = oci.put_manifest(repo, "huge", body, OCI_MANIFEST)
    assert_error(response, 413, "SIZE_INVALID", "MANIFEST_INVALID")
    assert_error(http.get(f"/v2/{repo}/manifests/huge"), 404, "MANIFEST_UNKNOWN")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold for a stream too
        yield from (body[i : i + MIB] for i in range(0, len(body), MIB))

    streamed = http.put(f"/v2/{repo}/manifests/huge", content=chunks(), headers={"Content-Type": OCI_MANIFEST})
    assert_error(streamed, 413, "SIZE_INVALID", "MANIFEST_INVALID")
    assert_error(http.get(f"/v2/{repo}/manifests/huge"), 404, "MANIFEST_UNKNOWN")


def test_put_by_digest_with_mismatching_body_is_digest_invalid(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    image = oci.push_image(repo, None)
    other = image.body.replace(b"\n", b"\n ", 1)
    response = oci.put_manifest(repo, image.digest, other, OCI_MANIFEST)
    assert_error(response, 400, "DIGEST_INVALID")
    assert_error(http.get(f"/v2/{repo}/manifests/{digest_of(other)}"), 404, "MANIFEST_UNKNOWN")
    assert http.get(f"/v2/{repo}/manifests/{image.digest}").content == image.body

    fresh = manifest_bytes(image_doc(oci.push_blob(repo, b"{}"), [], annotations={"fresh": "yes"}))
    claimed = digest_of(b"not this manifest")
    assert_error(oci.put_manifest(repo, claimed, fresh, OCI_MANIFEST), 400, "DIGEST_INVALID")
    assert_error(http.get(f"/v2/{repo}/manifests/{claimed}"), 404, "MANIFEST_UNKNOWN")
    assert_error(http.get(f"/v2/{repo}/manifests/{digest_of(fresh)}"), 404, "MANIFEST_UNKNOWN")


def test_manifest_with_subject_answers_oci_subject(oci: OCIClient, repo: str) -> None:
    subject = oci.push_image(repo, "app")
    config = oci.push_blob(repo, b"{}")
    doc = image_doc(
        config, [], artifactType="application/vnd.example.sbom.v1", subject=descriptor(OCI_MANIFEST, subject.body)
    )
    doc["config"]["mediaType"] = OCI_EMPTY
    response = oci.put_manifest(repo, digest_of(manifest_bytes(doc)), manifest_bytes(doc), OCI_MANIFEST)
    assert response.status_code == 201, response.text
    assert response.headers["OCI-Subject"] == subject.digest


def test_delete_manifest_by_digest_removes_it_and_its_tags(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    image = oci.push_image(repo, "one")
    oci.put_manifest(repo, "two", image.body, image.media_type)
    keeper = oci.push_image(repo, "keep", layers=[b"another"])
    deleted = http.delete(f"/v2/{repo}/manifests/{image.digest}")
    assert deleted.status_code == 202, deleted.text
    for reference in ("one", "two", image.digest):
        assert_error(http.get(f"/v2/{repo}/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
        assert_error(http.head(f"/v2/{repo}/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] == ["keep"]
    assert http.get(f"/v2/{repo}/manifests/keep").content == keeper.body
    assert_error(http.delete(f"/v2/{repo}/manifests/{image.digest}"), 404, "MANIFEST_UNKNOWN")


def test_delete_tag_keeps_the_manifest(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    image = oci.push_image(repo, "doomed")
    oci.put_manifest(repo, "stays", image.body, image.media_type)
    deleted = http.delete(f"/v2/{repo}/manifests/doomed")
    assert deleted.status_code == 202, deleted.text
    assert_error(http.get(f"/v2/{repo}/manifests/doomed"), 404, "MANIFEST_UNKNOWN")
    assert_error(http.head(f"/v2/{repo}/manifests/doomed"), 404, "MANIFEST_UNKNOWN")
    assert http.get(f"/v2/{repo}/manifests/{image.digest}").content == image.body
    assert http.get(f"/v2/{repo}/manifests/stays").content == image.body
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] == ["stays"]
    assert_error(http.delete(f"/v2/{repo}/manifests/doomed"), 404, "MANIFEST_UNKNOWN")


def test_pushing_a_tag_again_moves_it(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    first = oci.push_image(repo, "latest", layers=[b"v1"])
    second = oci.push_image(repo, "latest", layers=[b"v2"])
    assert http.get(f"/v2/{repo}/manifests/latest").content == second.body
    assert http.get(f"/v2/{repo}/manifests/{first.digest}").content == first.body


def test_sha512_manifest_by_digest(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    config = oci.push_blob(repo, b"{}")
    body = manifest_bytes(image_doc(config, []))
    digest = digest_of(body, "sha512")
    response = oci.put_manifest(repo, digest, body, OCI_MANIFEST)
    assert response.status_code == 201, response.text
    assert response.headers["Docker-Content-Digest"] == digest
    got = http.get(f"/v2/{repo}/manifests/{digest}")
    assert got.content == body
    assert got.headers["Docker-Content-Digest"] == digest


def test_manifest_without_media_type_field_is_served_with_the_pushed_content_type(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    config = oci.push_blob(repo, b"{}")
    doc = image_doc(config, [])
    del doc["mediaType"]
    body = manifest_bytes(doc)
    assert oci.put_manifest(repo, "plain", body, OCI_MANIFEST).status_code == 201
    got = http.get(f"/v2/{repo}/manifests/plain")
    assert got.content == body
    assert got.headers["Content-Type"] == OCI_MANIFEST


def test_deleted_blob_cannot_be_referenced_by_a_new_manifest(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    config = oci.push_blob(repo, b"{}")
    layer = oci.push_blob(repo, b"short-lived layer")
    assert http.delete(f"/v2/{repo}/blobs/{layer}").status_code == 202
    response = oci.put_manifest(repo, "late", manifest_bytes(image_doc(config, [layer])), OCI_MANIFEST)
    assert_error(response, 400, "MANIFEST_BLOB_UNKNOWN")


def test_deleted_manifest_can_be_pushed_again(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    image = oci.push_image(repo, "again")
    assert http.delete(f"/v2/{repo}/manifests/{image.digest}").status_code == 202
    assert oci.put_manifest(repo, "again", image.body, image.media_type).status_code == 201
    assert http.get(f"/v2/{repo}/manifests/again").content == image.body


# -- deletion disabled --------------------------------------------------------------------------


def test_deletes_are_refused_when_deletion_is_disabled(tmp_path: Path, backend: Backend) -> None:
    with WharfProcess(tmp_path / "nodelete", **backend.settings(delete={"enabled": False})) as process:
        with client_for(process) as client:
            oci = OCIClient(client)
            image = oci.push_image("locked/repo", "v1")
            layer = digest_of(b"layer locked/repo")
            for path in (
                f"/v2/locked/repo/blobs/{layer}",
                f"/v2/locked/repo/manifests/{image.digest}",
                "/v2/locked/repo/manifests/v1",
            ):
                response = client.delete(path)
                assert response.status_code in (400, 405), response.text
                assert error_codes(response)[0] == "UNSUPPORTED"
            assert client.get("/v2/locked/repo/manifests/v1").content == image.body
            assert client.head(f"/v2/locked/repo/blobs/{layer}").status_code == 200


# -- tags ---------------------------------------------------------------------------------------

TAGS = ["latest", "1.0", "b", "a", "Z", "_x", "a-b", "A", "1.0.1", "a.b", "v2"]


@pytest.fixture
def tagged(oci: OCIClient, repo: str) -> list[str]:
    image = oci.push_image(repo, TAGS[0])
    for tag in TAGS[1:]:
        assert oci.put_manifest(repo, tag, image.body, image.media_type).status_code == 201
    return sorted(TAGS)  # ASCIIbetical: Go's sort.Strings


def test_tags_list_is_in_lexical_order(http: httpx.Client, repo: str, tagged: list[str]) -> None:
    response = http.get(f"/v2/{repo}/tags/list")
    assert response.status_code == 200
    assert response.json() == {"name": repo, "tags": tagged}
    assert "link" not in response.headers


@pytest.mark.parametrize("n", [1, 3, 4, 10])
def test_tags_pagination_follows_link_headers(http: httpx.Client, repo: str, tagged: list[str], n: int) -> None:
    seen: list[str] = []
    url: str | None = f"/v2/{repo}/tags/list?n={n}"
    pages = 0
    while url is not None:
        response = http.get(url)
        assert response.status_code == 200, response.text
        page = response.json()["tags"] or []
        assert len(page) <= n
        seen += page
        url = next_link(response)
        if url is not None:
            assert len(page) == n, "a page short of n must be the last"
            assert urlsplit(url).path == f"/v2/{repo}/tags/list"
            query = parse_qs(urlsplit(url).query)
            assert query["n"] == [str(n)]
            assert query["last"] == [page[-1]]
        pages += 1
        assert pages <= len(tagged) + 1
    assert seen == tagged


def test_tags_n_and_last_select_a_page(http: httpx.Client, repo: str, tagged: list[str]) -> None:
    after = tagged.index("a")
    response = http.get(f"/v2/{repo}/tags/list", params={"n": 2, "last": "a"})
    assert response.json()["tags"] == tagged[after + 1 : after + 3]
    response = http.get(f"/v2/{repo}/tags/list", params={"last": "a"})
    assert response.json()["tags"] == tagged[after + 1 :]
    response = http.get(f"/v2/{repo}/tags/list", params={"last": "b0"})  # need not be an existing tag
    assert response.json()["tags"] == [t for t in tagged if t > "b0"]
    response = http.get(f"/v2/{repo}/tags/list", params={"n": 100})
    assert response.json()["tags"] == tagged
    assert "link" not in response.headers


def test_tags_n_zero_is_an_empty_list_without_link(http: httpx.Client, repo: str, tagged: list[str]) -> None:
    response = http.get(f"/v2/{repo}/tags/list", params={"n": 0})
    assert response.status_code == 200
    assert response.json()["tags"] in ([], None)
    assert "link" not in response.headers


def test_tags_of_unknown_repository_is_name_unknown(http: httpx.Client) -> None:
    assert_error(http.get(f"/v2/{new_repo()}/tags/list"), 404, "NAME_UNKNOWN")


@pytest.mark.parametrize("n", ["-1", "abc", "1.5", "1e3"])
def test_tags_invalid_n_is_400(http: httpx.Client, repo: str, tagged: list[str], n: str) -> None:
    assert_error(http.get(f"/v2/{repo}/tags/list", params={"n": n}), 400, "PAGINATION_NUMBER_INVALID")


def test_tags_list_is_empty_once_every_tag_is_deleted(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    oci.push_image(repo, "only")
    assert http.delete(f"/v2/{repo}/manifests/only").status_code == 202
    response = http.get(f"/v2/{repo}/tags/list")
    assert response.status_code == 200
    assert response.json()["tags"] in ([], None)


# -- catalog ------------------------------------------------------------------------------------


def test_catalog_lists_repositories_with_n_last_and_link(http: httpx.Client, oci: OCIClient) -> None:
    prefix = f"catalog-{uuid.uuid4().hex[:8]}"
    names = sorted(f"{prefix}/r{i}" for i in (3, 0, 4, 1, 2))
    for name in names:
        oci.push_blob(name, name.encode())

    full = http.get("/v2/_catalog").json()["repositories"]
    assert full == sorted(full)
    assert [r for r in full if r.startswith(prefix + "/")] == names

    seen: list[str] = []
    url: str | None = f"/v2/_catalog?n=2&last={prefix}"
    while url is not None and len(seen) < len(names):
        response = http.get(url)
        assert response.status_code == 200
        page = response.json()["repositories"]
        assert len(page) <= 2
        seen += page
        url = next_link(response)
        if url is not None:
            assert urlsplit(url).path == "/v2/_catalog"
            assert parse_qs(urlsplit(url).query) == {"n": ["2"], "last": [page[-1]]}
    assert seen[: len(names)] == names

    assert http.get("/v2/_catalog", params={"n": 1, "last": names[1]}).json()["repositories"] == [names[2]]
    zero = http.get("/v2/_catalog", params={"n": 0})
    assert zero.status_code == 200
    assert zero.json()["repositories"] in ([], None)
    assert "link" not in zero.headers


# -- referrers ----------------------------------------------------------------------------------

SBOM = "application/vnd.example.sbom.v1"
SIGNATURE_CONFIG = "application/vnd.example.signature.config.v1+json"


def push_artifact(oci: OCIClient, repo: str, subject: Image, **fields: Any) -> Image:
    config = oci.push_blob(repo, b"{}")
    doc = image_doc(config, [], subject=descriptor(subject.media_type, subject.body), **fields)
    doc["config"]["mediaType"] = OCI_EMPTY
    return oci.push_manifest(repo, None, doc)


def test_referrers_list_manifests_with_a_subject(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    subject = oci.push_image(repo, "app")
    sbom = push_artifact(oci, repo, subject, artifactType=SBOM, annotations={"org.example.sbom.format": "json"})
    config = oci.push_blob(repo, b"{}")
    signature_doc = image_doc(config, [], subject=descriptor(OCI_MANIFEST, subject.body), annotations={"sig": "abcd"})
    signature_doc["config"]["mediaType"] = SIGNATURE_CONFIG  # no artifactType: the config's type stands in
    signature = oci.push_manifest(repo, None, signature_doc)
    index = oci.push_index(
        repo,
        None,
        [oci.push_image(repo, None, layers=[b"child"])],
        subject=descriptor(OCI_MANIFEST, subject.body),
        annotations={"kind": "index"},
    )
    oci.push_image(repo, "unrelated", layers=[b"not a referrer"])

    response = http.get(f"/v2/{repo}/referrers/{subject.digest}")
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].split(";")[0] == OCI_INDEX
    body = response.json()
    assert body["schemaVersion"] == 2
    assert body["mediaType"] == OCI_INDEX
    by_digest = {d["digest"]: d for d in body["manifests"]}
    assert by_digest == {
        sbom.digest: {
            "mediaType": OCI_MANIFEST,
            "digest": sbom.digest,
            "size": len(sbom.body),
            "artifactType": SBOM,
            "annotations": {"org.example.sbom.format": "json"},
        },
        signature.digest: {
            "mediaType": OCI_MANIFEST,
            "digest": signature.digest,
            "size": len(signature.body),
            "artifactType": SIGNATURE_CONFIG,
            "annotations": {"sig": "abcd"},
        },
        index.digest: {
            "mediaType": OCI_INDEX,
            "digest": index.digest,
            "size": len(index.body),
            "annotations": {"kind": "index"},
        },
    }
    assert len(body["manifests"]) == 3


def test_referrer_with_megabytes_of_annotations_is_listed_with_them(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    """Annotations too big for a coordinator record are read back from the manifest itself."""
    subject = oci.push_image(repo, "app")
    large = {"org.example.blob": "z" * (2 * MIB)}
    sbom = push_artifact(oci, repo, subject, artifactType=SBOM, annotations=large)
    listed = http.get(f"/v2/{repo}/referrers/{subject.digest}").json()["manifests"]
    assert [d["digest"] for d in listed] == [sbom.digest]
    assert listed[0]["annotations"] == large
    assert "wharf.annotationsInManifest" not in listed[0]


def test_referrers_page_with_a_link_before_a_response_would_exceed_4_mib(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    """230 referrers with 20 KiB of annotations each are 4.7 MB: more than one page, each under 4 MiB."""
    subject = oci.push_image(repo, "app")
    pushed = {}
    for i in range(230):
        kind = SBOM if i % 2 else "application/vnd.example.signature"
        image = push_artifact(oci, repo, subject, artifactType=kind, annotations={"org.example.n": f"{i:0>20480}"})
        pushed[image.digest] = kind
    for wanted in (None, SBOM):
        seen: list[str] = []
        pages = 0
        path: str | None = f"/v2/{repo}/referrers/{subject.digest}"
        params = {"artifactType": wanted} if wanted else None
        while path is not None:
            response = http.get(path, params=params if pages == 0 else None)
            assert response.status_code == 200, response.text
            assert len(response.content) <= 4 * MIB
            body = response.json()
            assert body["mediaType"] == OCI_INDEX and body["manifests"]
            seen += [d["digest"] for d in body["manifests"]]
            if wanted:
                assert response.headers["OCI-Filters-Applied"] == "artifactType"
                assert {d["artifactType"] for d in body["manifests"]} == {wanted}
            path = next_link(response)
            pages += 1
            assert pages <= 10
        expected = [d for d, kind in pushed.items() if wanted is None or kind == wanted]
        assert len(seen) == len(set(seen)) == len(expected)
        assert set(seen) == set(expected)
        assert pages == (2 if wanted is None else 1)


def test_referrers_filter_by_artifact_type(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    subject = oci.push_image(repo, "app")
    sbom = push_artifact(oci, repo, subject, artifactType=SBOM)
    push_artifact(oci, repo, subject, artifactType="application/vnd.example.other")
    response = http.get(f"/v2/{repo}/referrers/{subject.digest}", params={"artifactType": SBOM})
    assert response.status_code == 200
    assert response.headers["OCI-Filters-Applied"] == "artifactType"
    assert [d["digest"] for d in response.json()["manifests"]] == [sbom.digest]
    none = http.get(f"/v2/{repo}/referrers/{subject.digest}", params={"artifactType": "application/vnd.example.none"})
    assert none.status_code == 200
    assert none.json()["manifests"] == []
    unfiltered = http.get(f"/v2/{repo}/referrers/{subject.digest}")
    assert "OCI-Filters-Applied" not in unfiltered.headers
    assert len(unfiltered.json()["manifests"]) == 2


def test_referrers_of_unknown_subject_is_an_empty_index(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    oci.push_image(repo, "app")
    for name in (repo, new_repo()):
        response = http.get(f"/v2/{name}/referrers/{UNKNOWN_DIGEST}")
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].split(";")[0] == OCI_INDEX
        assert response.json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}


@pytest.mark.parametrize("digest", ["sha256:xyz", "sha256", "md5:d41d8cd98f00b204e9800998ecf8427e", "latest"])
def test_referrers_with_invalid_digest_is_400(http: httpx.Client, repo: str, digest: str) -> None:
    assert_error(http.get(f"/v2/{repo}/referrers/{digest}"), 400, "DIGEST_INVALID")


def test_referrer_may_be_pushed_before_its_subject(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    config = oci.push_blob(repo, b"{}")
    absent = descriptor(OCI_MANIFEST, b'{"not": "pushed yet"}')
    doc = image_doc(config, [], artifactType=SBOM, subject=absent)
    body = manifest_bytes(doc)
    response = oci.put_manifest(repo, digest_of(body), body, OCI_MANIFEST)
    assert response.status_code == 201, response.text
    assert response.headers["OCI-Subject"] == absent["digest"]
    listed = http.get(f"/v2/{repo}/referrers/{absent['digest']}").json()["manifests"]
    assert [d["digest"] for d in listed] == [digest_of(body)]


def test_deleted_referrer_leaves_the_list(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    subject = oci.push_image(repo, "app")
    sbom = push_artifact(oci, repo, subject, artifactType=SBOM)
    assert http.delete(f"/v2/{repo}/manifests/{sbom.digest}").status_code == 202
    assert http.get(f"/v2/{repo}/referrers/{subject.digest}").json()["manifests"] == []


# -- bad input: names, tags, digests ------------------------------------------------------------

UUID = "3f2b7c1e-8a6d-4e2f-9b1a-0c5d7e9f1a2b"

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
    for content_range in ["bytes */*", "abc", "5-2", "-", "0-", "0-99999999999999999999999", "1-0"]:
        location = oci.start_upload(repo)
        response = http.patch(location, content=b"abc", headers={"Content-Range": content_range})
        assert response.status_code in (202, 400, 416), (content_range, response.status_code, response.text)
        if response.status_code != 202:
            assert_client_error(response)
    location = oci.start_upload(repo)
    short = http.patch(location, content=b"abc", headers={"Content-Range": "0-9"})  # promises 10, sends 3
    assert_client_error(short)


@pytest.mark.parametrize(
    "header", ["bytes=abc", "items=0-1", "bytes=1-2,5-6", "bytes=", "bytes=-", "bytes=99999999999999999999999-"]
)
def test_odd_range_headers_are_not_server_errors(
    http: httpx.Client, repo: str, blob2k: tuple[str, bytes], header: str
) -> None:
    digest, data = blob2k
    response = http.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": header})
    if response.status_code in (200, 206):
        return
    assert_error(response, 416, "RANGE_INVALID")


@pytest.mark.parametrize(
    "query",
    [
        {"n": "99999999999999999999999"},
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


# -- unknown endpoints and methods --------------------------------------------------------------

UNKNOWN_ENDPOINTS = [
    ("GET", "/"),
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
