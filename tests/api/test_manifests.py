"""Manifest PUT, GET, HEAD and DELETE by tag and by digest, what a manifest may reference, and deletion disabled."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from api_suite import EMPTY_DIGEST, MIB, UNKNOWN_DIGEST, Backend, client_for, if_none_match_forms, image_doc, new_repo
from oci_client import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    OCIClient,
    assert_error,
    descriptor,
    digest_of,
    error_codes,
    manifest_bytes,
)
from wharf_process import WharfProcess


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
        for header in if_none_match_forms(image.digest):
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


def test_delete_by_digest_of_a_manifest_with_more_tags_than_a_transaction_holds_removes_them_all(
    http: httpx.Client, oci: OCIClient, repo: str
) -> None:
    image = oci.push_image(repo, "t0")
    tags = [f"t{n}" for n in range(150)]  # two deletes per tag: past etcd's 128 operations
    for tag in tags[1:]:
        assert oci.put_manifest(repo, tag, image.body, image.media_type).status_code == 201
    keeper = oci.push_image(repo, "keep", layers=[b"another"])
    deleted = http.delete(f"/v2/{repo}/manifests/{image.digest}")
    assert deleted.status_code == 202, deleted.text
    assert http.get(f"/v2/{repo}/tags/list").json()["tags"] == ["keep"]
    for reference in (tags[0], tags[-1], image.digest):
        assert_error(http.get(f"/v2/{repo}/manifests/{reference}"), 404, "MANIFEST_UNKNOWN")
    assert http.get(f"/v2/{repo}/manifests/keep").content == keeper.body


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
