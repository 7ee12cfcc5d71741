"""A push workload that races garbage collection, and the checks that nothing tagged broke."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
ANY = {"Accept": "*/*"}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class RaceResult:
    pushes_ok: int = 0
    pushes_failed: int = 0
    retags_ok: int = 0
    retags_failed: int = 0
    failures: list[str] = field(default_factory=list)
    # Every manifest body we were told was stored, by digest.
    stored: dict[str, bytes] = field(default_factory=dict)


class Pusher:
    """Pushes images sharing base layers under a small set of tags, and re-tags old ones.

    Each push is what a client does: HEAD every blob, upload the missing ones, PUT the manifest.
    """

    def __init__(self, urls: list[str], repo: str, *, seed: int, bases: list[bytes], tags: int = 12) -> None:
        self.clients = [httpx.Client(base_url=url, timeout=30) for url in urls]
        self.repo = repo
        self.rng = random.Random(seed)
        self.bases = bases
        self.tags = tags

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def _client(self) -> httpx.Client:
        return self.rng.choice(self.clients)

    def _ensure_blob(self, data: bytes) -> None:
        digest = _digest(data)
        client = self._client()
        if client.head(f"/v2/{self.repo}/blobs/{digest}").status_code == 200:
            return
        response = client.post(f"/v2/{self.repo}/blobs/uploads/", params={"digest": digest}, content=data)
        if response.status_code != 201:
            raise RuntimeError(f"blob upload {response.status_code} {response.text[:200]}")

    def push_one(self, result: RaceResult) -> None:
        base = self.rng.choice(self.bases)
        own = os.urandom(self.rng.randint(2_000, 20_000))
        config = json.dumps({"architecture": "amd64", "os": "linux", "own": _digest(own)}).encode()
        tag = f"t{self.rng.randrange(self.tags)}"
        try:
            for blob in (base, own, config):
                self._ensure_blob(blob)
            doc = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": len(config)},
                "layers": [
                    {"mediaType": OCI_LAYER, "digest": _digest(base), "size": len(base)},
                    {"mediaType": OCI_LAYER, "digest": _digest(own), "size": len(own)},
                ],
            }
            body = json.dumps(doc).encode()
            response = self._client().put(
                f"/v2/{self.repo}/manifests/{tag}", content=body, headers={"Content-Type": OCI_MANIFEST}
            )
            if response.status_code != 201:
                raise RuntimeError(f"manifest {response.status_code} {response.text[:200]}")
            result.pushes_ok += 1
            result.stored[_digest(body)] = body
        except (RuntimeError, httpx.HTTPError) as exc:
            result.pushes_failed += 1
            result.failures.append(f"push {tag}: {exc}")

    def retag_one(self, result: RaceResult) -> None:
        """PUT an earlier manifest under another tag, as `crane tag` or a promotion does."""
        if not result.stored:
            return
        body = result.stored[self.rng.choice(list(result.stored))]
        tag = f"t{self.rng.randrange(self.tags)}"
        response = self._client().put(
            f"/v2/{self.repo}/manifests/{tag}", content=body, headers={"Content-Type": OCI_MANIFEST}
        )
        if response.status_code == 201:
            result.retags_ok += 1
        else:
            # Refused when GC already took its blobs: the client is told, nothing is half-made.
            result.retags_failed += 1
            result.failures.append(f"retag {tag}: {response.status_code} {response.text[:120]}")

    def run(self, seconds: float, max_pushes: int, result: RaceResult) -> None:
        deadline = time.monotonic() + seconds
        count = 0
        while time.monotonic() < deadline and count < max_pushes:
            if self.rng.random() < 0.25:
                self.retag_one(result)
            else:
                self.push_one(result)
            count += 1


def race(urls: list[str], repo: str, *, seconds: float, pushers: int = 4, max_pushes: int = 5000) -> RaceResult:
    """Run `pushers` threads against `urls` for `seconds`; returns what the clients saw."""
    bases = [os.urandom(30_000) for _ in range(4)]
    result = RaceResult()
    lock = threading.Lock()
    per_thread = [RaceResult() for _ in range(pushers)]
    workers = [Pusher(urls, repo, seed=i, bases=bases) for i in range(pushers)]
    threads = [
        threading.Thread(target=w.run, args=(seconds, max_pushes, r), daemon=True)
        for w, r in zip(workers, per_thread, strict=True)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    for worker in workers:
        worker.close()
    with lock:
        for r in per_thread:
            result.pushes_ok += r.pushes_ok
            result.pushes_failed += r.pushes_failed
            result.retags_ok += r.retags_ok
            result.retags_failed += r.retags_failed
            result.failures += r.failures
            result.stored.update(r.stored)
    return result


def verify_tagged_images(url: str, repo: str) -> tuple[int, set[str], int]:
    """Every tag resolves and every blob of every tagged image pulls with its digest.

    Returns (tags checked, live blob digests incl. manifests, live bytes).
    """
    live: set[str] = set()
    live_bytes = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        tags = client.get(f"/v2/{repo}/tags/list").json()["tags"] or []
        for tag in tags:
            response = client.get(f"/v2/{repo}/manifests/{tag}", headers=ANY)
            assert response.status_code == 200, f"tag {tag}: {response.status_code} {response.text[:200]}"
            digest = response.headers["docker-content-digest"]
            assert _digest(response.content) == digest
            if digest not in live:
                live.add(digest)
                live_bytes += len(response.content)
            doc = json.loads(response.content)
            for desc in [doc["config"], *doc["layers"]]:
                blob = client.get(f"/v2/{repo}/blobs/{desc['digest']}", follow_redirects=True)
                assert blob.status_code == 200, f"tag {tag} blob {desc['digest']}: {blob.status_code}"
                assert _digest(blob.content) == desc["digest"], f"tag {tag}: blob bytes do not match"
                if desc["digest"] not in live:
                    live.add(desc["digest"])
                    live_bytes += len(blob.content)
    return len(tags), live, live_bytes
