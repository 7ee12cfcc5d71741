"""Trust on pull, over real HTTP: two `wharf serve` nodes sharing etcd and storage enforce signature policies.

Signatures come from `wharf sign` (the CLI, as a user runs it) and from tests/cosign_writer.py, a
writer of cosign's tag scheme written from cosign's specification that shares no code with Wharf.
Pulls are made with skopeo and with plain HTTP requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cosign_writer import write_signature
from images import make_index
from oci_client import OCI_CONFIG, OCI_MANIFEST, OCIClient, assert_error, descriptor
from services import EtcdCluster, wait_until
from skopeo import pull, pull_args, push, run_skopeo
from test_retention import _remove_prefix
from wharf_process import WharfProcess

from node import cosign

REPO_ROOT = Path(__file__).resolve().parent.parent
ANY = {"Accept": "*/*"}
PASSWORD = "correct horse"


class Keys:
    """Key pairs written to files: `trusted` (the policies' key, cosign-encrypted), `other` (no policy's)."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.trusted = cosign.generate_key("ecdsa-p256")
        self.other = cosign.generate_key("ecdsa-p256")
        self.rsa = cosign.generate_key("rsa")
        self.ed25519 = cosign.generate_key("ed25519")
        self.trusted_key = self._write("trusted.key", cosign.encrypt_private_key(self.trusted, PASSWORD.encode()))
        self.other_key = self._write("other.key", cosign.plain_private_key(self.other))
        self.trusted_pub = self._write("trusted.pub", cosign.public_pem(self.trusted.public_key()))
        self.other_pub = self._write("other.pub", cosign.public_pem(self.other.public_key()))
        self.rsa_pub = self._write("rsa.pub", cosign.public_pem(self.rsa.public_key()))
        self.ed25519_pub = self._write("ed25519.pub", cosign.public_pem(self.ed25519.public_key()))

    def _write(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return Keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdCluster, keys: Keys) -> Iterator[list[WharfProcess]]:
    """Two nodes from the same settings, sharing etcd and the storage, each with its own audit log."""
    base = tmp_path_factory.mktemp("signatures")
    prefix = f"/wharf-signatures-{uuid.uuid4().hex[:8]}/"
    trusted = [str(keys.trusted_pub), str(keys.rsa_pub), str(keys.ed25519_pub)]
    policies = [
        {"name": "production", "repositories": ["prod/**"], "keys": trusted, "mode": "enforce"},
        {"name": "staging-watch", "repositories": ["staging/**"], "keys": trusted, "mode": "warn"},
        {"name": "locked", "repositories": ["locked/*"], "keys": trusted, "requiresignedtags": True},
    ]
    processes = [
        WharfProcess(
            base / f"node{i}",
            storage={"filesystem": {"rootdirectory": str(base / "storage")}, "delete": {"enabled": True}},
            coordinator={"etcd": {"endpoints": etcd.endpoints, "prefix": prefix}},
            cluster={"node": f"node{i}", "leasettl": 3},
            signatures={"policies": policies},
            audit={"path": str(base / f"node{i}" / "audit.log")},
        )
        for i in range(2)
    ]
    try:
        for process in processes:
            process.start()
        yield processes
    finally:
        for process in processes:
            process.stop()
        _remove_prefix(etcd, prefix)


@pytest.fixture(scope="module")
def clients(nodes: list[WharfProcess]) -> Iterator[list[httpx.Client]]:
    made = [httpx.Client(base_url=node.url, timeout=30) for node in nodes]
    try:
        yield made
    finally:
        for client in made:
            client.close()


def _repo(prefix: str = "prod") -> str:
    return f"{prefix}/app-{uuid.uuid4().hex[:10]}"


def _image(client: httpx.Client, repo: str, tag: str | None = "v1") -> str:
    return OCIClient(client).push_image(repo, tag, layers=[os.urandom(64)]).digest


