"""Upload sessions in the KV, so that any node can continue an upload another node began.

One request at a time writes to a session. A writer first claims it (a claim key bound to its
node's lease, created only if the session is unchanged and unclaimed), then writes bytes, then
records the new offset and drops the claim in one transaction. A second request racing the first
fails its claim before it writes a byte, so bytes in storage always belong to the recorded state;
a node that dies mid-write loses its claim with its lease.

A session is also the record written before a blob's bytes go to their final place: `commit` names
the digest, the key it is being committed to and whether an object was already there. A session
left in that state (its node died mid-commit) tells the purge exactly what to reclaim.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from . import keys
from .kv import KV, Compare, Count, Delete, Get, Put, pages


@dataclass(frozen=True)
class CommitIntent:
    """A blob being committed: where its bytes go, and whether an object was there before."""

    digest: str
    key: str
    existed: bool


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
    commit: CommitIntent | None = None
    # Who opened it (a user, or "address <ip>" for anonymous pushes), for the per-owner bound.
    owner: str = ""
    # The KV revision this copy was read at; writes compare against it.
    mod_revision: int = 0

    def ending(self) -> list[Delete]:
        """The ops that end this session: its record, its claim if any, and its entry under its owner."""
        ops = [Delete(keys.upload(self.id)), Delete(keys.upload_claim(self.id))]
        if self.commit is not None:
            ops.append(Delete(keys.upload_commit(self.commit.digest, self.id)))
        if self.owner:
            ops.append(Delete(keys.upload_owner(self.owner, self.id)))
        return ops

    def to_json(self) -> bytes:
        data: dict[str, Any] = {
            "repository": self.repository,
            "offset": self.offset,
            "hash_state": base64.b64encode(self.hash_state).decode(),
            "driver_state": self.driver_state,
            "started": self.started,
            "updated": self.updated,
        }
        if self.commit is not None:
            data["commit"] = {"digest": self.commit.digest, "key": self.commit.key, "existed": self.commit.existed}
        if self.owner:
            data["owner"] = self.owner
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, upload_id: str, raw: bytes, mod_revision: int) -> UploadSession:
        data = json.loads(raw)
        commit = data.get("commit")
        return cls(
            id=upload_id,
            repository=data["repository"],
            offset=data["offset"],
            hash_state=base64.b64decode(data["hash_state"]),
            driver_state=data["driver_state"],
            started=data["started"],
            updated=data["updated"],
            commit=CommitIntent(commit["digest"], commit["key"], bool(commit["existed"])) if commit else None,
            owner=data.get("owner", ""),
            mod_revision=mod_revision,
        )


class SessionChanged(Exception):
    """Another request moved the session on since it was read (or it is gone)."""


class TooManySessions(Exception):
    """An owner already holds as many open upload sessions as allowed."""

    def __init__(self, owner: str, limit: int) -> None:
        super().__init__(f"{owner} holds {limit} open upload sessions")
        self.owner = owner
        self.limit = limit


class SessionBusy(Exception):
    """Another request is writing to (or committing) the session right now."""

    def __init__(self, upload_id: str, session: UploadSession | None = None) -> None:
        super().__init__(upload_id)
        self.session = session  # as it stands, when the refusal read it


@dataclass(frozen=True)
class Claim:
    """The right to write to one session, until recorded or released."""

    session: UploadSession
    token: bytes


class UploadSessions:
    def __init__(self, kv: KV) -> None:
        self.kv = kv

    async def count(self) -> int:
        """Upload sessions open now, on every node."""
        return await self.kv.count(keys.UPLOADS)

    @staticmethod
    def new_id() -> str:
        return str(uuid.uuid4())

    async def create(
        self,
        upload_id: str,
        repository: str,
        driver_state: dict[str, Any],
        *,
        commit: CommitIntent | None = None,
        owner: str = "",
        limit: int = 0,
        claim_lease: int = 0,
    ) -> UploadSession:
        """A new session; with `limit`, TooManySessions when `owner` already holds that many.

        With `claim_lease`, the session is claimed in the same transaction, under that lease, for
        the request that opens it (a whole blob in one request): the purge leaves it alone however
        long the body takes, and the claim goes when the session ends (`ending`).

        The owner's sessions are counted in the transaction that opens this one, so the bound costs
        no round trip of its own and two opening at once each count the other. Over the bound, the
        session just opened (whose id nobody has been told) is ended again before the refusal.
        """
        now = time.time()
        session = UploadSession(
            upload_id, repository, driver_state=driver_state, started=now, updated=now, commit=commit, owner=owner
        )
        key = keys.upload(upload_id)
        bounded = bool(owner and limit)
        ops: list[Put | Delete | Count] = [Count(keys.uploads_of(owner))] if bounded else []
        ops.append(Put(key, session.to_json()))
        if owner:
            ops.append(Put(keys.upload_owner(owner, upload_id), b""))
        if claim_lease:
            ops.append(Put(keys.upload_claim(upload_id), uuid.uuid4().bytes, lease=claim_lease))
        if commit is not None:
            ops.append(Put(keys.upload_commit(commit.digest, upload_id), b""))
        result = await self.kv.txn([Compare.absent(key)], ops)
        if not result.succeeded:
            raise SessionChanged(upload_id)
        session = replace(session, mod_revision=result.revision)
        if bounded and result.counts[0] >= limit:
            await self.kv.txn([Compare.unchanged(key, result.revision)], session.ending())
            raise TooManySessions(owner, limit)
        return session

    async def get(self, upload_id: str) -> UploadSession | None:
        found = await self.kv.get(keys.upload(upload_id))
        return None if found is None else UploadSession.from_json(upload_id, found.value, found.mod_revision)

    async def claim(self, session: UploadSession, lease: int) -> Claim:
        """Take the session for one writing request; SessionChanged or SessionBusy if another has it."""
        if session.commit is not None:
            raise SessionBusy(session.id)
        key = keys.upload(session.id)
        claim = keys.upload_claim(session.id)
        token = uuid.uuid4().hex.encode()
        result = await self.kv.txn(
            [Compare.unchanged(key, session.mod_revision), Compare.absent(claim)],
            [Put(claim, token, lease=lease)],
            [Get(key), Get(claim)],
        )
        if result.succeeded:
            return Claim(session, token)
        current, holder = result.gets
        if current is None or current.mod_revision != session.mod_revision:
            raise SessionChanged(session.id)
        raise SessionBusy(session.id)

    async def claim_open(self, upload_id: str, lease: int) -> Claim:
        """Read a session and claim it for one writing request, in one transaction.

        The session comes back as it stood when the claim was taken, so it needs no read of its own
        (a PATCH costs this and `advance`). SessionChanged if there is no such session, SessionBusy
        with the session as it stands if another request holds it. A committing session is claimed
        like any other: the caller must look at `commit` and release.
        """
        key = keys.upload(upload_id)
        claim = keys.upload_claim(upload_id)
        token = uuid.uuid4().hex.encode()
        result = await self.kv.txn(
            [Compare.present(key), Compare.absent(claim)],
            [Put(claim, token, lease=lease), Get(key)],
            [Get(key)],
        )
        found = result.gets[0] if result.gets else None
        if found is None:
            raise SessionChanged(upload_id)
        session = UploadSession.from_json(upload_id, found.value, found.mod_revision)
        if result.succeeded:
            return Claim(session, token)
        raise SessionBusy(upload_id, session)

    async def advance(
        self,
        session: UploadSession,
        offset: int,
        hash_state: bytes,
        driver_state: dict[str, Any],
        *,
        claim: Claim | None = None,
        commit: CommitIntent | None = None,
    ) -> UploadSession:
        """Record progress (and maybe a commit intent), only if the session is as it was read.

        With `claim`, the claim must still be held, and it is dropped in the same transaction.
        """
        moved = replace(
            session,
            offset=offset,
            hash_state=hash_state,
            driver_state=driver_state,
            updated=time.time(),
            commit=commit,
        )
        key = keys.upload(session.id)
        guards = [Compare.unchanged(key, session.mod_revision)]
        ops: list[Put | Delete] = [Put(key, moved.to_json())]
        if session.commit is not None and (commit is None or commit.digest != session.commit.digest):
            ops.append(Delete(keys.upload_commit(session.commit.digest, session.id)))
        if commit is not None and (session.commit is None or commit.digest != session.commit.digest):
            ops.append(Put(keys.upload_commit(commit.digest, session.id), b""))
        if claim is not None:
            guards.append(Compare(keys.upload_claim(session.id), "value", "==", claim.token))
            ops.append(Delete(keys.upload_claim(session.id)))
        else:
            guards.append(Compare.absent(keys.upload_claim(session.id)))
        result = await self.kv.txn(guards, ops)
        if not result.succeeded:
            raise SessionChanged(session.id)
        return replace(moved, mod_revision=result.revision)

    async def release(self, claim: Claim) -> None:
        """Drop a claim that recorded nothing (its request failed before writing)."""
        key = keys.upload_claim(claim.session.id)
        await self.kv.txn([Compare(key, "value", "==", claim.token)], [Delete(key)])

    async def end(self, session: UploadSession, claim: Claim | None = None) -> bool:
        """Delete a session that can never succeed, only if it is as read (and the claim still ours)."""
        key = keys.upload(session.id)
        claim_key = keys.upload_claim(session.id)
        guards = [Compare.unchanged(key, session.mod_revision)]
        ops: list[Put | Delete] = [*session.ending()]  # the claim's key with it
        if claim is not None:
            guards.append(Compare(claim_key, "value", "==", claim.token))
        else:
            guards.append(Compare.absent(claim_key))
        return (await self.kv.txn(guards, ops)).succeeded

    async def cancel(self, session: UploadSession) -> None:
        """Delete a session nobody is writing to; SessionBusy or SessionChanged otherwise."""
        if session.commit is not None:
            raise SessionBusy(session.id)
        key = keys.upload(session.id)
        claim = keys.upload_claim(session.id)
        result = await self.kv.txn(
            [Compare.unchanged(key, session.mod_revision), Compare.absent(claim)], session.ending(), [Get(key)]
        )
        if not result.succeeded:
            current = result.gets[0]
            if current is None or current.mod_revision != session.mod_revision:
                raise SessionChanged(session.id)
            raise SessionBusy(session.id)

    async def idle_since(self, cutoff: float) -> AsyncIterator[UploadSession]:
        """Sessions no request has moved on since `cutoff`, a page at a time."""
        async for page in pages(self.kv, keys.UPLOADS):
            for item in page:
                session = UploadSession.from_json(item.key[len(keys.UPLOADS) :], item.value, item.mod_revision)
                if session.updated < cutoff:
                    yield session

    async def committing(self) -> set[str]:
        """Digests a live session is committing: their bytes may be at the blob's key before its record is."""
        found = set()
        async for page in pages(self.kv, keys.UPLOADS):
            for item in page:
                session = UploadSession.from_json(item.key[len(keys.UPLOADS) :], item.value, item.mod_revision)
                if session.commit is not None:
                    found.add(session.commit.digest)
        return found

    async def others_committing(self, digest: str, upload_id: str) -> bool:
        """Whether a live session other than `upload_id` is committing `digest` (its bytes may be at
        the blob's key, its record still to come): a look at that digest's entries only."""
        prefix = keys.upload_commits_of(digest)
        found = await self.kv.range(prefix, limit=2)
        return any(item.key[len(prefix) :] != upload_id for item in found)

    async def end_idle(self, session: UploadSession) -> bool:
        """End an idle session as it was read, if no request is writing to it: its bytes are then the
        caller's to reclaim."""
        guards = [
            Compare.unchanged(keys.upload(session.id), session.mod_revision),
            Compare.absent(keys.upload_claim(session.id)),
        ]
        return (await self.kv.txn(guards, session.ending())).succeeded

    async def delete(self, session: UploadSession) -> bool:
        result = await self.kv.txn([Compare.present(keys.upload(session.id))], session.ending())
        return result.succeeded
