"""Pull-through cache tests' parts: an upstream registry with an access log, images in it, whole pulls.

The upstream is Debian's `docker-registry` (Distribution 2.8.2) with its access log on, so a test can
count what the cache asked it for. `pull` fetches an image the way a client does (manifest by tag
with every media type accepted, then every child manifest, config and layer) and returns every byte.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from oci_client import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Image
from registry2 import DockerRegistry, Registry2Client
from services import wait_until

ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])
_ACCESS = re.compile(r'"(GET|HEAD|POST|PUT|PATCH|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


def upstream_registry(workdir: Path) -> DockerRegistry:
    """A registry:2 on loopback whose log holds one access line per request."""
    return DockerRegistry.on_filesystem(
        workdir,
        workdir / "root",
        extra={"log": {"level": "info", "accesslog": {"disabled": False}}},
    )


def access_log(registry: DockerRegistry) -> list[tuple[str, str, int]]:
    """(method, path, status) of every request the registry logged, in order."""
    text = registry.log_path.read_text(errors="replace") if registry.log_path.exists() else ""
    return [(m.group(1), m.group(2).split("?", 1)[0], int(m.group(3))) for m in _ACCESS.finditer(text)]


def blob_gets(registry: DockerRegistry, digest: str) -> int:
    return sum(1 for method, path, _ in access_log(registry) if method == "GET" and path.endswith(f"/blobs/{digest}"))


def blob_gets_after(registry: DockerRegistry, digest: str, at_least: int, timeout: float = 10.0) -> int:
    """blob_gets once the log shows `at_least` of them: registry:2 writes a request's access line
    after the response ends, so a client can finish before the line is there."""
    wait_until(
        lambda: blob_gets(registry, digest) >= at_least, timeout=timeout, interval=0.05, what=f"GETs of {digest}"
    )
    return blob_gets(registry, digest)


def manifest_requests(registry: DockerRegistry, repository: str, reference: str) -> list[str]:
    return [m for m, path, _ in access_log(registry) if path == f"/v2/{repository}/manifests/{reference}"]


def layer(name: str, size: int = 256 * 1024) -> bytes:
    """Deterministic bytes of `size` for a layer called `name`."""
    out = bytearray()
    block = hashlib.sha256(name.encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:size])


def push_image(registry: DockerRegistry, repo: str, tag: str, layers: list[bytes], **fields: Any) -> Image:
    with registry.http() as http:
        return Registry2Client(http).push_image(repo, tag, layers=layers, **fields)


def push_index(registry: DockerRegistry, repo: str, tag: str, children: list[Image]) -> Image:
    with registry.http() as http:
        return Registry2Client(http).push_index(repo, tag, children)


@dataclass
class Pulled:
    """An image as a client pulled it."""

    digest: str
    manifests: dict[str, bytes] = field(default_factory=dict)  # digest -> bytes
    blobs: dict[str, bytes] = field(default_factory=dict)
    headers: list[httpx.Headers] = field(default_factory=list)  # of every response, in order


def pull(http: httpx.Client, repo: str, reference: str) -> Pulled:
    """Pull an image or index whole; fails the test on any error or any byte that does not hash right."""
    top = http.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": ACCEPT})
    assert top.status_code == 200, f"{repo}:{reference}: {top.status_code} {top.text[:300]}"
    pulled = Pulled(top.headers["docker-content-digest"])
    pending = [(pulled.digest, top)]
    while pending:
        digest, response = pending.pop()
        body = response.content
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
        pulled.manifests[digest] = body
        pulled.headers.append(response.headers)
        doc = json.loads(body)
        for child in doc.get("manifests", []):
            found = http.get(f"/v2/{repo}/manifests/{child['digest']}", headers={"Accept": ACCEPT})
            assert found.status_code == 200, found.text[:300]
            pending.append((child["digest"], found))
        for blob in [doc["config"], *doc.get("layers", [])] if "config" in doc else []:
            got = http.get(f"/v2/{repo}/blobs/{blob['digest']}")
            assert got.status_code == 200, f"{repo}@{blob['digest']}: {got.status_code} {got.text[:300]}"
            assert "sha256:" + hashlib.sha256(got.content).hexdigest() == blob["digest"]
            pulled.blobs[blob["digest"]] = got.content
            pulled.headers.append(got.headers)
    return pulled


def cache_status(headers: httpx.Headers) -> str:
    return headers.get("cache-status", "")
