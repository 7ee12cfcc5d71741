"""Wharf processes with TLS and authentication for tests: certificates, users, token keys, clients."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import httpx
from wharf_process import WharfProcess

from node.auth import htpasswd
from node.tls import write_certificate

REPO_ROOT = Path(__file__).resolve().parent.parent
# Test users hash with bcrypt's lowest cost: the registry's cost does not change what is tested.
TEST_COST = 4
# A JWT anywhere in a text: header and payload are base64url JSON objects, so both start "eyJ".
JWT_PATTERN = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*")


def wharf_cli(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `wharf ARGS` (as `python -m node.cli`) and return its result."""
    result = subprocess.run(
        [sys.executable, "-m", "node.cli", *args],
        capture_output=True,
        text=True,
        input=input,
        timeout=60,
        cwd=str(REPO_ROOT),
    )
    if check:
        assert result.returncode == 0, f"wharf {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
    return result


def make_users(path: Path, users: dict[str, str]) -> Path:
    """Add users to an htpasswd file (in this process; `wharf htpasswd` has its own test)."""
    for user, password in users.items():
        htpasswd.set_password(str(path), user, password, TEST_COST)
    return path


def make_cert(directory: Path, *hosts: str) -> tuple[Path, Path]:
    """What `wharf cert HOSTS --dir DIRECTORY` writes: (domain.crt, domain.key)."""
    return write_certificate(directory, list(hosts or ("127.0.0.1", "localhost")))


def cert_dir_for_clients(cert: Path, directory: Path) -> Path:
    """A directory holding only `ca.crt`, as skopeo's --cert-dir and docker's certs.d expect."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(cert, directory / "ca.crt")
    return directory


class SecureWharf(WharfProcess):
    """A WharfProcess that may serve TLS (`ca` names the certificate clients trust)."""

    def __init__(self, data_dir: Path, *, ca: Path | None = None, **kwargs: Any) -> None:
        http = kwargs.setdefault("http", {})
        http.setdefault("debug", {"addr": ""})  # no metrics listener: tests run many processes
        super().__init__(data_dir, **kwargs)
        self.ca = ca

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"wharf exited with {self.proc.returncode}:\n{self.log_tail()}")
        context = ssl.create_default_context(cafile=str(self.ca)) if self.ca else None
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with opener.open(self.url + "/debug/health", timeout=1) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError:
            return False
        except OSError:
            return False

    def client(self, auth: tuple[str, str] | None = None, **kwargs: Any) -> httpx.Client:
        # trust_env=False: loopback must never go through a proxy named in the environment.
        return httpx.Client(
            base_url=self.url,
            auth=auth,
            verify=ssl.create_default_context(cafile=str(self.ca)) if self.ca else False,  # plain HTTP: unused
            trust_env=False,
            timeout=30.0,
            **kwargs,
        )


def error_code(response: httpx.Response) -> str:
    """The first OCI error code of a response (fails the test if the body is not an OCI error)."""
    assert response.headers.get("content-type", "").startswith("application/json"), response.text[:300]
    body = response.json()
    assert isinstance(body.get("errors"), list) and body["errors"], body
    return str(body["errors"][0]["code"])


def assert_refused(response: httpx.Response, status: int, code: str) -> None:
    request = response.request
    assert response.status_code == status, (
        f"{request.method} {request.url}: expected {status} {code}, got {response.status_code} {response.text[:300]}"
    )
    if request.method != "HEAD":
        assert error_code(response) == code, response.text[:300]


def assert_no_secrets(paths: list[Path], secrets: list[str]) -> None:
    """No secret (password, token, Authorization value) and no JWT at all in any of the files."""
    for path in paths:
        if not path.exists():
            continue
        text = path.read_text(errors="replace")
        for secret in secrets:
            assert secret not in text, f"{path} contains a secret ({secret[:4]}...)"
        found = JWT_PATTERN.search(text)
        assert found is None, f"{path} contains a token: {found.group(0)[:30]}..."


# A team's set-up, used by the auth tests: an admin, developers who pull, a CI robot that pushes
# to ci/**, and public/** open to anonymous pulls.
TEAM_USERS = {"admin": "admin-Pass-1", "dev": "dev-Pass-2", "robot": "robot-Pass-3"}
TEAM_ACCESS = {
    "groups": {"developers": ["dev"]},
    "rules": [
        {"repositories": ["**"], "users": ["admin"], "actions": ["*"]},
        {"repositories": ["**"], "groups": ["developers"], "actions": ["pull"]},
        {"repositories": ["ci/**"], "users": ["robot"], "actions": ["pull", "push"]},
        {"repositories": ["public/**"], "anonymous": True, "actions": ["pull"]},
    ],
}
TOKEN_SERVICE = "wharf-test-registry"
TOKEN_ISSUER = "wharf-test-issuer"


def token_section(key: Path, users: Path | None, **extra: Any) -> dict[str, Any]:
    """auth: with the built-in token service signing with `key`."""
    token: dict[str, Any] = {"service": TOKEN_SERVICE, "issuer": TOKEN_ISSUER, "signingkey": str(key)}
    if users is not None:
        token["htpasswd"] = str(users)
    return {"token": {**token, **extra}}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def fetch_token(process: SecureWharf, scopes: list[str], auth: tuple[str, str] | None = None) -> str:
    with process.client(auth=auth) as http:
        response = http.get("/auth/token", params={"service": TOKEN_SERVICE, "scope": scopes})
    assert response.status_code == 200, response.text
    return str(response.json()["token"])
