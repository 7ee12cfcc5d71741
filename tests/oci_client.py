"""A small OCI Distribution client over httpx for API tests: push blobs and manifests, read errors."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
from dataclasses import dataclass
from typing import Any

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"

# The spec's table of error codes: a JSON error body's `code` MUST be one of these.
SPEC_ERROR_CODES = {
    "BLOB_UNKNOWN",
    "BLOB_UPLOAD_INVALID",
    "BLOB_UPLOAD_UNKNOWN",
    "DIGEST_INVALID",
    "MANIFEST_BLOB_UNKNOWN",
    "MANIFEST_INVALID",
    "MANIFEST_UNKNOWN",
    "NAME_INVALID",
    "NAME_UNKNOWN",
    "SIZE_INVALID",
    "UNAUTHORIZED",
    "DENIED",
    "UNSUPPORTED",
    "TOOMANYREQUESTS",
}


def digest_of(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data), **extra}


def error_codes(response: httpx.Response) -> list[str]:
    """The codes of an OCI error body; fails the test if the body is not one."""
    assert response.headers.get("content-type", "").startswith("application/json"), (
        f"error body is not JSON: {response.status_code} {response.headers.get('content-type')} {response.text[:300]!r}"
    )
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"], body
    for error in body["errors"]:
        assert isinstance(error, dict) and isinstance(error.get("code"), str), body
        assert error["code"].replace("_", "").isalpha() and error["code"].isupper(), body
    return [error["code"] for error in body["errors"]]


def assert_error(response: httpx.Response, status: int, *codes: str) -> dict[str, Any]:
    """Status and OCI error code (one of `codes`); returns the first error object."""
    request = response.request
    assert response.status_code == status, (
        f"{request.method} {request.url.raw_path.decode()}: expected {status} {codes}, "
        f"got {response.status_code} {response.text[:500]!r}"
    )
    if request.method == "HEAD":
        assert response.content == b""
        return {}
    found = error_codes(response)
    assert found[0] in codes, f"{request.method} {request.url.raw_path.decode()}: expected {codes}, got {found}"
    return dict(response.json()["errors"][0])


@dataclass
class Image:
    """A manifest as pushed: its exact bytes, digest and media type."""

    body: bytes
    digest: str
    media_type: str


def manifest_bytes(doc: dict[str, Any]) -> bytes:
    """Deliberately not canonical JSON (indent, key order, trailing newline): the registry must keep bytes."""
    return (json.dumps(doc, indent=3) + "\n").encode()


class OCIClient:
    """The client half of the distribution API, enough to set up each test's content."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def push_blob(self, repo: str, data: bytes) -> str:
        """A monolithic single-POST upload; returns the digest."""
        digest = digest_of(data)
        response = self.http.post(
            f"/v2/{repo}/blobs/uploads/",
            params={"digest": digest},
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert response.status_code == 201, response.text
        return digest

    def start_upload(self, repo: str) -> str:
        """POST for an upload session; returns its Location."""
        response = self.http.post(f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
        assert response.status_code == 202, response.text
        return response.headers["Location"]

    def put_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> httpx.Response:
        return self.http.put(f"/v2/{repo}/manifests/{reference}", content=body, headers={"Content-Type": media_type})

    def push_image(
        self,
        repo: str,
        reference: str | None = None,
        *,
        media_type: str = OCI_MANIFEST,
        layers: list[bytes] | None = None,
        config: bytes | None = None,
        config_type: str | None = None,
        **fields: Any,
    ) -> Image:
        """Push config and layers, then an image manifest by tag (or by digest when no reference)."""
        docker = media_type == DOCKER_MANIFEST
        config = config if config is not None else json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        layers = layers if layers is not None else [b"layer " + repo.encode()]
        for blob in [config, *layers]:
            self.push_blob(repo, blob)
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": descriptor(config_type or (DOCKER_CONFIG if docker else OCI_CONFIG), config),
            "layers": [descriptor(DOCKER_LAYER if docker else OCI_LAYER, layer) for layer in layers],
            **fields,
        }
        return self.push_manifest(repo, reference, doc)

    def push_index(
        self, repo: str, reference: str | None, children: list[Image], *, media_type: str = OCI_INDEX, **fields: Any
    ) -> Image:
        doc: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [
                {**descriptor(child.media_type, child.body), "platform": {"architecture": f"arch{i}", "os": "linux"}}
                for i, child in enumerate(children)
            ],
            **fields,
        }
        return self.push_manifest(repo, reference, doc)

    def push_manifest(self, repo: str, reference: str | None, doc: dict[str, Any]) -> Image:
        body = manifest_bytes(doc)
        digest = digest_of(body)
        response = self.put_manifest(repo, reference or digest, body, doc["mediaType"])
        assert response.status_code == 201, response.text
        assert response.headers["Docker-Content-Digest"] == digest
        return Image(body, digest, doc["mediaType"])


def raw_request(host: str, port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """A request whose path goes out exactly as written (httpx would resolve `..` segments)."""
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes] | None:
    """One HTTP/1.1 response with a Content-Length from a raw socket; None if the server closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            more = sock.recv(65536)
        except ConnectionResetError:
            return None
        if not more:
            return None
        data += more
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        more = sock.recv(65536)
        if not more:
            break
        body += more
    return int(lines[0].split()[1]), headers, body[:length]