def wharf_cli(
    *args: str, password: str | None = PASSWORD, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    env.pop("COSIGN_PASSWORD", None)
    if password is not None:
        env["COSIGN_PASSWORD"] = password
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env=env,
        input=stdin,
    )


def wharf_sign(node: WharfProcess, ref: str, key: Path, *extra: str) -> None:
    result = wharf_cli("sign", "--key", str(key), "--plain-http", *extra, f"{node.host}/{ref}")
    assert result.returncode == 0, result.stderr


def wharf_verify(node: WharfProcess, ref: str, key: Path) -> subprocess.CompletedProcess[str]:
    return wharf_cli("verify", "--key", str(key), "--plain-http", f"{node.host}/{ref}", password=None)


def _refused(response: httpx.Response, rule: str = "production") -> dict[str, Any]:
    error = assert_error(response, 403, "DENIED")
    assert error["detail"]["rule"] == rule and f"signature policy {rule}" in error["message"], error
    return error


def _audit(node: WharfProcess) -> list[dict[str, Any]]:
    path = node.data_dir / "audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _audited(node: WharfProcess, repo: str, decision: str) -> list[dict[str, Any]]:
    return [
        e for e in _audit(node) if e["action"] == "pull" and e["repository"] == repo and e.get("decision") == decision
    ]


# -- enforce -----------------------------------------------------------------------------------


def test_an_unsigned_image_is_refused_over_http_and_to_skopeo_but_head_still_answers(nodes, clients, tmp_path):
    repo = _repo()
    digest = _image(clients[0], repo)
    for client in clients:
        for reference in ("v1", digest):
            error = _refused(client.get(f"/v2/{repo}/manifests/{reference}", headers=ANY))
            assert error["detail"]["digest"] == digest and "no valid signature" in error["detail"]["reason"]
        head = client.head(f"/v2/{repo}/manifests/v1", headers=ANY)
        assert head.status_code == 200 and head.headers["docker-content-digest"] == digest
    result = run_skopeo(*pull_args(f"{nodes[1].host}/{repo}:v1", tmp_path / "out", "v1"))
    assert not result.ok and "denied" in result.stderr.lower(), result.describe()


def test_an_unsigned_image_is_refused_whatever_its_layers_media_type_says(clients):
    """podman unpacks a gzip tar typed application/octet-stream (or the OCI type in another case):
    calling the layer something else must not turn an image into an artifact the policy lets by."""
    oci = OCIClient(clients[0])
    for disguise in ("application/octet-stream", "application/x-tar", "Application/vnd.oci.image.layer.v1.tar+gzip"):
        repo = _repo()
        config = json.dumps({"architecture": "amd64", "os": "linux"}).encode()
        layer = os.urandom(64)
        for blob in (config, layer):
            oci.push_blob(repo, blob)
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config),
            "layers": [descriptor(disguise, layer)],
        }
        digest = oci.push_manifest(repo, "v1", doc).digest
        for client in clients:
            for reference in ("v1", digest):
                error = _refused(client.get(f"/v2/{repo}/manifests/{reference}", headers=ANY))
                assert "no valid signature" in error["detail"]["reason"], disguise


def test_an_image_signed_by_wharf_sign_pulls_on_every_node_and_wharf_verify_checks_it(nodes, clients, keys, tmp_path):
    repo = _repo()
    digest = _image(clients[0], repo)
    wharf_sign(nodes[0], f"{repo}:v1", keys.trusted_key)
    for client in clients:
        for reference in ("v1", digest):
            response = client.get(f"/v2/{repo}/manifests/{reference}", headers=ANY)
            assert response.status_code == 200, response.text
    pull(f"{nodes[1].host}/{repo}:v1", tmp_path / "out", "v1")
    verified = wharf_verify(nodes[1], f"{repo}:v1", keys.trusted_pub)
    assert verified.returncode == 0, verified.stderr
    (claims,) = json.loads(verified.stdout)
    assert claims["critical"]["image"]["docker-manifest-digest"] == digest
    assert claims["critical"]["type"] == "cosign container image signature"
    assert wharf_verify(nodes[1], f"{repo}@{digest}", keys.other_pub).returncode == 1


