"""The cosign signature format: simple-signing payloads, signature manifests, keys, signing and checking.

Written from cosign's published specification (`specs/SIGNATURE_SPEC.md` in its repository) and
the format of its key files. A signature is a layer of an OCI image manifest: the layer's blob is the
payload (JSON naming the signed manifest's digest), its annotation the base64 signature over the
payload's bytes. The manifest sits at the tag `sha256-<hex>.sig` of the signed digest (the tag
scheme), or names the signed manifest as its `subject` (an OCI 1.1 referrer).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

SIMPLE_SIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
PAYLOAD_TYPE = "cosign container image signature"
# The artifactType cosign gives a signature stored as an OCI 1.1 referrer.
SIGNATURE_ARTIFACT = "application/vnd.dev.cosign.artifact.sig.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
# A payload is a few hundred bytes; anything much larger is not one.
MAX_PAYLOAD_BYTES = 64 * 1024

_ARTIFACT_TAG = re.compile(r"(sha256|sha512)-([0-9a-f]{64}|[0-9a-f]{128})\.(sig|att|sbom)")

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class KeyInvalid(ValueError):
    """A key file that cannot be used: unreadable, not PEM, a wrong password, an unsupported kind."""


# -- tags ------------------------------------------------------------------------------------------


def signature_tag(digest: str) -> str:
    """The tag of a digest's signatures in cosign's tag scheme: `sha256:ab..` -> `sha256-ab...sig`."""
    return digest.replace(":", "-", 1) + ".sig"


def is_artifact_tag(tag: str) -> bool:
    """A signature, attestation or SBOM tag of cosign's scheme (`sha256-<hex>.sig|.att|.sbom`)."""
    return _ARTIFACT_TAG.fullmatch(tag) is not None


def signature_tag_subject(tag: str) -> str | None:
    """The digest a `.sig` tag holds signatures of, or None for any other tag."""
    match = _ARTIFACT_TAG.fullmatch(tag)
    if match is None or match.group(3) != "sig":
        return None
    return f"{match.group(1)}:{match.group(2)}"


# -- payloads --------------------------------------------------------------------------------------


def simple_signing_payload(docker_reference: str, digest: str, annotations: dict[str, Any] | None = None) -> bytes:
    """The payload cosign signs for an image: its reference (ignored by verifiers) and its digest."""
    doc = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": digest},
            "type": PAYLOAD_TYPE,
        },
        "optional": annotations or None,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _field(doc: Any, name: str) -> Any:
    """A member of a JSON object matched without regard to case, as Go's decoder (cosign's) matches it.

    Two members that differ only in case make the payload ambiguous: None.
    """
    if not isinstance(doc, dict):
        return None
    found = [value for key, value in doc.items() if isinstance(key, str) and key.lower() == name]
    return found[0] if len(found) == 1 else None


def signed_digest(payload: bytes) -> str | None:
    """The manifest digest a simple-signing payload vouches for; None if it is not a cosign image payload."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    critical = _field(doc, "critical")
    if _field(critical, "type") != PAYLOAD_TYPE:
        return None
    digest = _field(_field(critical, "image"), "docker-manifest-digest")
    return digest if isinstance(digest, str) else None


# -- signature manifests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SignatureLayer:
    """One signature in a signature manifest: the payload blob it covers and the signature bytes."""

    payload_digest: str
    payload_size: int
    signature: bytes
    annotations: dict[str, str]


def signature_layers(manifest: bytes) -> list[SignatureLayer]:
    """The simple-signing signatures a manifest carries (none if it is not a signature manifest)."""
    try:
        doc = json.loads(manifest)
    except ValueError:
        return []
    layers = doc.get("layers") if isinstance(doc, dict) else None
    found = []
    for layer in layers if isinstance(layers, list) else []:
        if not isinstance(layer, dict) or layer.get("mediaType") != SIMPLE_SIGNING:
            continue
        annotations = layer.get("annotations")
        if not isinstance(annotations, dict):
            continue
        encoded = annotations.get(SIGNATURE_ANNOTATION)
        digest, size = layer.get("digest"), layer.get("size")
        if not isinstance(encoded, str) or not isinstance(digest, str) or not isinstance(size, int):
            continue
        try:
            signature = base64.b64decode(encoded.replace("\n", ""), validate=True)
        except (binascii.Error, ValueError):
            continue
        found.append(SignatureLayer(digest, size, signature, {k: str(v) for k, v in annotations.items()}))
    return found


def payload_matches(layer: SignatureLayer, payload: bytes) -> bool:
    """Whether `payload` is the blob the layer names (its bytes are read from storage by digest)."""
    algorithm, _, hexpart = layer.payload_digest.partition(":")
    if algorithm not in ("sha256", "sha512") or len(payload) != layer.payload_size:
        return False
    return hashlib.new(algorithm, payload).hexdigest() == hexpart


def check(layer: SignatureLayer, payload: bytes, subject: str, keys: list[PublicKey]) -> PublicKey | None:
    """The key among `keys` whose signature this is, if the payload is the layer's and names `subject`."""
    if not payload_matches(layer, payload) or signed_digest(payload) != subject:
        return None
    for key in keys:
        if verify(key, layer.signature, payload):
            return key
    return None


