"""Token auth: the built-in token service, and nodes that refuse every token they should not trust."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from oci_client import OCIClient
from secure_registry import (
    TEAM_ACCESS,
    TEAM_USERS,
    TOKEN_ISSUER,
    TOKEN_SERVICE,
    SecureWharf,
    assert_refused,
    bearer,
    fetch_token,
    make_cert,
    make_users,
    token_section,
)

from node.auth.access import Access
from node.auth.token import InvalidToken, TokenIssuer, TokenVerifier, key_id

LIBTRUST_KID = re.compile(r"(?:[A-Z2-7]{4}:){11}[A-Z2-7]{4}")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> tuple[Path, Path]:
    return make_cert(tmp_path_factory.mktemp("token-keys"), "127.0.0.1")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, keys):
    root = tmp_path_factory.mktemp("token")
    users = make_users(root / "htpasswd", TEAM_USERS)
    with SecureWharf(
        root / "wharf",
        http={"insecure": True},
        auth=token_section(keys[1], users, expiration="2m"),
        access=TEAM_ACCESS,
        ratelimit={"authfailures": {"peraddress": 0, "peruser": 0}},
    ) as process:
        yield process


def _private_key(path: Path) -> Any:
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": TOKEN_ISSUER,
        "sub": "admin",
        "aud": TOKEN_SERVICE,
        "exp": now + 300,
        "nbf": now,
        "iat": now,
        "jti": "test",
        "access": [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}],
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(key: Any, claims: dict[str, Any], *, algorithm: str = "ES256", kid: str | None = None) -> str:
    kid = kid or key_id(key.public_key())
    return jwt.encode(claims, key, algorithm=algorithm, headers={"kid": kid})


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{_b64(signature)}"


def _decode(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return jwt.get_unverified_header(token), jwt.decode(token, options={"verify_signature": False})


# -- the token service -------------------------------------------------------------------------


def test_token_service_issues_a_signed_jwt_with_the_granted_scopes(registry, keys):
    with registry.client(auth=("admin", TEAM_USERS["admin"])) as http:
        response = http.get(
            "/auth/token",
            params={
                "service": TOKEN_SERVICE,
                "account": "admin",
                "scope": ["repository:team/app:pull,push", "registry:catalog:*"],
            },
        )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token"] == body["access_token"] and body["expires_in"] == 120
    header, claims = _decode(body["token"])
    public = _private_key(keys[1]).public_key()
    assert header["alg"] == "ES256" and header["kid"] == key_id(public) and LIBTRUST_KID.fullmatch(header["kid"])
    assert claims["iss"] == TOKEN_ISSUER and claims["aud"] == TOKEN_SERVICE and claims["sub"] == "admin"
    assert claims["exp"] - claims["iat"] == 120 and claims["nbf"] <= time.time() + 1 and claims["jti"]
    assert claims["access"] == [
        {"type": "repository", "name": "team/app", "actions": ["pull", "push"]},
        {"type": "registry", "name": "catalog", "actions": ["*"]},
    ]
    jwt.decode(body["token"], public, algorithms=["ES256"], audience=TOKEN_SERVICE, issuer=TOKEN_ISSUER)


def test_token_grants_only_what_the_access_rules_allow(registry):
    token = fetch_token(registry, ["repository:team/app:pull,push,delete"], ("dev", TEAM_USERS["dev"]))
    assert _decode(token)[1]["access"] == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    token = fetch_token(registry, ["repository:ci/build:*", "repository:team/app:push"], ("robot", TEAM_USERS["robot"]))
    assert _decode(token)[1]["access"] == [{"type": "repository", "name": "ci/build", "actions": ["pull", "push"]}]


def test_anonymous_tokens_carry_only_anonymous_pulls(registry):
    token = fetch_token(registry, ["repository:public/base:pull,push", "repository:team/app:pull"])
    _, claims = _decode(token)
    assert claims["sub"] == ""
    assert claims["access"] == [{"type": "repository", "name": "public/base", "actions": ["pull"]}]


def test_token_service_refuses_wrong_passwords_and_other_services(registry):
    with registry.client(auth=("admin", "wrong")) as http:
        response = http.get("/auth/token", params={"service": TOKEN_SERVICE, "scope": "repository:team/app:pull"})
        assert_refused(response, 401, "UNAUTHORIZED")
        assert response.headers["www-authenticate"].startswith("Basic realm=")
        assert "token" not in response.text
    with registry.client(auth=("admin", TEAM_USERS["admin"])) as http:
        assert_refused(http.get("/auth/token", params={"service": "elsewhere"}), 403, "DENIED")


def test_oauth2_password_and_refresh_grants(registry):
    with registry.client() as http:
        response = http.post(
            "/auth/token",
            data={
                "grant_type": "password",
                "username": "robot",
                "password": TEAM_USERS["robot"],
                "service": TOKEN_SERVICE,
                "scope": "repository:ci/build:pull,push",
                "client_id": "test",
                "access_type": "offline",
            },
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert _decode(body["access_token"])[1]["sub"] == "robot"
        refresh = body["refresh_token"]
        # A refresh token is no access token.
        assert_refused(http.get("/v2/", headers=bearer(refresh)), 401, "UNAUTHORIZED")
        response = http.post(
            "/auth/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": refresh,
                "service": TOKEN_SERVICE,
                "scope": "repository:ci/build:pull",
            },
        )
        assert response.status_code == 200, response.text
        _, claims = _decode(response.json()["access_token"])
        assert claims["sub"] == "robot" and claims["access"][0]["actions"] == ["pull"]
        wrong = http.post(
            "/auth/token",
            data={"grant_type": "password", "username": "robot", "password": "x", "service": TOKEN_SERVICE},
        )
        assert_refused(wrong, 401, "UNAUTHORIZED")
        forged = http.post("/auth/token", data={"grant_type": "refresh_token", "refresh_token": refresh[:-4] + "AAAA"})
        assert_refused(forged, 401, "UNAUTHORIZED")


# -- the registry ------------------------------------------------------------------------------


def test_requests_without_a_token_get_a_bearer_challenge_naming_the_scope(registry):
    with registry.client() as http:
        response = http.get("/v2/team/app/manifests/latest")
    assert_refused(response, 401, "UNAUTHORIZED")
    realm = f"{registry.url}/auth/token"
    assert response.headers["www-authenticate"] == (
        f'Bearer realm="{realm}",service="{TOKEN_SERVICE}",scope="repository:team/app:pull"'
    )


def test_a_token_service_token_pushes_and_pulls(registry):
    token = fetch_token(registry, ["repository:team/app:pull,push"], ("admin", TEAM_USERS["admin"]))
    with registry.client(headers=bearer(token)) as http:
        image = OCIClient(http).push_image("team/app", "v1")
        response = http.get(f"/v2/team/app/manifests/{image.digest}", headers={"Accept": image.media_type})
        assert response.status_code == 200 and response.content == image.body
        assert http.get("/v2/").status_code == 200


def _refusals(key: Any) -> dict[str, str]:
    other = ec.generate_private_key(ec.SECP256R1())
    valid = _sign(key, _claims())
    head, payload, signature = valid.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_header = {"alg": "HS256", "kid": key_id(key.public_key()), "typ": "JWT"}
    hs_signing_input = f"{_b64(json.dumps(hs_header).encode())}.{_b64(json.dumps(_claims()).encode())}"
    hs_token = hs_signing_input + "." + _b64(hmac.new(public_pem, hs_signing_input.encode(), hashlib.sha256).digest())
    now = int(time.time())
    return {
        "expired": _sign(key, _claims(exp=now - 3600, nbf=now - 7200, iat=now - 7200)),
        "not-yet-valid": _sign(key, _claims(nbf=now + 3600, exp=now + 7200)),
        "wrong-audience": _sign(key, _claims(aud="another-registry")),
        "wrong-issuer": _sign(key, _claims(iss="someone-else")),
        "no-expiry": _sign(key, _claims(exp=None)),
        "bad-signature": f"{head}.{payload}.{flipped}",
        "other-key-same-kid": _sign(other, _claims(), kid=key_id(key.public_key())),
        "unknown-key": _sign(other, _claims()),
        "alg-none": _unsigned({"alg": "none", "kid": key_id(key.public_key()), "typ": "JWT"}, _claims()),
        "hs256-with-public-key": hs_token,
        "garbage": "not.a.token",
    }


@pytest.mark.parametrize(
    "case",
    [
        "expired",
        "not-yet-valid",
        "wrong-audience",
        "wrong-issuer",
        "no-expiry",
        "bad-signature",
        "other-key-same-kid",
        "unknown-key",
        "alg-none",
        "hs256-with-public-key",
        "garbage",
    ],
)
def test_untrustworthy_tokens_are_refused(registry, keys, case):
    token = _refusals(_private_key(keys[1]))[case]
    with registry.client(headers=bearer(token)) as http:
        for response in (http.get("/v2/team/app/tags/list"), http.get("/v2/")):
            assert_refused(response, 401, "UNAUTHORIZED")
            assert 'error="invalid_token"' in response.headers["www-authenticate"]


def test_the_same_claims_properly_signed_are_accepted(registry, keys):
    token = _sign(_private_key(keys[1]), _claims())
    with registry.client(headers=bearer(token)) as http:
        assert http.get("/v2/").status_code == 200
        assert http.get("/v2/team/app/tags/list").status_code in (200, 404)


def test_a_token_for_one_repository_does_not_open_another(registry):
    token = fetch_token(registry, ["repository:team/app:pull,push"], ("admin", TEAM_USERS["admin"]))
    with registry.client(headers=bearer(token)) as http:
        for response in (
            http.get("/v2/team/other/tags/list"),
            http.post("/v2/team/other/blobs/uploads/"),
            http.delete("/v2/team/app/manifests/v1"),  # delete was not in the token
            http.get("/v2/_catalog"),  # nor was the catalog
        ):
            assert_refused(response, 401, "UNAUTHORIZED")
            challenge = response.headers["www-authenticate"]
            assert 'error="insufficient_scope"' in challenge and "scope=" in challenge


def test_a_node_with_only_the_certificate_verifies_tokens_from_another(tmp_path, registry, keys):
    cert, _ = keys
    section = {
        "token": {
            "realm": f"{registry.url}/auth/token",
            "service": TOKEN_SERVICE,
            "issuer": TOKEN_ISSUER,
            "rootcertbundle": str(cert),
        }
    }
    with SecureWharf(tmp_path / "verifier", http={"insecure": True}, auth=section) as verifier:
        token = fetch_token(registry, ["registry:catalog:*"], ("admin", TEAM_USERS["admin"]))
        with verifier.client(headers=bearer(token)) as http:
            assert http.get("/v2/").status_code == 200
            assert http.get("/v2/_catalog").status_code == 200
        with verifier.client(auth=("admin", TEAM_USERS["admin"])) as http:
            response = http.get("/v2/")
            assert_refused(response, 401, "UNAUTHORIZED")
            assert f'realm="{registry.url}/auth/token"' in response.headers["www-authenticate"]
            # This node has no signing key, so no token service.
            assert http.get("/auth/token", params={"service": TOKEN_SERVICE}).status_code == 401


def test_rsa_keys_sign_rs256_tokens_that_verify():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer = TokenIssuer(key, issuer="iss", service="svc", expiration=60, refresh_expiration=600)
    assert issuer.algorithm == "RS256"
    verifier = TokenVerifier(issuer="iss", service="svc", keys={issuer.kid: key.public_key()})
    token, _ = issuer.access_token("alice", [Access("repository", "a/b", "pull")])
    claims = verifier.verify(token)
    assert claims.subject == "alice" and claims.access == {Access("repository", "a/b", "pull")}
    with pytest.raises(InvalidToken):
        TokenVerifier(issuer="iss", service="svc", keys={issuer.kid: key.public_key()}, algorithms=["ES256"]).verify(
            token
        )
