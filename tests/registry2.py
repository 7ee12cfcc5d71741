"""Debian's `docker-registry` (CNCF Distribution 2.8.2, registry:2) for tests, filled the way users fill it.

`DockerRegistry` runs `docker-registry serve CONFIG` on a filesystem root or under an S3 root
directory (moto, see the `s3_server` fixture), on a free loopback port. `fill_store` pushes what a
registry:2 user's store holds (skopeo and raw HTTP: shared layers, a multi-arch OCI index and a
Docker manifest list, a cosign signature tag, an OCI artifact with `artifactType`) and returns what
it pushed; `fill_many_tags` adds thousands of tags quickly with raw manifest PUTs; `assert_serves`
checks, over raw HTTP, that a registry serves all of it byte-identical. Everything is
deterministic: the same calls give the same digests on every run.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from images import image_graph, make_image
from oci_client import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_EMPTY,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    Image,
    OCIClient,
    descriptor,
    digest_of,
    manifest_bytes,
)
from services import free_port, wait_until
from skopeo import push

DOCKER_REGISTRY = os.environ.get("WHARF_TEST_DOCKER_REGISTRY", "/usr/bin/docker-registry")
COSIGN_PAYLOAD = "application/vnd.dev.cosign.simplesigning.v1+json"
COSIGN_SIGNATURE = "dev.cosignproject.cosign/signature"
SPDX = "application/spdx+json"
# Every manifest media type Distribution 2.8 serves, for GETs that must not be converted.
ACCEPT = ", ".join([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST])

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


class DockerRegistry:
    """One `docker-registry serve CONFIG` process; a context manager, or `start()` and `stop()`.

    The config and the log live in `workdir`. Upload purging is off, so the registry itself never
    deletes anything a test wrote.
    """

    def __init__(self, workdir: Path, storage: dict[str, Any], *, extra: dict[str, Any] | None = None) -> None:
        self.workdir = Path(workdir)
        self.storage = storage
        # More of Distribution's configuration: top-level sections, merged one level deep.
        self.extra = extra or {}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "docker-registry.log"
        self._log: Any = None

    @classmethod
    def on_filesystem(cls, workdir: Path, root: Path, *, extra: dict[str, Any] | None = None) -> DockerRegistry:
        return cls(workdir, {"filesystem": {"rootdirectory": str(root)}}, extra=extra)

    @classmethod
    def on_s3(cls, workdir: Path, server: Any, rootdirectory: str) -> DockerRegistry:
        """Under `rootdirectory` of the moto server's bucket (Distribution's own s3 driver)."""
        s3 = {
            "accesskey": server.access_key,
            "secretkey": server.secret_key,
            "region": server.region,
            "regionendpoint": server.endpoint,  # Distribution 2.8 then uses path-style requests
            "bucket": server.bucket,
            "rootdirectory": rootdirectory,
            "secure": False,
            "v4auth": True,
        }
        return cls(workdir, {"s3": s3})

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def http(self) -> httpx.Client:
        # trust_env=False: loopback must never go through a proxy named in the environment.
        return httpx.Client(base_url=self.url, trust_env=False, timeout=30.0)

    def client(self) -> Registry2Client:
        return Registry2Client(self.http())

    def config(self) -> dict[str, Any]:
        config = self._base_config()
        for key, value in self.extra.items():
            if isinstance(value, dict) and isinstance(config.get(key), dict):
                config[key] = {**config[key], **value}
            else:
                config[key] = value
        return config

    def _base_config(self) -> dict[str, Any]:
        return {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                **self.storage,
                "delete": {"enabled": True},
                "redirect": {"disable": True},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": "wharf-tests-not-secret"},
        }

    def start(self, timeout: float = 30.0) -> DockerRegistry:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # A free port can be taken between choosing and binding it: try again on another.
        for _attempt in range(3):
            self.port = free_port()
            config = self.workdir / "config.yml"
            config.write_text(yaml.safe_dump(self.config()))
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith("REGISTRY_") and not k.startswith("AWS_") and k not in _PROXY_VARS
            }
            self._log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(
                [DOCKER_REGISTRY, "serve", str(config)],
                cwd=str(self.workdir),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
            try:
                wait_until(self._ready, timeout=timeout, what=f"docker-registry on {self.url}")
                return self
            except _Exited as exc:
                self.stop()
                if "address already in use" not in str(exc):
                    raise RuntimeError(f"docker-registry exited: {exc}") from None
        raise RuntimeError(f"docker-registry could not bind a port after 3 attempts: {self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s. Safe to call twice."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> DockerRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise _Exited(self.log_tail())
        try:
            with _DIRECT.open(f"{self.url}/v2/", timeout=1) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False


class _Exited(RuntimeError):
    pass


class Registry2Client(OCIClient):
    """OCIClient for Distribution 2.8, which has no single-POST upload: POST, then PUT with the bytes."""

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = digest_of(data)
        if self.http.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
            return digest
        response = self.http.post(f"/v2/{repo}/blobs/uploads/")
        assert response.status_code == 202, response.text
        location = response.headers["Location"]
        # Keep Distribution's `_state` query: httpx's `params=` would replace it.
        response = self.http.put(
            location + ("&" if "?" in location else "?") + "digest=" + digest,
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert response.status_code == 201, response.text
        return digest


# -- what was pushed ---------------------------------------------------------------------------


@dataclass
class PushedRepository:
    """A repository as pushed: what registry:2 must have linked for it."""

    tags: dict[str, str] = field(default_factory=dict)  # tag -> manifest digest
    revisions: set[str] = field(default_factory=set)  # every manifest pushed, by tag or digest
    layers: set[str] = field(default_factory=set)  # every config and layer blob uploaded


@dataclass
class PushedStore:
    repositories: dict[str, PushedRepository] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)  # digest -> exact bytes
    blobs: dict[str, bytes] = field(default_factory=dict)  # configs and layers: digest -> bytes

    def repository(self, name: str) -> PushedRepository:
        return self.repositories.setdefault(name, PushedRepository())

    def add_image(self, repo: str, image: Image, blobs: list[bytes], tag: str | None = None) -> None:
        pushed = self.repository(repo)
        pushed.revisions.add(image.digest)
        self.manifests[image.digest] = image.body
        for blob in blobs:
            pushed.layers.add(digest_of(blob))
            self.blobs[digest_of(blob)] = blob
        if tag is not None:
            pushed.tags[tag] = image.digest


def _layer(name: str, size: int = 2048) -> bytes:
    """Deterministic bytes standing for a layer (registry:2 does not look inside)."""
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _config(architecture: str, layers: list[bytes]) -> bytes:
    return json.dumps(
        {
            "architecture": architecture,
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digest_of(layer) for layer in layers]},
        },
        sort_keys=True,
    ).encode()


def _push_image(
    client: Registry2Client,
    store: PushedStore,
    repo: str,
    tag: str | None,
    layers: list[bytes],
    *,
    architecture: str = "amd64",
    media_type: str = OCI_MANIFEST,
) -> Image:
    config = _config(architecture, layers)
    image = client.push_image(repo, tag, media_type=media_type, layers=layers, config=config)
    store.add_image(repo, image, [config, *layers], tag)
    return image


def _push_index(
    client: Registry2Client, store: PushedStore, repo: str, tag: str, children: list[Image], media_type: str
) -> Image:
    index = client.push_index(repo, tag, children, media_type=media_type)
    store.add_image(repo, index, [], tag)
    return index


def cosign_signature(image_digest: str, repository: str) -> tuple[bytes, bytes, str]:
    """(simple-signing payload, config, base64 signature) as `cosign sign` makes them (SIGNATURE_SPEC.md).

    Signed with ECDSA P-256 by a fixed test key with deterministic signatures (RFC 6979), so the
    same image always gets the same signature manifest.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    payload = json.dumps(
        {
            "critical": {
                "identity": {"docker-reference": repository},
                "image": {"docker-manifest-digest": image_digest},
                "type": "cosign container image signature",
            },
            "optional": None,
        },
        separators=(",", ":"),
    ).encode()
    key = ec.derive_private_key(0x57A2F, ec.SECP256R1())
    signature = key.sign(payload, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    config = json.dumps(
        {
            "architecture": "",
            "created": "0001-01-01T00:00:00Z",
            "history": [{"created": "0001-01-01T00:00:00Z"}],
            "os": "",
            "rootfs": {"type": "layers", "diff_ids": [digest_of(payload)]},
            "config": {},
        },
        separators=(",", ":"),
    ).encode()
    return payload, config, base64.b64encode(signature).decode()


def cosign_tag(digest: str) -> str:
    """The tag cosign stores a signature of `digest` under: `sha256-<hex>.sig`."""
    return digest.replace(":", "-", 1) + ".sig"


def fill_store(registry: DockerRegistry, workdir: Path) -> PushedStore:
    """Push what a registry:2 user's store holds, and return it.

    - `library/base:1.0` and `:latest`: a real skopeo push of an OCI image (two gzip'ed tar layers).
    - `team/app:v1` (OCI) and `:v2` (Docker schema 2) built FROM base (its first layer shared);
      `sha256-<v1 hex>.sig`, a cosign signature of v1; `v1-sbom`, an OCI artifact with
      `artifactType` and a `subject` naming v1 (as `oras attach` makes one; registry:2 keeps it as
      a plain manifest).
    - `team/sub/app` (a nested name): `:latest`, an OCI index, and `:docker`, a Docker manifest
      list, each with amd64 and arm64 children pushed by digest, sharing a layer with team/app.
    """
    store = PushedStore()
    layout = workdir / "base-layout"
    make_image(layout, "1.0", layers=2, layer_size=4096, seed=9)
    push(layout, "1.0", f"{registry.host}/library/base:1.0", "--preserve-digests")
    push(layout, "1.0", f"{registry.host}/library/base:latest", "--preserve-digests")
    base_digest, base_blobs = image_graph(layout, "1.0")
    base_manifest = base_blobs.pop(base_digest)
    base = Image(base_manifest, base_digest, OCI_MANIFEST)
    store.add_image("library/base", base, list(base_blobs.values()), "1.0")
    store.repository("library/base").tags["latest"] = base_digest
    base_layer = base_blobs[json.loads(base_manifest)["layers"][0]["digest"]]

    shared = _layer("shared runtime layer")
    with registry.http() as http:
        client = Registry2Client(http)
        v1 = _push_image(client, store, "team/app", "v1", [base_layer, shared, _layer("app v1")])
        _push_image(client, store, "team/app", "v2", [base_layer, shared, _layer("app v2")], media_type=DOCKER_MANIFEST)

        payload, config, signature = cosign_signature(v1.digest, f"{registry.host}/team/app")
        for blob in (config, payload):
            client.push_blob("team/app", blob)
        signed = client.push_manifest(
            "team/app",
            cosign_tag(v1.digest),
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, config),
                "layers": [descriptor(COSIGN_PAYLOAD, payload, annotations={COSIGN_SIGNATURE: signature})],
            },
        )
        store.add_image("team/app", signed, [config, payload], cosign_tag(v1.digest))

        empty, sbom = b"{}", json.dumps({"spdxVersion": "SPDX-2.3", "name": "team/app v1"}).encode()
        for blob in (empty, sbom):
            client.push_blob("team/app", blob)
        artifact = client.push_manifest(
            "team/app",
            "v1-sbom",
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "artifactType": SPDX,
                "config": descriptor(OCI_EMPTY, empty),
                "layers": [descriptor(SPDX, sbom)],
                "subject": descriptor(OCI_MANIFEST, v1.body),
                "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
            },
        )
        store.add_image("team/app", artifact, [empty, sbom], "v1-sbom")

        for tag, index_type, child_type in (
            ("latest", OCI_INDEX, OCI_MANIFEST),
            ("docker", DOCKER_LIST, DOCKER_MANIFEST),
        ):
            children = [
                _push_image(
                    client,
                    store,
                    "team/sub/app",
                    None,
                    [shared, _layer(f"sub {tag} {arch}")],
                    architecture=arch,
                    media_type=child_type,
                )
                for arch in ("amd64", "arm64")
            ]
            _push_index(client, store, "team/sub/app", tag, children, index_type)
    return store