def test_a_signature_by_another_key_does_not_count(nodes, clients, keys):
    repo = _repo()
    digest = _image(clients[0], repo)
    wharf_sign(nodes[0], f"{repo}:v1", keys.other_key)
    _refused(clients[1].get(f"/v2/{repo}/manifests/{digest}", headers=ANY))
    assert wharf_verify(nodes[0], f"{repo}:v1", keys.other_pub).returncode == 0  # it is a good signature, by another


def test_a_signature_over_another_digest_does_not_count(clients, keys):
    repo = _repo()
    digest = _image(clients[0], repo)
    other = _image(clients[0], repo, "v2")
    response = write_signature(clients[0], repo, digest, keys.trusted, claims_digest=other)
    assert response.status_code == 201, response.text
    _refused(clients[1].get(f"/v2/{repo}/manifests/v1", headers=ANY))


def test_a_tampered_payload_does_not_count(clients, keys):
    repo = _repo()
    digest = _image(clients[0], repo)
    assert write_signature(clients[0], repo, digest, keys.trusted, tamper=True).status_code == 201
    _refused(clients[1].get(f"/v2/{repo}/manifests/v1", headers=ANY))
    assert write_signature(clients[0], repo, digest, keys.trusted).status_code == 201  # the honest one, in its place
    assert clients[1].get(f"/v2/{repo}/manifests/v1", headers=ANY).status_code == 200


@pytest.mark.parametrize("kind", ["trusted", "rsa", "ed25519"])
def test_signatures_from_an_independent_writer_of_the_tag_scheme_count_and_verify(nodes, clients, keys, kind):
    # tests/cosign_writer.py is written from cosign's specification alone, sharing no code with Wharf.
    repo = _repo()
    digest = _image(clients[0], repo)
    assert write_signature(clients[1], repo, digest, getattr(keys, kind)).status_code == 201
    assert clients[0].get(f"/v2/{repo}/manifests/v1", headers=ANY).status_code == 200
    public = {"trusted": keys.trusted_pub, "rsa": keys.rsa_pub, "ed25519": keys.ed25519_pub}[kind]
    verified = wharf_verify(nodes[0], f"{repo}:v1", public)
    assert verified.returncode == 0, verified.stderr


def test_deleting_the_signature_refuses_the_next_pull_on_every_node(nodes, clients, keys):
    repo = _repo()
    digest = _image(clients[0], repo)
    wharf_sign(nodes[0], f"{repo}:v1", keys.trusted_key)
    for _ in range(3):  # each node verifies, then answers from its cache
        for client in clients:
            assert client.get(f"/v2/{repo}/manifests/v1", headers=ANY).status_code == 200
            assert client.get(f"/v2/{repo}/manifests/{digest}", headers=ANY).status_code == 200
    deleted = clients[1].delete(f"/v2/{repo}/manifests/{cosign.signature_tag(digest)}")
    assert deleted.status_code == 202, deleted.text
    # No wait: the very next pull on the node that did not see the delete is refused.
    _refused(clients[0].get(f"/v2/{repo}/manifests/v1", headers=ANY))
    _refused(clients[0].get(f"/v2/{repo}/manifests/{digest}", headers=ANY))
    _refused(clients[1].get(f"/v2/{repo}/manifests/v1", headers=ANY))
    wharf_sign(nodes[1], f"{repo}@{digest}", keys.trusted_key)  # signed again: pullable again
    assert clients[0].get(f"/v2/{repo}/manifests/v1", headers=ANY).status_code == 200


