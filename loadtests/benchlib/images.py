"""Blobs, manifests and whole small images, pushed the way a client pushes them."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from benchlib.client import Conn, Unexpected, location_target, with_query

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ACCEPT = ", ".join(
    [
        OCI_MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)


def sha256_digest(data: bytes | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def upload_blob(conn: Conn, repo: str, digest: str, body: Any, *, single_post: bool = False) -> None:
    """POST then PUT ?digest= with the body; with single_post, try POST ?digest= first (OCI monolithic)."""
    headers = {"Content-Type": "application/octet-stream"}
    if single_post:
        reply = await conn.request("POST", f"/v2/{repo}/blobs/uploads/?digest={digest}", headers, body)
        if reply.status == 201:
            return
        if reply.status != 202:
            raise Unexpected("POST blob upload (monolithic)", reply)
    else:
        reply = await conn.request("POST", f"/v2/{repo}/blobs/uploads/", None, None)
        if reply.status != 202:
            raise Unexpected("POST blob upload", reply)
    target = with_query(location_target(reply.headers["location"]), "digest", digest)
    reply = await conn.request("PUT", target, headers, body)
    if reply.status != 201:
        raise Unexpected("PUT blob upload", reply)


async def upload_blob_chunked(conns: list[Conn], repo: str, digest: str, data: bytes, chunk: int) -> int:
    """POST, PATCH after PATCH of `chunk` bytes (Content-Range), then PUT ?digest= without a body; the
    requests made. Each PATCH goes to the next of `conns` in turn (nodes behind a balancer without
    affinity); the POST and the PUT to the first."""
    reply = await conns[0].request("POST", f"/v2/{repo}/blobs/uploads/", None, None)
    if reply.status != 202:
        raise Unexpected("POST blob upload", reply)
    location = location_target(reply.headers["location"])
    view = memoryview(data)
    requests = 2
    for n, first in enumerate(range(0, len(data), chunk)):
        piece = view[first : first + chunk]
        headers = {"Content-Type": "application/octet-stream", "Content-Range": f"{first}-{first + len(piece) - 1}"}
        reply = await conns[n % len(conns)].request("PATCH", location, headers, piece)
        if reply.status != 202:
            raise Unexpected(f"PATCH at {first}", reply)
        location = location_target(reply.headers["location"])
        requests += 1
    reply = await conns[0].request("PUT", with_query(location, "digest", digest), None, None)
    if reply.status != 201:
        raise Unexpected("PUT blob upload", reply)
    return requests


async def put_manifest(conn: Conn, repo: str, reference: str, manifest: bytes, what: str = "PUT manifest") -> None:
    reply = await conn.request("PUT", f"/v2/{repo}/manifests/{reference}", {"Content-Type": OCI_MANIFEST}, manifest)
    if reply.status != 201:
        raise Unexpected(what, reply)


def image_manifest(config: tuple[str, int], layers: list[tuple[str, int]]) -> bytes:
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config[0], "size": config[1]},
        "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": s} for d, s in layers],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def image_config(nonce: str, layers: list[bytes]) -> bytes:
    doc = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": [f"BENCH_NONCE={nonce}"]},
        "rootfs": {"type": "layers", "diff_ids": [sha256_digest(layer) for layer in layers]},
    }
    return json.dumps(doc, separators=(",", ":")).encode()


async def push_image(
    conn: Conn, repo: str, tag: str, nonce: str, layer_bytes: int, *, head_first: bool, single_post: bool
) -> int:
    """The whole client push of one small image; returns the number of requests made."""
    layers = [os.urandom(layer_bytes) for _ in range(2)]
    config = image_config(nonce, layers)
    requests = 0
    described = []
    for blob in [config, *layers]:
        digest = sha256_digest(blob)
        described.append((digest, len(blob)))
        if head_first:
            reply = await conn.request("HEAD", f"/v2/{repo}/blobs/{digest}")
            requests += 1
            if reply.status == 200:
                continue
            if reply.status != 404:
                raise Unexpected("HEAD blob", reply)
        await upload_blob(conn, repo, digest, blob, single_post=single_post)
        requests += 1 if single_post else 2
    await put_manifest(conn, repo, tag, image_manifest(described[0], described[1:]))
    return requests + 1


async def push_one_layer_image(conn: Conn, repo: str, tag: str, nonce: str, layer: bytes) -> bytes:
    """A small image of one layer under `tag` (each blob in one POST); returns its manifest."""
    config = image_config(nonce, [layer])
    for blob in (config, layer):
        await upload_blob(conn, repo, sha256_digest(blob), blob, single_post=True)
    manifest = image_manifest((sha256_digest(config), len(config)), [(sha256_digest(layer), len(layer))])
    await put_manifest(conn, repo, tag, manifest, "setup: PUT manifest")
    return manifest


async def setup_manifest(conn: Conn, repo: str) -> bytes:
    """The image of the manifest GET loads, as `<repo>:latest`, read back once; returns its manifest."""
    manifest = await push_one_layer_image(conn, repo, "latest", "manifest-get", os.urandom(4096))
    reply = await conn.request("GET", f"/v2/{repo}/manifests/latest", {"Accept": ACCEPT})
    if reply.status != 200 or reply.body != manifest:
        raise Unexpected("setup: GET manifest returned other bytes", reply)
    return manifest