def fill_many_tags(
    registry: DockerRegistry, store: PushedStore, repository: str, count: int, *, workers: int = 8
) -> PushedRepository:
    """`count` tags `t00000`... in `repository`, each its own small OCI manifest, by raw manifest PUTs.

    The manifests share one config and one layer and differ by an annotation, so the store grows by
    one manifest blob and three links per tag (current, index, revision). `workers` PUTs in flight.
    """
    layer = _layer(f"{repository} many tags")
    config = _config("amd64", [layer])
    with registry.http() as http:
        client = Registry2Client(http)
        for blob in (config, layer):
            client.push_blob(repository, blob)
    pushed = store.repository(repository)
    for blob in (config, layer):
        pushed.layers.add(digest_of(blob))
        store.blobs[digest_of(blob)] = blob
    manifests: dict[str, tuple[str, bytes]] = {}
    for n in range(count):
        body = manifest_bytes(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, config),
                "layers": [descriptor(OCI_LAYER, layer)],
                "annotations": {"org.opencontainers.image.revision": str(n)},
            }
        )
        manifests[f"t{n:05d}"] = (digest_of(body), body)
    tags = sorted(manifests)

    def put_share(worker: int) -> None:
        with registry.http() as http:
            for tag in tags[worker::workers]:
                response = http.put(
                    f"/v2/{repository}/manifests/{tag}",
                    content=manifests[tag][1],
                    headers={"Content-Type": OCI_MANIFEST},
                )
                assert response.status_code == 201, f"{tag}: {response.status_code} {response.text}"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(put_share, range(workers)))
    for tag, (digest, body) in manifests.items():
        pushed.tags[tag] = digest
        pushed.revisions.add(digest)
        store.manifests[digest] = body
    return pushed