def test_a_signature_stored_as_a_referrer_counts_until_it_is_deleted(nodes, clients, keys):
    repo = _repo()
    digest = _image(clients[0], repo)
    wharf_sign(nodes[0], f"{repo}:v1", keys.trusted_key, "--referrer", "--no-tag")
    assert clients[1].get(f"/v2/{repo}/tags/list").json()["tags"] == ["v1"]  # no .sig tag: a referrer only
    (referrer,) = clients[1].get(f"/v2/{repo}/referrers/{digest}").json()["manifests"]
    assert referrer["artifactType"] == cosign.SIGNATURE_ARTIFACT
    for client in clients:
        assert client.get(f"/v2/{repo}/manifests/v1", headers=ANY).status_code == 200
    assert wharf_verify(nodes[1], f"{repo}:v1", keys.trusted_pub).returncode == 0
    assert clients[0].delete(f"/v2/{repo}/manifests/{referrer['digest']}").status_code == 202
    for client in clients:
        _refused(client.get(f"/v2/{repo}/manifests/v1", headers=ANY))


def test_signatures_their_blobs_and_referrers_stay_readable_under_enforce(nodes, clients, keys):
    repo = _repo()
    digest = _image(clients[0], repo)
    wharf_sign(nodes[0], f"{repo}:v1", keys.trusted_key, "--referrer")
    client = clients[1]
    signature = client.get(f"/v2/{repo}/manifests/{cosign.signature_tag(digest)}", headers=ANY)
    assert signature.status_code == 200, signature.text
    (layer,) = json.loads(signature.content)["layers"]
    payload = client.get(f"/v2/{repo}/blobs/{layer['digest']}")
    assert payload.status_code == 200 and cosign.signed_digest(payload.content) == digest
    (referrer,) = client.get(f"/v2/{repo}/referrers/{digest}").json()["manifests"]
    assert client.get(f"/v2/{repo}/manifests/{referrer['digest']}", headers=ANY).status_code == 200
    # The image's own blobs are not held back either: the manifest GET is what a policy stops.
    unsigned = OCIClient(client).push_image(repo, "v2", layers=[b"unsigned layer"])
    _refused(client.get(f"/v2/{repo}/manifests/v2", headers=ANY))
    assert json.loads(unsigned.body)["layers"][0]["digest"]
    assert client.get(f"/v2/{repo}/blobs/{json.loads(unsigned.body)['layers'][0]['digest']}").status_code == 200


# -- indexes -----------------------------------------------------------------------------------


