"""Signature policies in one process: the cosign format, key files, configuration, and the pull path's cost."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from inprocess import InProcessRegistry
from oci_client import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, descriptor

from node import cosign
from node.config import ConfigError, load
from node.trust import is_image

DATA = Path(__file__).parent / "data" / "cosign"
ANY = {"Accept": "*/*"}

# Encrypted private keys written by cosign and by sigstore-rs, with the passwords their tests use
# (see tests/data/cosign/README.md for where each comes from).
ENCRYPTED_KEYS = [
    ("cosign-keys_test-pemsigstorekey.key", b"hello", "ECDSA secp256r1"),
    ("cosign-keys_test-pemcosignkey.key", b"hello", "ECDSA secp256r1"),
    ("cosign-keys_test-pemcosigneckey-sec1.key", b"hello", "ECDSA secp256r1"),
    ("sigstore-rs-cosign_generated_encrypted_empty_private.key", b"", "ECDSA secp256r1"),
    ("sigstore-rs-ecdsa_encrypted_private.key", b"123", "ECDSA secp256r1"),
    ("sigstore-rs-ed25519_encrypted_private.key", b"123", "Ed25519"),
    ("sigstore-rs-rsa_encrypted_private.key", b"123", "RSA 4096"),
]


# -- the format --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "password", "kind"), ENCRYPTED_KEYS)
def test_encrypted_keys_written_by_cosign_and_sigstore_rs_decrypt_and_sign(name, password, kind):
    data = (DATA / name).read_bytes()
    key = cosign.load_private_key(data, lambda: password, name)
    assert cosign.key_kind(key) == kind
    payload = cosign.simple_signing_payload("registry.test/app", "sha256:" + "ab" * 32)
    assert cosign.verify(key.public_key(), cosign.sign(key, payload), payload)


@pytest.mark.parametrize(("name", "password", "kind"), ENCRYPTED_KEYS[:1] + ENCRYPTED_KEYS[4:])
def test_a_wrong_password_is_refused(name, password, kind):
    with pytest.raises(cosign.KeyInvalid, match="wrong password"):
        cosign.load_private_key((DATA / name).read_bytes(), lambda: password + b"x", name)


def test_keys_written_in_cosigns_format_read_back_and_resist_a_wrong_password():
    for kind in ("ecdsa-p256", "rsa", "ed25519"):
        key = cosign.generate_key(kind)
        pem = cosign.encrypt_private_key(key, b"s3cret")
        assert pem.startswith(b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----\n")
        again = cosign.load_private_key(pem, lambda: b"s3cret", "k")
        assert cosign.public_pem(again.public_key()) == cosign.public_pem(key.public_key())
        with pytest.raises(cosign.KeyInvalid):
            cosign.load_private_key(pem, lambda: b"S3cret", "k")


def test_signatures_made_by_cosign_and_by_another_writer_verify_and_changed_ones_do_not():
    fixtures = json.loads((DATA / "signatures.json").read_text())["signatures"]
    assert {f["name"] for f in fixtures} == {"ecdsa-p256", "rsa-obs"}
    for fixture in fixtures:
        key = cosign.load_public_key(fixture["public_key"].encode(), fixture["name"])
        payload = fixture["payload"].encode()
        signature = base64.b64decode(fixture["signature"])
        assert cosign.verify(key, signature, payload), fixture["name"]
        assert not cosign.verify(key, signature, payload.replace(b"sha256:", b"sha256:0", 1))
        assert cosign.signed_digest(payload) == json.loads(payload)["critical"]["image"]["docker-manifest-digest"]
    other = cosign.load_public_key(fixtures[1]["public_key"].encode(), "rsa")
    assert not cosign.verify(other, base64.b64decode(fixtures[0]["signature"]), fixtures[0]["payload"].encode())


def test_payload_fields_match_without_regard_to_case_but_not_twice():
    digest = "sha256:" + "cd" * 32
    shouted = {"Critical": {"Image": {"Docker-manifest-digest": digest}, "Type": cosign.PAYLOAD_TYPE}}
    assert cosign.signed_digest(json.dumps(shouted).encode()) == digest
    twice = b'{"critical":{"image":{"docker-manifest-digest":"%s","Docker-Manifest-Digest":"x"},"type":"%s"}}' % (
        digest.encode(),
        cosign.PAYLOAD_TYPE.encode(),
    )
    assert cosign.signed_digest(twice) is None
    wrong_type = {"critical": {"image": {"docker-manifest-digest": digest}, "type": "something else"}}
    assert cosign.signed_digest(json.dumps(wrong_type).encode()) is None


def test_signature_tags_name_their_subject():
    digest = "sha256:" + "ef" * 32
    assert cosign.signature_tag(digest) == "sha256-" + "ef" * 32 + ".sig"
    assert cosign.signature_tag_subject(cosign.signature_tag(digest)) == digest
    assert cosign.is_artifact_tag("sha256-" + "ef" * 32 + ".att")
    assert cosign.signature_tag_subject("sha256-" + "ef" * 32 + ".att") is None
    assert not cosign.is_artifact_tag("latest")


def test_images_are_told_from_signatures_and_other_artifacts():
    layer = {"mediaType": OCI_LAYER, "digest": "sha256:" + "0" * 64, "size": 1}
    image = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {"mediaType": OCI_CONFIG}, "layers": [layer]}
    assert is_image(json.dumps(image).encode())
    assert is_image(json.dumps({"schemaVersion": 2, "manifests": []}).encode())
    assert is_image(b"not json")
    assert is_image(json.dumps({**image, "layers": [{"digest": "x"}]}).encode())  # no media type: an image
    signature, _ = cosign.tag_scheme_manifest([{**layer, "mediaType": cosign.SIMPLE_SIGNING}])
    assert not is_image(signature)
    empty = {"mediaType": cosign.OCI_EMPTY, "digest": "sha256:" + "1" * 64, "size": 2}
    assert not is_image(json.dumps({**image, "config": empty, "layers": []}).encode())
    assert is_image(json.dumps({**image, "layers": []}).encode())  # an image config, no layers: still an image
    # Runtimes unpack a gzip tar whatever its layer's type says: such an image is still an image.
    for disguise in ("application/octet-stream", "application/x-tar", "application/tar+gzip", OCI_LAYER.title()):
        disguised = {**image, "layers": [{**layer, "mediaType": disguise}]}
        assert is_image(json.dumps(disguised).encode()), disguise
        mixed = {**image, "layers": [{**layer, "mediaType": cosign.SIMPLE_SIGNING}, {**layer, "mediaType": disguise}]}
        assert is_image(json.dumps(mixed).encode()), disguise
    assert is_image(json.dumps({**image, "config": {"mediaType": OCI_CONFIG.upper()}}).encode())
    # Attestations and SBOMs under an image config, and artifacts of their own config, are not.
    for kind in ("application/vnd.dsse.envelope.v1+json", "application/vnd.in-toto+json", "text/spdx"):
        assert not is_image(json.dumps({**image, "layers": [{**layer, "mediaType": kind}]}).encode()), kind
    helm = {"mediaType": "application/vnd.cncf.helm.config.v1+json"}
    chart = {**layer, "mediaType": "application/vnd.cncf.helm.chart.content.v1.tar+gzip"}
    assert not is_image(json.dumps({**image, "config": helm, "layers": [chart]}).encode())


# -- configuration -----------------------------------------------------------------------------


def _config(tmp_path: Path, policies: list[dict[str, Any]]) -> Path:
    path = tmp_path / "config.yml"
    storage = {"filesystem": {"rootdirectory": str(tmp_path / "registry")}}
    path.write_text(json.dumps({"storage": storage, "signatures": {"policies": policies}}))
    return path


def _public_key(tmp_path: Path, name: str = "cosign.pub", kind: str = "ecdsa-p256") -> tuple[Any, Path]:
    key = cosign.generate_key(kind)
    path = tmp_path / name
    path.write_bytes(cosign.public_pem(key.public_key()))
    return key, path


def test_policies_load_with_their_keys_read_and_globs_compiled(tmp_path):
    _, ec_pub = _public_key(tmp_path, "ec.pub")
    _, rsa_pub = _public_key(tmp_path, "rsa.pub", "rsa")
    _, ed_pub = _public_key(tmp_path, "ed.pub", "ed25519")
    config = load(
        str(
            _config(
                tmp_path,
                [
                    {"name": "production", "repositories": ["prod/**"], "keys": [str(ec_pub), str(rsa_pub)]},
                    {"repositories": ["staging/*"], "keys": [str(ed_pub)], "mode": "warn", "requiresignedtags": True},
                ],
            )
        ),
        environ={},
    )
    first, second = config.signatures.policies
    assert (first.name, first.mode, first.requiresignedtags, len(first.public_keys)) == (
        "production",
        "enforce",
        False,
        2,
    )
    assert first.patterns[0].fullmatch("prod/team/app") and not first.patterns[0].fullmatch("production/app")
    assert (second.name, second.mode, second.requiresignedtags) == ("staging/*", "warn", True)
    assert second.patterns[0].fullmatch("staging/app") and not second.patterns[0].fullmatch("staging/a/b")


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"keys": ["MISSING"]}, r"signatures\.policies\[0\]\.keys\[0\]: .*cannot read .*missing\.pub"),
        ({"keys": ["GARBAGE"]}, r"signatures\.policies\[0\]\.keys\[0\]: .*garbage\.pem is not a PEM public key"),
        ({"keys": ["PRIVATE"]}, r"signatures\.policies\[0\]\.keys\[0\]: .*private\.pem is not a PEM public key"),
        ({"keys": []}, r"signatures\.policies\[0\]\.keys: expected at least one public key file"),
        (
            {"keys": ["GOOD"], "mode": "audit"},
            r"signatures\.policies\[0\]\.mode: expected enforce or warn, got 'audit'",
        ),
        ({"keys": ["GOOD"], "repositories": []}, r"signatures\.policies\[0\]\.repositories: expected at least one"),
    ],
)
def test_a_bad_policy_stops_loading_naming_the_policy_and_the_key_file(tmp_path, policy, message):
    _, good = _public_key(tmp_path)
    (tmp_path / "garbage.pem").write_text("-----BEGIN PUBLIC KEY-----\nbm90IGEga2V5\n-----END PUBLIC KEY-----\n")
    (tmp_path / "private.pem").write_bytes(cosign.plain_private_key(cosign.generate_key("ecdsa-p256")))
    files = {
        "MISSING": tmp_path / "missing.pub",
        "GARBAGE": tmp_path / "garbage.pem",
        "PRIVATE": tmp_path / "private.pem",
    }
    files["GOOD"] = good
    policy = {"name": "p", **policy}
    policy["keys"] = [str(files[k]) for k in policy["keys"]]
    with pytest.raises(ConfigError, match=message):
        load(str(_config(tmp_path, [policy])), environ={})


def test_two_policies_with_one_name_are_refused(tmp_path):
    _, pub = _public_key(tmp_path)
    policies = [{"name": "same", "repositories": [r], "keys": [str(pub)]} for r in ("a/**", "b/**")]
    with pytest.raises(ConfigError, match=r"signatures\.policies: expected unique policy names .*got 'same'"):
        load(str(_config(tmp_path, policies)), environ={})


# -- the pull path's cost ----------------------------------------------------------------------


class CountingKV:
    """A KV that counts the calls made through it (each is one round trip to the coordinator)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name in ("get", "range", "count", "put", "delete", "txn", "grant_lease", "refresh_lease"):

            async def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls.append(name)
                return await attribute(*args, **kwargs)

            return counted
        return attribute