def layer_descriptor(payload: bytes, signature: bytes) -> dict[str, Any]:
    """The manifest layer for one signature: the payload blob's descriptor, the signature annotated."""
    return {
        "mediaType": SIMPLE_SIGNING,
        "size": len(payload),
        "digest": "sha256:" + hashlib.sha256(payload).hexdigest(),
        "annotations": {SIGNATURE_ANNOTATION: base64.b64encode(signature).decode()},
    }


def tag_scheme_manifest(layers: list[dict[str, Any]]) -> tuple[bytes, bytes]:
    """(manifest, config) of a tag-scheme signature manifest holding `layers`, as cosign lays one out.

    The config is an image config whose diff_ids are the payload digests (the payloads are not
    compressed); clients read only the layers.
    """
    config = json.dumps(
        {
            "architecture": "",
            "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"}],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]},
            "config": {},
        },
        separators=(",", ":"),
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "size": len(config),
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
        },
        "layers": layers,
    }
    return json.dumps(manifest, separators=(",", ":")).encode(), config


EMPTY_CONFIG = b"{}"


def referrer_manifest(subject: dict[str, Any], layer: dict[str, Any]) -> bytes:
    """A signature stored as an OCI 1.1 referrer of `subject` (a descriptor of the signed manifest)."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SIGNATURE_ARTIFACT,
        "config": {
            "mediaType": OCI_EMPTY,
            "size": len(EMPTY_CONFIG),
            "digest": "sha256:" + hashlib.sha256(EMPTY_CONFIG).hexdigest(),
        },
        "layers": [layer],
        "subject": subject,
    }
    return json.dumps(manifest, separators=(",", ":")).encode()


# -- signing and checking --------------------------------------------------------------------------


def verify(key: PublicKey, signature: bytes, payload: bytes) -> bool:
    """cosign's schemes with `--key`: ECDSA with SHA-256 (DER signature), RSA PKCS#1 v1.5 with SHA-256, Ed25519."""
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.verify(signature, payload)
    except (InvalidSignature, ValueError):
        return False
    return True