def test_a_multi_arch_index_signed_once_pulls_on_every_platform_with_skopeo_all(nodes, clients, keys, tmp_path):
    repo = _repo()
    platforms = [("linux", "amd64"), ("linux", "arm64"), ("linux", "s390x")]
    built = make_index(tmp_path / "src", "multi", platforms=platforms, layers=1, layer_size=4096)
    push(tmp_path / "src", "multi", f"{nodes[0].host}/{repo}:1.0", "--all", "--dest-tls-verify=false")
    children = [image.digest for image in built.images.values()]
    for child in children:
        _refused(clients[1].get(f"/v2/{repo}/manifests/{child}", headers=ANY))
    assert run_skopeo(*pull_args(f"{nodes[1].host}/{repo}:1.0", tmp_path / "refused", "x", "--all")).ok is False
    wharf_sign(nodes[0], f"{repo}:1.0", keys.trusted_key)  # the index only, once
    pull(f"{nodes[1].host}/{repo}:1.0", tmp_path / "all", "x", "--all")
    index = json.loads((tmp_path / "all" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == built.digest
    for child in children:
        stored = tmp_path / "all" / "blobs" / "sha256" / child.split(":", 1)[1]
        assert stored.exists(), f"{child} was not copied"
    # A child fetched first on a node that never saw the index is found through it too.
    for client in clients:
        assert client.get(f"/v2/{repo}/manifests/{children[-1]}", headers=ANY).status_code == 200
    # In another repository the same child is not covered by this repository's signed index.
    elsewhere = _repo()
    push(tmp_path / "src", "multi", f"{nodes[0].host}/{elsewhere}:1.0", "--all", "--dest-tls-verify=false")
    _refused(clients[0].get(f"/v2/{elsewhere}/manifests/{children[0]}", headers=ANY))


# -- warn, audit, metrics ----------------------------------------------------------------------


def test_warn_serves_an_unsigned_image_logs_and_counts_it(nodes, clients):
    repo = _repo("staging")
    digest = _image(clients[0], repo)
    before = len(nodes[1].log_text())
    response = clients[1].get(f"/v2/{repo}/manifests/v1", headers=ANY)
    assert response.status_code == 200 and response.headers["docker-content-digest"] == digest
    warning = wait_until(
        lambda: next(
            (line for line in nodes[1].log_text()[before:].splitlines() if repo in line and "warn" in line), None
        ),
        timeout=10,
        what="the warning line",
    )
    assert "staging-watch" in warning and digest in warning
    (entry,) = _audited(nodes[1], repo, "warned")
    assert entry["rule"] == "staging-watch" and entry["result"] == "success" and entry["digest"] == digest
    metrics = httpx.get(nodes[1].metrics_url).text
    assert 'wharf_signature_pulls_total{decision="warned",rule="staging-watch"}' in metrics


def test_the_audit_log_names_the_rule_on_every_decision(nodes, clients, keys):
    repo = _repo()
    digest = _image(clients[0], repo)
    _refused(clients[0].get(f"/v2/{repo}/manifests/v1", headers=ANY))
    wharf_sign(nodes[1], f"{repo}:v1", keys.trusted_key)
    assert clients[0].get(f"/v2/{repo}/manifests/v1", headers=ANY).status_code == 200
    assert clients[0].get(f"/v2/{repo}/manifests/{cosign.signature_tag(digest)}", headers=ANY).status_code == 200
    pulls = [e for e in _audit(nodes[0]) if e["action"] == "pull" and e["repository"] == repo]
    assert [(e["decision"], e["rule"], e["result"]) for e in pulls] == [
        ("refused", "production", "denied"),
        ("allowed", "production", "success"),
        ("allowed", "production", "success"),
    ]
    assert "no valid signature" in pulls[0]["signature"] and pulls[0]["digest"] == digest
    assert pulls[0]["refused_by"] == "signature", "refused like every other check, by name"
    assert "signed (tag sha256-" in pulls[1]["signature"]
    assert "not an image" in pulls[2]["signature"]
    metrics = httpx.get(nodes[0].metrics_url).text
    assert 'wharf_signature_pulls_total{decision="refused",rule="production"}' in metrics
    assert 'wharf_signature_pulls_total{decision="allowed",rule="production"}' in metrics
    # Pulls outside every policy carry no decision.
    open_repo = _repo("open")
    _image(clients[0], open_repo)
    assert clients[0].get(f"/v2/{open_repo}/manifests/v1", headers=ANY).status_code == 200
    (line,) = [e for e in _audit(nodes[0]) if e["action"] == "pull" and e["repository"] == open_repo]
    assert line.get("rule") is None and "decision" not in line


# -- requiresignedtags -------------------------------------------------------------------------


def test_a_tag_may_point_only_at_a_signed_image_under_requiresignedtags(nodes, clients, keys):
    repo = _repo("locked")
    oci = OCIClient(clients[0])
    image = oci.push_image(repo, None, layers=[os.urandom(64)])  # by digest: allowed
    error = assert_error(oci.put_manifest(repo, "v1", image.body, image.media_type), 403, "DENIED")
    assert error["detail"]["rule"] == "locked" and "signed image" in error["message"]
    wharf_sign(nodes[1], f"{repo}@{image.digest}", keys.trusted_key)  # its .sig tag is allowed
    assert oci.put_manifest(repo, "v1", image.body, image.media_type).status_code == 201
    assert clients[1].get(f"/v2/{repo}/manifests/v1", headers=ANY).status_code == 200
    other = OCIClient(clients[1]).push_image(repo, None, layers=[os.urandom(64)])
    error = assert_error(OCIClient(clients[1]).put_manifest(repo, "v1", other.body, other.media_type), 403, "DENIED")
    assert clients[0].head(f"/v2/{repo}/manifests/v1", headers=ANY).headers["docker-content-digest"] == image.digest
    assert 'wharf_signature_tags_refused_total{rule="locked"}' in httpx.get(nodes[1].metrics_url).text


# -- the commands ------------------------------------------------------------------------------


def test_wharf_keygen_writes_a_pair_that_signs_and_verifies(nodes, clients, tmp_path):
    prefix = tmp_path / "made"
    result = wharf_cli("keygen", "--output-key-prefix", str(prefix))
    assert result.returncode == 0, result.stderr
    private = (tmp_path / "made.key").read_bytes()
    assert private.startswith(b"-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----")
    assert oct((tmp_path / "made.key").stat().st_mode & 0o777) == "0o600"
    assert wharf_cli("keygen", "--output-key-prefix", str(prefix)).returncode == 1  # never overwrites unasked
    repo = _repo("open")
    _image(clients[0], repo)
    wrong = wharf_cli("sign", "--key", f"{prefix}.key", "--plain-http", f"{nodes[0].host}/{repo}:v1", password="x")
    assert wrong.returncode == 1 and "wrong password" in wrong.stderr
    wharf_sign(nodes[0], f"{repo}:v1", tmp_path / "made.key")
    assert wharf_verify(nodes[1], f"{repo}:v1", tmp_path / "made.pub").returncode == 0
    plain = wharf_cli("keygen", "--output-key-prefix", str(tmp_path / "plain"), "--plain", "--type", "ed25519")
    assert plain.returncode == 0 and (tmp_path / "plain.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    wharf_sign(nodes[0], f"{repo}:v1", tmp_path / "plain.key", "-a", "team=release")
    verified = wharf_verify(nodes[0], f"{repo}:v1", tmp_path / "plain.pub")
    assert verified.returncode == 0
    assert {"team": "release"} in [claims["optional"] for claims in json.loads(verified.stdout)]


def test_wharf_sign_adds_a_signature_beside_those_already_at_the_tag(nodes, clients, keys):
    repo = _repo()
    digest = _image(clients[0], repo)
    wharf_sign(nodes[0], f"{repo}:v1", keys.other_key)
    wharf_sign(nodes[1], f"{repo}:v1", keys.trusted_key)
    wharf_sign(nodes[1], f"{repo}:v1", keys.trusted_key)  # the same signature again: not added twice
    body = clients[0].get(f"/v2/{repo}/manifests/{cosign.signature_tag(digest)}", headers=ANY).content
    assert len(cosign.signature_layers(body)) == 2
    assert clients[0].get(f"/v2/{repo}/manifests/v1", headers=ANY).status_code == 200
    assert wharf_verify(nodes[0], f"{repo}:v1", keys.other_pub).returncode == 0


def test_a_bad_key_in_a_policy_stops_start_up_naming_the_key_and_its_file(tmp_path, keys):
    bad = tmp_path / "broken.pub"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    config = tmp_path / "config.yml"
    policy = {"name": "production", "repositories": ["prod/**"], "keys": [str(keys.trusted_pub), str(bad)]}
    storage = {"filesystem": {"rootdirectory": str(tmp_path / "registry")}}
    config.write_text(json.dumps({"storage": storage, "signatures": {"policies": [policy]}}))
    result = wharf_cli("serve", str(config), password=None)
    assert result.returncode == 2
    assert "signatures.policies[0].keys[1]" in result.stderr and str(bad) in result.stderr