# -- what a registry serves ----------------------------------------------------------------------


def assert_serves(registry: DockerRegistry, store: PushedStore, *, workers: int = 8) -> int:
    """Every tag, every manifest by digest and every blob, over raw HTTP, byte-identical; returns GETs made.

    Also that each repository's tag list is exactly what was pushed.
    """
    checks: list[tuple[str, str, bytes]] = []  # path, expected Docker-Content-Digest, expected bytes
    for name, pushed in sorted(store.repositories.items()):
        checks += [(f"/v2/{name}/manifests/{tag}", d, store.manifests[d]) for tag, d in sorted(pushed.tags.items())]
        checks += [(f"/v2/{name}/manifests/{d}", d, store.manifests[d]) for d in sorted(pushed.revisions)]
        checks += [(f"/v2/{name}/blobs/{d}", d, store.blobs[d]) for d in sorted(pushed.layers)]

    def check_share(worker: int) -> None:
        with registry.http() as http:
            for path, digest, body in checks[worker::workers]:
                response = http.get(path, headers={"Accept": ACCEPT})
                assert response.status_code == 200, f"GET {path}: {response.status_code} {response.text[:300]}"
                assert response.headers.get("Docker-Content-Digest") == digest, f"GET {path}: digest differs"
                assert response.content == body, f"GET {path}: bytes differ"

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(check_share, range(workers)))
    with registry.http() as http:
        for name, pushed in store.repositories.items():
            response = http.get(f"/v2/{name}/tags/list")
            assert response.status_code == 200, response.text
            assert sorted(response.json()["tags"]) == sorted(pushed.tags), f"{name}: tag list differs"
    return len(checks)
