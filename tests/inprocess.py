"""A registry app in this process (embedded KV, filesystem storage) with an async client, for fast tests."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
from oci_client import digest_of

from coordinator.embedded import EmbeddedKV
from node.app import create_app
from node.config import load
from node.services import Services
from node.storage.driver import StorageDriver
from node.storage.filesystem import FilesystemDriver


class InProcessRegistry:
    """Configured like a real node by extra config sections; GC grace is 0 unless a section says."""

    def __init__(self, root: Path, *, storage: StorageDriver | None = None, **sections: Any) -> None:
        self.root = root
        config: dict[str, Any] = {
            "storage": {"filesystem": {"rootdirectory": str(root / "registry")}, "delete": {"enabled": True}},
            "gc": {"grace": "0s"},
            "http": {"debug": {"addr": ""}},
        }
        config.update(sections)
        self.config_path = root / "config.yml"
        self.config_path.write_text(json.dumps(config))
        self.config = load(str(self.config_path), environ={})
        self.kv = EmbeddedKV(str(root / "kv.db"))
        self.services = Services.build(self.config, self.kv, storage or FilesystemDriver(str(root / "registry")))
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(self.config, services=self.services)), base_url="http://wharf"
        )

    async def close(self) -> None:
        await self.http.aclose()
        await self.services.close()

    async def push_blob(self, repo: str, data: bytes) -> httpx.Response:
        return await self.http.post(f"/v2/{repo}/blobs/uploads/", params={"digest": digest_of(data)}, content=data)

    async def blob(self, repo: str, data: bytes) -> str:
        response = await self.push_blob(repo, data)
        assert response.status_code == 201, response.text
        return digest_of(data)

    async def put_manifest(self, repo: str, tag: str | None, doc: dict[str, Any]) -> tuple[str, bytes]:
        """PUT by tag, or by digest when `tag` is None; returns (digest, body)."""
        body = json.dumps(doc).encode()
        digest = digest_of(body)
        response = await self.http.put(
            f"/v2/{repo}/manifests/{tag or digest}", content=body, headers={"Content-Type": doc["mediaType"]}
        )
        assert response.status_code == 201, response.text
        return digest, body

    def stored_bytes(self) -> int:
        total = 0
        for directory, _, files in os.walk(self.root / "registry"):
            total += sum(os.path.getsize(os.path.join(directory, f)) for f in files)
        return total
