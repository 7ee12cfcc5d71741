"""GET /v2/<name>/referrers/<digest>: manifests with a subject, filtered by artifactType, paged under 4 MiB."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from api_suite import MIB, UNKNOWN_DIGEST, image_doc, new_repo, next_link
from oci_client import (
    OCI_EMPTY,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    OCIClient,
    assert_error,
    descriptor,
    digest_of,
    manifest_bytes,
)

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