def sign(key: PrivateKey, payload: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(payload, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(payload)


def key_kind(key: PublicKey | PrivateKey) -> str:
    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        return f"RSA {key.key_size}"
    return "Ed25519"


# -- key files -------------------------------------------------------------------------------------

# cosign's own PEM types for a password-encrypted PKCS#8 key (the older name still reads).
ENCRYPTED_TYPES = ("ENCRYPTED SIGSTORE PRIVATE KEY", "ENCRYPTED COSIGN PRIVATE KEY")
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.S)
# The scrypt settings cosign's key encryption uses or accepts; others are refused before any work.
_SCRYPT_PARAMS = {(32768, 8, 1), (65536, 8, 1), (131072, 8, 1)}
_SCRYPT_WRITE = (65536, 8, 1)


def load_public_key(data: bytes, source: str) -> PublicKey:
    """A PEM public key (PKIX `PUBLIC KEY`, or a certificate's key): ECDSA, RSA or Ed25519."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            from cryptography import x509

            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyInvalid(f"{source} is not a PEM public key (ECDSA, RSA or Ed25519): {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey, ed25519.Ed25519PublicKey)):
        raise KeyInvalid(f"{source} holds a {type(key).__name__}; cosign keys are ECDSA, RSA or Ed25519")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise KeyInvalid(f"{source}: an RSA key of {key.key_size} bits is too weak (2048 at least)")
    return key


def load_public_key_file(path: str) -> PublicKey:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise KeyInvalid(f"cannot read {path}: {exc.strerror or exc}") from None
    return load_public_key(data, path)


def load_private_key(data: bytes, password: Callable[[], bytes], source: str) -> PrivateKey:
    """A private key from PEM: cosign's encrypted format, PKCS#8 (plain or encrypted), SEC1 EC or PKCS#1 RSA.

    `password` is called only for an encrypted key.
    """
    match = _PEM.search(data)
    if match is None:
        raise KeyInvalid(f"{source} is not a PEM file")
    kind = match.group(1).decode()
    try:
        if kind in ENCRYPTED_TYPES:
            body = base64.b64decode(b"".join(match.group(2).split()))
            key: Any = _private_key_from_der(decrypt_envelope(body, password(), source))
        elif kind == "ENCRYPTED PRIVATE KEY":
            key = serialization.load_pem_private_key(match.group(0), password())
        elif kind in ("PRIVATE KEY", "EC PRIVATE KEY", "RSA PRIVATE KEY"):
            key = serialization.load_pem_private_key(match.group(0), None)
        else:
            raise KeyInvalid(f"{source}: a PEM {kind!r} is not a private key this command reads")
    except KeyInvalid:
        raise
    except (ValueError, TypeError, UnsupportedAlgorithm, binascii.Error) as exc:
        raise KeyInvalid(f"{source}: cannot read the private key: {exc}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey, ed25519.Ed25519PrivateKey)):
        raise KeyInvalid(f"{source} holds a {type(key).__name__}; cosign keys are ECDSA, RSA or Ed25519")
    return key


# PKCS#8 v2 (RFC 5958) of an Ed25519 key, with its public key after the seed, as ring writes it:
# SEQUENCE { INTEGER 1, { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed }, [1] public key }.
_ED25519_V2 = bytes.fromhex("3051020101300506032b657004220420")


def _private_key_from_der(der: bytes) -> Any:
    try:
        return serialization.load_der_private_key(der, None)
    except ValueError:
        if not (len(der) == 83 and der.startswith(_ED25519_V2) and der[48:51] == bytes.fromhex("812100")):
            raise
    key = ed25519.Ed25519PrivateKey.from_private_bytes(der[16:48])
    if key.public_key().public_bytes_raw() != der[51:]:
        raise ValueError("the Ed25519 public key does not belong to the private key")
    return key


def decrypt_envelope(body: bytes, password: bytes, source: str) -> bytes:
    """The plaintext of cosign's key envelope: JSON naming scrypt (N, r, p, salt) and nacl/secretbox (nonce)."""
    try:
        doc = json.loads(body)
        kdf, cipher = doc["kdf"], doc["cipher"]
        params = (int(kdf["params"]["N"]), int(kdf["params"]["r"]), int(kdf["params"]["p"]))
        salt = base64.b64decode(kdf["salt"])
        nonce = base64.b64decode(cipher["nonce"])
        ciphertext = base64.b64decode(doc["ciphertext"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise KeyInvalid(f"{source}: the encrypted key is not cosign's JSON envelope") from None
    if kdf.get("name") != "scrypt" or cipher.get("name") != "nacl/secretbox":
        raise KeyInvalid(f"{source}: unsupported key encryption {kdf.get('name')!r}/{cipher.get('name')!r}")
    if params not in _SCRYPT_PARAMS:
        raise KeyInvalid(f"{source}: unsupported scrypt parameters N={params[0]} r={params[1]} p={params[2]}")
    import nacl.exceptions
    import nacl.secret

    box = nacl.secret.SecretBox(_scrypt(password, salt, params))
    try:
        return bytes(box.decrypt(ciphertext, nonce))
    except (nacl.exceptions.CryptoError, ValueError):
        raise KeyInvalid(f"{source}: wrong password (or a damaged key file)") from None


def _scrypt(password: bytes, salt: bytes, params: tuple[int, int, int]) -> bytes:
    n, r, p = params
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024, dklen=32)


def encrypt_private_key(key: PrivateKey, password: bytes) -> bytes:
    """PEM in cosign's `ENCRYPTED SIGSTORE PRIVATE KEY` format: PKCS#8, scrypt, nacl/secretbox."""
    import nacl.secret

    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    salt, nonce = os.urandom(32), os.urandom(24)
    sealed = nacl.secret.SecretBox(_scrypt(password, salt, _SCRYPT_WRITE)).encrypt(der, nonce).ciphertext
    n, r, p = _SCRYPT_WRITE

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    envelope = {
        "kdf": {"name": "scrypt", "params": {"N": n, "r": r, "p": p}, "salt": b64(salt)},
        "cipher": {"name": "nacl/secretbox", "nonce": b64(nonce)},
        "ciphertext": b64(sealed),
    }
    return pem_block(ENCRYPTED_TYPES[0], json.dumps(envelope, separators=(",", ":")).encode())


def plain_private_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def pem_block(kind: str, data: bytes) -> bytes:
    encoded = base64.b64encode(data).decode()
    lines = [encoded[i : i + 64] for i in range(0, len(encoded), 64)]
    return ("\n".join([f"-----BEGIN {kind}-----", *lines, f"-----END {kind}-----"]) + "\n").encode()


def generate_key(kind: str) -> PrivateKey:
    """A new key: `ecdsa-p256` (what cosign generate-key-pair makes), `rsa` (3072 bits) or `ed25519`."""
    if kind == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(65537, 3072)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise KeyInvalid(f"unknown key type {kind!r}: ecdsa-p256, rsa or ed25519")
