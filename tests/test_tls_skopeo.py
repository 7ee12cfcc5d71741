"""skopeo over TLS against basic and token auth, trusting the certificate `wharf cert` made; no secret in logs.

skopeo verifies TLS here (`--*-tls-verify=true`) with a cert dir that holds only `ca.crt`, as
docker's certs.d would; policy checks stay off (`--insecure-policy`), there is no signature to check.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from images import assert_same_image, make_image
from secure_registry import (
    TEAM_ACCESS,
    TEAM_USERS,
    SecureWharf,
    assert_no_secrets,
    bearer,
    cert_dir_for_clients,
    fetch_token,
    make_cert,
    make_users,
    token_section,
    wharf_cli,
)

SKOPEO_TIMEOUT = 120.0


def skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    command = ["skopeo", "--insecure-policy", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=SKOPEO_TIMEOUT, stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stderr}"
    return result


def creds(user: str) -> str:
    return f"{user}:{TEAM_USERS[user]}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    result = wharf_cli("cert", "127.0.0.1", "localhost", "--dir", str(root / "certs"))
    assert "domain.crt" in result.stdout
    cert, key = root / "certs" / "domain.crt", root / "certs" / "domain.key"
    return root, cert, key, cert_dir_for_clients(cert, root / "trust")


def _serve(root: Path, cert: Path, key: Path, auth: dict, name: str) -> SecureWharf:
    return SecureWharf(
        root / name,
        ca=cert,
        http={"tls": {"certificate": str(cert), "key": str(key)}},
        auth=auth,
        access=TEAM_ACCESS,
        audit={"path": str(root / name / "audit.log")},
        ratelimit={"authfailures": {"peraddress": 0, "peruser": 0}},
    )


@pytest.fixture(scope="module")
def registries(tls):
    root, cert, key, _ = tls
    users = make_users(root / "htpasswd", TEAM_USERS)
    token_keys = make_cert(root / "token-keys", "wharf-token-signer")
    basic = _serve(root, cert, key, {"htpasswd": {"realm": "Wharf TLS", "path": str(users)}}, "basic")
    token = _serve(root, cert, key, token_section(token_keys[1], users), "token")
    with basic, token:
        yield {"basic": basic, "token": token}


@pytest.mark.parametrize("mode", ["basic", "token"])
def test_skopeo_pushes_and_pulls_over_tls_with_credentials(tls, registries, tmp_path, mode):
    _, _, _, trust = tls
    registry = registries[mode]
    image = make_image(tmp_path / "src", "v1", layers=2, layer_size=128 * 1024, seed=41)
    target = f"docker://{registry.host}/ci/{mode}-app:v1"
    skopeo(
        "copy",
        "--dest-creds", creds("robot"),
        "--dest-tls-verify=true",
        "--dest-cert-dir", str(trust),
        "--preserve-digests",
        f"oci:{tmp_path / 'src'}:v1",
        target,
    )  # fmt: skip
    skopeo(
        "copy",
        "--src-creds", creds("dev"),
        "--src-tls-verify=true",
        "--src-cert-dir", str(trust),
        "--preserve-digests",
        target,
        f"oci:{tmp_path / 'out'}:v1",
    )  # fmt: skip
    assert assert_same_image(tmp_path / "src", "v1", tmp_path / "out", "v1") == image.digest
    inspected = skopeo("inspect", "--creds", creds("dev"), "--cert-dir", str(trust), target)
    assert image.digest in inspected.stdout


@pytest.mark.parametrize("mode", ["basic", "token"])
def test_skopeo_is_refused_with_wrong_or_insufficient_credentials(tls, registries, tmp_path, mode):
    _, _, _, trust = tls
    registry = registries[mode]
    make_image(tmp_path / "src", "v1", layers=1, layer_size=1024, seed=42)
    source = f"oci:{tmp_path / 'src'}:v1"
    common = ["--dest-tls-verify=true", "--dest-cert-dir", str(trust)]
    wrong = skopeo(
        "copy", "--dest-creds", "robot:wrong", *common, source, f"docker://{registry.host}/ci/x:v1", check=False
    )
    assert wrong.returncode != 0 and ("401" in wrong.stderr or "unauthorized" in wrong.stderr.lower()), wrong.stderr
    # dev may pull everything but push nothing.
    denied = skopeo(
        "copy", "--dest-creds", creds("dev"), *common, source, f"docker://{registry.host}/ci/x:v1", check=False
    )
    assert denied.returncode != 0, denied.stderr
    assert any(word in denied.stderr.lower() for word in ("denied", "unauthorized", "401", "403")), denied.stderr


def test_skopeo_refuses_the_registry_without_the_ca(registries, tmp_path):
    empty = tmp_path / "no-ca"
    empty.mkdir()
    registry = registries["basic"]
    result = skopeo(
        "inspect",
        "--creds",
        creds("dev"),
        "--cert-dir",
        str(empty),
        f"docker://{registry.host}/ci/basic-app:v1",
        check=False,
    )
    assert result.returncode != 0
    assert "certificate" in result.stderr.lower() or "x509" in result.stderr.lower(), result.stderr


def test_the_token_service_and_registry_speak_http2_over_tls(registries):
    registry = registries["token"]
    with registry.client(auth=("dev", TEAM_USERS["dev"]), http2=True) as http:
        response = http.get("/auth/token", params={"service": "wharf-test-registry", "scope": "registry:catalog:*"})
        assert response.status_code == 200 and response.http_version == "HTTP/2"
        token = response.json()["token"]
    with registry.client(headers=bearer(token), http2=True) as http:
        response = http.get("/v2/_catalog")
        assert response.status_code == 200 and response.http_version == "HTTP/2"


def test_no_password_token_or_authorization_value_reaches_any_log(tls, registries, tmp_path):
    """The logs of everything this module ran, plus a run of its own with every kind of secret in play."""
    root, _, _, trust = tls
    make_image(tmp_path / "src", "v1", layers=1, layer_size=4096, seed=43)
    secrets = list(TEAM_USERS.values())
    secrets += [base64.b64encode(creds(user).encode()).decode() for user in TEAM_USERS]
    for mode, registry in registries.items():
        target = f"docker://{registry.host}/ci/secrets-{mode}:v1"
        skopeo(
            "copy", "--dest-creds", creds("robot"), "--dest-cert-dir", str(trust), f"oci:{tmp_path / 'src'}:v1", target
        )
        skopeo("inspect", "--creds", creds("admin"), "--cert-dir", str(trust), target)
        skopeo(
            "inspect", "--creds", "admin:wrong-" + TEAM_USERS["admin"], "--cert-dir", str(trust), target, check=False
        )
        secrets.append(base64.b64encode(("admin:wrong-" + TEAM_USERS["admin"]).encode()).decode())
        with registry.client(auth=("admin", "bad-" + TEAM_USERS["admin"])) as http:
            http.get("/v2/_catalog")
            http.get("/auth/token", params={"scope": "registry:catalog:*"})
    token_registry = registries["token"]
    token = fetch_token(
        token_registry, ["repository:ci/secrets-token:pull", "registry:catalog:*"], ("admin", TEAM_USERS["admin"])
    )
    secrets.append(token)
    with token_registry.client(headers=bearer(token)) as http:
        assert http.get("/v2/_catalog").status_code == 200
        assert http.get("/v2/ci/other/tags/list").status_code == 401  # insufficient scope: audited
    with token_registry.client(headers=bearer(token[:-6] + "AAAAAA")) as http:
        assert http.get("/v2/").status_code == 401  # a bad token: audited
    with token_registry.client() as http:
        response = http.post(
            "/auth/token",
            data={
                "grant_type": "password",
                "username": "robot",
                "password": TEAM_USERS["robot"],
                "access_type": "offline",
            },
        )
        refresh = response.json()["refresh_token"]
        secrets.append(refresh)
        assert (
            http.post("/auth/token", data={"grant_type": "refresh_token", "refresh_token": refresh}).status_code == 200
        )
    logs = []
    for registry in registries.values():
        logs += [registry.log_path, registry.data_dir / "audit.log"]
    assert all(path.exists() and path.stat().st_size > 0 for path in logs)
    assert_no_secrets(logs, secrets)
    # The token-mode refusals and answers, each one line naming what refused it.
    lines = [json.loads(line) for line in (token_registry.data_dir / "audit.log").read_text().splitlines()]
    scope = [e for e in lines if e["refused_by"] == "access" and e["repository"] == "ci/other"]
    assert scope and scope[-1]["action"] == "pull" and scope[-1]["rule"] == "repository:ci/other:pull"
    bad = [e for e in lines if e["refused_by"] == "signin" and e["action"] == "login"]
    assert bad and bad[-1]["status"] == 401, lines[-5:]
    tokens = [e for e in lines if e["action"] == "token" and e["result"] == "success"]
    assert any(e["user"] == "robot" for e in tokens)
    assert any(e["granted"] == "repository:ci/secrets-token:pull registry:catalog:*" for e in tokens)
    assert_no_secrets(sorted(Path(root).rglob("*.log")), secrets)
