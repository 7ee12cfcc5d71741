"""Blob HEAD, GET (ranges, ETags), DELETE, and blobs whose content vanished or that live in another repository."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest
from api_suite import UNKNOWN_DIGEST, Backend, if_none_match_forms
from oci_client import OCIClient, assert_error
from services import wait_until
from wharf_process import WharfProcess


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


def test_blob_get_and_head_with_its_etag_in_if_none_match_are_304(
    http: httpx.Client, repo: str, blob2k: tuple[str, bytes]
) -> None:
    digest, _ = blob2k
    etag = http.head(f"/v2/{repo}/blobs/{digest}").headers["ETag"]
    assert etag == f'"{digest}"'
    for header in if_none_match_forms(digest):
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