class CountingStorage:
    """A storage driver that counts reads and writes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name in ("stat", "read_bytes", "write_bytes", "copy", "delete", "modified"):

            async def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls.append(name)
                return await attribute(*args, **kwargs)

            return counted
        if name == "read":

            def read(*args: Any, **kwargs: Any) -> Any:
                self.calls.append(name)
                return attribute(*args, **kwargs)

            return read
        return attribute


@pytest.fixture
async def counted(tmp_path: Path) -> AsyncIterator[tuple[InProcessRegistry, CountingKV, CountingStorage, Any]]:
    from node.storage.filesystem import FilesystemDriver

    key, pub = _public_key(tmp_path)
    storage = CountingStorage(FilesystemDriver(str(tmp_path / "registry")))
    policies = [{"name": "production", "repositories": ["prod/**"], "keys": [str(pub)]}]
    registry = InProcessRegistry(tmp_path, storage=storage, signatures={"policies": policies})
    counting = CountingKV(registry.services.kv.inner)  # type: ignore[attr-defined]
    registry.services.kv.inner = counting  # type: ignore[attr-defined]
    try:
        yield registry, counting, storage, key
    finally:
        await registry.close()


async def _push_image(registry: InProcessRegistry, repo: str, tag: str) -> str:
    config, layer = json.dumps({"os": "linux", "architecture": "amd64"}).encode(), os.urandom(64)
    await registry.blob(repo, config)
    await registry.blob(repo, layer)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, layer)],
    }
    digest, _ = await registry.put_manifest(repo, tag, doc)
    return digest


async def _sign(registry: InProcessRegistry, repo: str, digest: str, key: Any) -> None:
    payload = cosign.simple_signing_payload(f"wharf/{repo}", digest)
    layer = cosign.layer_descriptor(payload, cosign.sign(key, payload))
    manifest, config = cosign.tag_scheme_manifest([layer])
    await registry.blob(repo, payload)
    await registry.blob(repo, config)
    response = await registry.http.put(
        f"/v2/{repo}/manifests/{cosign.signature_tag(digest)}", content=manifest, headers={"Content-Type": OCI_MANIFEST}
    )
    assert response.status_code == 201, response.text


def _kv_calls_of(calls: Sequence[str], start: int) -> list[str]:
    return [c for c in calls[start:] if c != "refresh_lease"]


async def test_a_verified_pull_costs_one_coordinator_read_and_no_storage_read(counted):
    registry, kv, storage, key = counted
    plain = await _push_image(registry, "open/app", "v1")
    signed = await _push_image(registry, "prod/app", "v1")
    await _sign(registry, "prod/app", signed, key)
    for path in ("/v2/open/app/manifests/v1", "/v2/prod/app/manifests/v1", f"/v2/prod/app/manifests/{signed}"):
        assert (await registry.http.get(path, headers=ANY)).status_code == 200  # warms the caches
    costs = {}
    for path in (
        "/v2/open/app/manifests/v1",
        f"/v2/open/app/manifests/{plain}",
        "/v2/prod/app/manifests/v1",
        f"/v2/prod/app/manifests/{signed}",
    ):
        kv_start, storage_start = len(kv.calls), len(storage.calls)
        response = await registry.http.get(path, headers=ANY)
        assert response.status_code == 200, response.text
        costs[path] = (_kv_calls_of(kv.calls, kv_start), storage.calls[storage_start:])
    assert costs["/v2/open/app/manifests/v1"] == (["get"], [])
    assert costs[f"/v2/open/app/manifests/{plain}"] == (["get"], [])
    # The tag (or record) and the signature tag's mark, read together in one read-only transaction.
    assert costs["/v2/prod/app/manifests/v1"] == (["txn"], [])
    assert costs[f"/v2/prod/app/manifests/{signed}"] == (["txn"], [])


async def test_a_refused_pull_is_also_answered_from_the_verdict_until_the_repository_changes(counted):
    registry, kv, storage, key = counted
    digest = await _push_image(registry, "prod/unsigned", "v1")
    assert (await registry.http.get("/v2/prod/unsigned/manifests/v1", headers=ANY)).status_code == 403
    start, storage_start = len(kv.calls), len(storage.calls)
    assert (await registry.http.get("/v2/prod/unsigned/manifests/v1", headers=ANY)).status_code == 403
    assert (_kv_calls_of(kv.calls, start), storage.calls[storage_start:]) == (["txn"], [])
    await _sign(registry, "prod/unsigned", digest, key)  # a push into the repository: the verdict is re-examined
    assert (await registry.http.get("/v2/prod/unsigned/manifests/v1", headers=ANY)).status_code == 200


async def test_head_answers_without_any_signature_check(counted):
    registry, kv, storage, _ = counted
    digest = await _push_image(registry, "prod/head", "v1")
    start = len(kv.calls)
    response = await registry.http.head("/v2/prod/head/manifests/v1", headers=ANY)
    assert response.status_code == 200 and response.headers["docker-content-digest"] == digest
    assert _kv_calls_of(kv.calls, start) == ["get"]


async def test_with_pull_lines_off_the_audit_log_still_records_refused_pulls(tmp_path):
    key, pub = _public_key(tmp_path)
    audit = tmp_path / "audit.log"
    policies = [{"name": "production", "repositories": ["prod/**"], "keys": [str(pub)]}]
    registry = InProcessRegistry(
        tmp_path, signatures={"policies": policies}, audit={"path": str(audit), "pulls": False}
    )
    try:
        refused = await _push_image(registry, "prod/unsigned", "v1")
        signed = await _push_image(registry, "prod/signed", "v1")
        await _sign(registry, "prod/signed", signed, key)
        assert (await registry.http.get("/v2/prod/unsigned/manifests/v1", headers=ANY)).status_code == 403
        assert (await registry.http.get("/v2/prod/signed/manifests/v1", headers=ANY)).status_code == 200
    finally:
        await registry.close()
    pulls = [json.loads(line) for line in audit.read_text().splitlines() if json.loads(line)["action"] == "pull"]
    assert [(p["repository"], p["decision"], p["rule"], p["digest"]) for p in pulls] == [
        ("prod/unsigned", "refused", "production", refused)
    ]
