"""Blob uploads: stream bytes into storage, carry the SHA-256 state in the session, commit by digest."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import rehashes

from coordinator import quota
from coordinator.metadata import BeingCollected, Metadata
from coordinator.quota import QuotaScope
from coordinator.uploads import SessionChanged, UploadSession, UploadSessions

from .errors import BlobUploadInvalid, BlobUploadUnknown, Denied, DigestInvalid, SizeInvalid
from .reference import Digest
from .storage import layout
from .storage.driver import StorageDriver, UploadInterrupted

log = logging.getLogger("wharf.upload")


class _Counted:
    """Hashes and counts the bytes of a stream as the driver pulls them."""

    def __init__(self, chunks: AsyncIterator[bytes], hasher: rehashes.PySha256, limit: int | None) -> None:
        self._chunks = chunks
        self.hasher = hasher
        self.count = 0
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            if self._limit is not None and self.count + len(chunk) > self._limit:
                raise SizeInvalid({"reason": "body is longer than its Content-Length or Content-Range"})
            self.hasher.update(chunk)
            self.count += len(chunk)
            yield chunk


def _hasher(state: bytes) -> rehashes.PySha256:
    # deserialize() returns a new hasher; calling it on an instance would restart from empty.
    return rehashes.PySha256.deserialize(state) if state else rehashes.PySha256()


def _denied(exc: quota.QuotaExceeded) -> Denied:
    scope = exc.scope
    return Denied(
        {"quota": scope.name, "limit": scope.limit, "used": exc.usage, "requested": exc.size},
        message=f"quota exceeded: {scope.label}: {exc.usage} of {scope.limit} bytes used, {exc.size} more requested",
        refused_by="quota",
        rule=scope.label,
    )


def check_algorithm(algorithm: str) -> None:
    """Uploads are hashed as they stream, with a resumable SHA-256 only."""
    if algorithm != "sha256":
        raise DigestInvalid({"algorithm": algorithm[:50]}, message="only sha256 digests are supported for blob uploads")


class Uploader:
    def __init__(self, storage: StorageDriver, sessions: UploadSessions, metadata: Metadata) -> None:
        self.storage = storage
        self.sessions = sessions
        self.metadata = metadata
        self.quotas_for: Callable[[str], list[QuotaScope]] = lambda repository: []

    async def check_room(self, repository: str, size: int = 0, digest: str | None = None) -> None:
        """DENIED early when a quota has no room for `size` more bytes (the commit checks again).

        A blob already linked in the repository takes no more room.
        """
        scopes = self.quotas_for(repository)
        if not scopes or (digest is not None and await self.metadata.get_link(repository, digest) is not None):
            return
        for scope in scopes:
            used = await quota.usage(self.metadata.kv, scope)
            if used + size > scope.limit or (size == 0 and used >= scope.limit):
                raise _denied(quota.QuotaExceeded(scope, used, size))

    async def start(self, repository: str) -> UploadSession:
        upload_id = self.sessions.new_id()
        state = await self.storage.upload_start(layout.upload_key(repository, upload_id))
        return await self.sessions.create(upload_id, repository, state)

    async def session(self, repository: str, upload_id: str) -> UploadSession:
        session = await self.sessions.get(upload_id)
        if session is None or session.repository != repository:
            raise BlobUploadUnknown({"upload": upload_id})
        return session

    async def append(
        self, session: UploadSession, chunks: AsyncIterator[bytes], *, length: int | None = None
    ) -> UploadSession:
        """Write a stream at the session's offset and record the new offset and hash state.

        If the stream breaks, whatever arrived is recorded too, so the client can ask for the
        offset and resume; then the error goes on up.
        """
        counted = _Counted(chunks, _hasher(session.hash_state), length)
        key = layout.upload_key(session.repository, session.id)
        try:
            written, state = await self.storage.upload_write(
                key, session.driver_state, session.offset, counted.__aiter__()
            )
        except UploadInterrupted as exc:
            if exc.written == counted.count:
                try:
                    await self.sessions.advance(
                        session, session.offset + exc.written, counted.hasher.serialize(), exc.state
                    )
                except SessionChanged:
                    pass
            if isinstance(exc.cause, SizeInvalid):
                raise exc.cause from None
            raise exc.cause from exc
        if written == 0 and length in (None, 0):
            return session
        if written != counted.count:
            raise BlobUploadInvalid({"reason": "storage kept fewer bytes than were sent"})
        if length is not None and written != length:
            # Keep what arrived (it is recorded below) but tell the client its range was short.
            session = await self._advance(session, written, counted.hasher.serialize(), state)
            raise SizeInvalid({"reason": f"expected {length} bytes, received {written}"})
        return await self._advance(session, written, counted.hasher.serialize(), state)

    async def _advance(self, session: UploadSession, written: int, hash_state: bytes, state: dict) -> UploadSession:  # type: ignore[type-arg]
        try:
            return await self.sessions.advance(session, session.offset + written, hash_state, state)
        except SessionChanged:
            raise BlobUploadInvalid({"reason": "the upload was changed by another request at the same time"}) from None

    async def finish(self, session: UploadSession, digest: Digest) -> int:
        """Check the digest, commit the bytes under it and link the blob; returns its size."""
        upload = layout.upload_key(session.repository, session.id)
        try:
            key = self._verified_key(digest, _hasher(session.hash_state))
            await self.check_room(session.repository, session.offset, str(digest))
        except BaseException:
            await self.cancel(session)
            raise
        stored = await self.storage.upload_commit(upload, session.driver_state, session.offset, key)
        await self._record(session.repository, str(digest), session.offset, stored, session.id)
        return session.offset

    async def _record(self, repository: str, digest: str, size: int, stored: str, upload_id: str | None) -> None:
        quotas = self.quotas_for(repository)
        try:
            record = await self.metadata.commit_blob(
                repository, digest, size, stored, upload_id=upload_id, quotas=quotas
            )
        except quota.QuotaExceeded as exc:
            # Nothing was linked; the stored bytes, if no record names them, go with GC's orphans.
            if upload_id is not None:
                await self.sessions.delete(upload_id)
            raise _denied(exc) from None
        except BeingCollected:
            # Garbage collection was deleting this very digest; its storage delete may have
            # taken our freshly committed bytes too. Wait it out and keep them only if intact.
            await self.metadata.wait_collected(digest)
            if await self.storage.stat(stored) != size:
                if upload_id is not None:
                    await self.sessions.delete(upload_id)
                raise BlobUploadInvalid(
                    {"digest": digest, "reason": "the blob was being garbage collected; upload it again"}
                ) from None
            record = await self.metadata.commit_blob(
                repository, digest, size, stored, upload_id=upload_id, quotas=quotas
            )
        if record.key != stored:
            # The digest was already stored elsewhere; this copy is redundant.
            await self.storage.delete(stored)

    @staticmethod
    def _verified_key(digest: Digest, hasher: rehashes.PySha256) -> str:
        """The blob key for `digest` if the hashed bytes match it; DIGEST_INVALID otherwise."""
        check_algorithm(digest.algorithm)
        actual = "sha256:" + hasher.finalize()
        if actual != str(digest):
            raise DigestInvalid({"expected": str(digest), "actual": actual})
        return layout.blob_key(actual)

    async def mount(self, repository: str, digest: str, source: str) -> bool:
        """Link a blob of `source` into `repository`, within its quotas; False if `source` lacks it."""
        try:
            linked = await self.metadata.mount_blob(repository, digest, source, quotas=self.quotas_for(repository))
        except quota.QuotaExceeded as exc:
            raise _denied(exc) from None
        return linked is not None

    async def cancel(self, session: UploadSession) -> None:
        await self.storage.upload_abort(layout.upload_key(session.repository, session.id), session.driver_state)
        await self.sessions.delete(session.id)

    async def monolithic(
        self, repository: str, digest: Digest, chunks: AsyncIterator[bytes], length: int | None
    ) -> int:
        """A whole blob in one request, with no session record: a failure leaves nothing to resume.

        Partial data left by a crash mid-request is collected with expired uploads.
        """
        if length is not None:
            await self.check_room(repository, length, str(digest))
        upload = layout.upload_key(repository, self.sessions.new_id())
        state = await self.storage.upload_start(upload)
        counted = _Counted(chunks, rehashes.PySha256(), length)
        try:
            try:
                written, state = await self.storage.upload_write(upload, state, 0, counted.__aiter__())
            except UploadInterrupted as exc:
                state = exc.state
                raise exc.cause from None
            if length is not None and written != length:
                raise SizeInvalid({"reason": f"expected {length} bytes, received {written}"})
            key = self._verified_key(digest, counted.hasher)
        except BaseException:
            await self.storage.upload_abort(upload, state)
            raise
        stored = await self.storage.upload_commit(upload, state, written, key)
        await self._record(repository, str(digest), written, stored, None)
        return written
