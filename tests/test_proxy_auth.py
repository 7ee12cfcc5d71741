"""Upstreams that want credentials: a Wharf with its built-in token service (Docker Hub's flow) and one
with Basic auth. The configured credentials work; wrong ones give an error that names the upstream."""

from __future__ import annotations

import httpx
import pytest
from oci_client import OCIClient, assert_error
from pullthrough import ACCEPT, pull
from secure_registry import (
    TEAM_ACCESS,
    TEAM_USERS,
    SecureWharf,
    bearer,
    fetch_token,
    make_cert,
    make_users,
    token_section,
)
from wharf_process import WharfProcess

_NO_BACKOFF = {"authfailures": {"peraddress": 0, "peruser": 0}}


@pytest.fixture(scope="module")
def token_upstream(tmp_path_factory):
    """A Wharf behind its own token service holding ci/app:v1 (robot pushes it) and public/base:1."""
    root = tmp_path_factory.mktemp("token-upstream")
    _, key = make_cert(root / "keys", "127.0.0.1")
    users = make_users(root / "htpasswd", TEAM_USERS)
    with SecureWharf(
        root / "wharf",
        http={"insecure": True},
        auth=token_section(key, users),
        access=TEAM_ACCESS,
        ratelimit=_NO_BACKOFF,
    ) as upstream:
        token = fetch_token(upstream, ["repository:ci/app:pull,push"], auth=("robot", TEAM_USERS["robot"]))
        with upstream.client(headers=bearer(token)) as http:
            OCIClient(http).push_image("ci/app", "v1", layers=[b"private layer " * 1000])
        token = fetch_token(upstream, ["repository:public/base:pull,push"], auth=("admin", TEAM_USERS["admin"]))
        with upstream.client(headers=bearer(token)) as http:
            OCIClient(http).push_image("public/base", "1", layers=[b"public layer " * 1000])
        yield upstream


def _cache(tmp_path, upstreams: list[dict]) -> WharfProcess:
    return WharfProcess(tmp_path / "cache", proxy={"upstreams": upstreams})


def test_token_upstream_serves_with_the_configured_credentials_and_names_itself_when_they_are_wrong(
    tmp_path, token_upstream
):
    url = token_upstream.url
    cache = _cache(
        tmp_path,
        [
            {"prefix": "corp/", "remoteurl": url, "username": "dev", "password": TEAM_USERS["dev"]},
            {"prefix": "wrong/", "remoteurl": url, "username": "dev", "password": "not-the-password"},
            {"prefix": "anon/", "remoteurl": url},
        ],
    )
    with cache, httpx.Client(base_url=cache.url, timeout=60, trust_env=False) as http:
        with token_upstream.client(auth=None) as direct:
            token = fetch_token(token_upstream, ["repository:ci/app:pull"], auth=("dev", TEAM_USERS["dev"]))
            expected = pull(httpx.Client(base_url=url, headers=bearer(token), trust_env=False), "ci/app", "v1")
            assert direct.get("/v2/ci/app/manifests/v1").status_code == 401  # not without a token
        got = pull(http, "corp/ci/app", "v1")
        assert got.manifests == expected.manifests and got.blobs == expected.blobs
        # Wrong password: the token service refuses it, and the client is told which upstream did.
        wrong = http.get("/v2/wrong/ci/app/manifests/v1", headers={"Accept": ACCEPT})
        error = assert_error(wrong, 403, "DENIED")
        assert error["detail"]["upstream"] == "wrong"
        assert "upstream wrong (" + url + ")" in error["message"] and "token service" in error["message"]
        assert "as dev" in error["message"] and "password" in error["message"]
        assert "not-the-password" not in wrong.text and "not-the-password" not in cache.log_text()
        # No credentials: what anonymous callers may pull works, the rest is refused by the upstream.
        assert pull(http, "anon/public/base", "1").digest
        refused = assert_error(http.get("/v2/anon/ci/app/manifests/v1", headers={"Accept": ACCEPT}), 403, "DENIED")
        assert "anonymously" in refused["message"]


def test_basic_auth_upstream_serves_with_the_configured_credentials(tmp_path):
    users = make_users(tmp_path / "htpasswd", TEAM_USERS)
    with SecureWharf(
        tmp_path / "basic",
        http={"insecure": True},
        auth={"htpasswd": {"realm": "basic-upstream", "path": str(users)}},
        access=TEAM_ACCESS,
        ratelimit=_NO_BACKOFF,
    ) as upstream:
        with upstream.client(auth=("robot", TEAM_USERS["robot"])) as http:
            image = OCIClient(http).push_image("ci/tool", "2", layers=[b"basic layer " * 500])
        cache = _cache(
            tmp_path,
            [
                {"prefix": "basic/", "remoteurl": upstream.url, "username": "dev", "password": TEAM_USERS["dev"]},
                {"prefix": "nobody/", "remoteurl": upstream.url},
            ],
        )
        with cache, httpx.Client(base_url=cache.url, timeout=60, trust_env=False) as http:
            assert pull(http, "basic/ci/tool", "2").digest == image.digest
            refused = http.get("/v2/nobody/ci/tool/manifests/2", headers={"Accept": ACCEPT})
            error = assert_error(refused, 403, "DENIED")
            assert "upstream nobody" in error["message"] and "none are configured" in error["message"]
