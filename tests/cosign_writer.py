"""A minimal writer of cosign signatures for tests, independent of Wharf's own (node/cosign.py).

Written straight from cosign's published specification (sigstore/cosign `specs/SIGNATURE_SPEC.md`:
"Tag-based Discovery", "OCI Image Manifest V1", "Simple Signing", "Signature Schemes") and shaped
like what cosign pushes: the payload as cosign serialises it (the form its README prints and the
fixtures in tests/data/cosign/signatures.json show), one OCI image manifest at
`sha256-<hex>.sig` whose layers are the payloads, each annotated with its base64 signature. It
shares no code with node/, so a test that pulls what it wrote checks Wharf against the format,
not against itself. It can also write wrong signatures on purpose (another digest, another key,
a payload changed after signing).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

PAYLOAD_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_KEY = "dev.cosignproject.cosign/signature"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def payload_for(reference: str, digest: str) -> bytes:
    """The simple-signing payload, in the byte form cosign writes (Go's encoding/json, struct order)."""
    critical = (
        '{"identity":{"docker-reference":"' + reference + '"},"image":{"docker-manifest-digest":"' + digest + '"},'
        '"type":"cosign container image signature"}'
    )
    return ('{"critical":' + critical + ',"optional":null}').encode()


def sign_bytes(key: Any, data: bytes) -> bytes:
    """The spec's schemes: ECDSA-P256 with SHA-256 (ASN.1 DER), and the RSA and Ed25519 cosign also takes."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    return key.sign(data)


def _upload(http: httpx.Client, repo: str, data: bytes) -> None:
    response = http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": _digest(data)}, content=data)
    assert response.status_code == 201, response.text


def write_signature(
    http: httpx.Client,
    repo: str,
    subject: str,
    key: Any,
    *,
    claims_digest: str | None = None,
    tamper: bool = False,
    reference: str = "registry.test/app",
) -> httpx.Response:
    """Store a signature of `subject` at its `.sig` tag; returns the manifest PUT's response.

    `claims_digest` makes the payload name another manifest; `tamper` changes the payload after it
    was signed (the signature then covers bytes that are not the layer's).
    """
    payload = payload_for(reference, claims_digest or subject)
    signature = base64.b64encode(sign_bytes(key, payload)).decode()
    if tamper:
        payload = payload.replace(b'"optional":null', b'"optional":{"tampered":"yes"}')
    _upload(http, repo, payload)
    config = json.dumps(
        {"architecture": "", "os": "", "config": {}, "rootfs": {"type": "layers", "diff_ids": [_digest(payload)]}}
    ).encode()
    _upload(http, repo, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "size": len(config),
            "digest": _digest(config),
        },
        "layers": [
            {
                "mediaType": PAYLOAD_MEDIA_TYPE,
                "size": len(payload),
                "digest": _digest(payload),
                "annotations": {SIGNATURE_KEY: signature},
            }
        ],
    }
    tag = subject.replace(":", "-") + ".sig"
    body = json.dumps(manifest).encode()
    return http.put(
        f"/v2/{repo}/manifests/{tag}",
        content=body,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
