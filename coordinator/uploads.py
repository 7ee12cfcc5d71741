"""Upload sessions in the KV, so that any node can continue an upload another node began."""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from . import keys
from .kv import KV, Compare, Put


@dataclass(frozen=True)
class UploadSession:
    id: str
    repository: str
    offset: int = 0
    # Serialised SHA-256 state of the first `offset` bytes (empty before the first byte).
    hash_state: bytes = b""
    # The storage driver's own state for the upload (multipart ids, parts ...).
    driver_state: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    updated: float = 0.0
    # The KV revision this copy was read at; writes compare against it.
    mod_revision: int = 0

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "repository": self.repository,
                "offset": self.offset,
                "hash_state": base64.b64encode(self.hash_state).decode(),
                "driver_state": self.driver_state,
                "started": self.started,
                "updated": self.updated,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, upload_id: str, raw: bytes, mod_revision: int) -> UploadSession:
        data = json.loads(raw)
        return cls(
            id=upload_id,
            repository=data["repository"],
            offset=data["offset"],
            hash_state=base64.b64decode(data["hash_state"]),
            driver_state=data["driver_state"],
            started=data["started"],
            updated=data["updated"],
            mod_revision=mod_revision,
        )


class SessionChanged(Exception):
    """Another request moved the session on since it was read."""


class UploadSessions:
    def __init__(self, kv: KV) -> None:
        self.kv = kv

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())

    async def create(self, upload_id: str, repository: str, driver_state: dict[str, Any]) -> UploadSession:
        now = time.time()
        session = UploadSession(upload_id, repository, driver_state=driver_state, started=now, updated=now)
        key = keys.upload(upload_id)
        result = await self.kv.txn([Compare.absent(key)], [Put(key, session.to_json())])
        if not result.succeeded:
            raise SessionChanged(upload_id)
        return replace(session, mod_revision=result.revision)

    async def get(self, upload_id: str) -> UploadSession | None:
        found = await self.kv.get(keys.upload(upload_id))
        return None if found is None else UploadSession.from_json(upload_id, found.value, found.mod_revision)

    async def advance(
        self, session: UploadSession, offset: int, hash_state: bytes, driver_state: dict[str, Any]
    ) -> UploadSession:
        """Record progress, only if nobody else has moved the session on since it was read."""
        moved = replace(session, offset=offset, hash_state=hash_state, driver_state=driver_state, updated=time.time())
        key = keys.upload(session.id)
        result = await self.kv.txn([Compare.unchanged(key, session.mod_revision)], [Put(key, moved.to_json())])
        if not result.succeeded:
            raise SessionChanged(session.id)
        return replace(moved, mod_revision=result.revision)

    async def delete(self, upload_id: str) -> bool:
        return await self.kv.delete(keys.upload(upload_id)) > 0
