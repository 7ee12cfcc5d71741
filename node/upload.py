"""Blob uploads: stream bytes into storage, carry the SHA-256 state in the session, commit by digest.

Every byte a request writes is covered by a record written before it: a session (claimed by the one
request writing to it) while bytes arrive, and a commit intent in that session while they move to
their final key. So bytes in storage always match the session's recorded hash state, and whatever
a crash leaves behind is named by a record that the purge of expired sessions acts on.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace

import rehashes

from coordinator import quota
from coordinator.kv import Op
from coordinator.lease import NodeLease
from coordinator.metadata import BeingCollected, Metadata, RepositoryDeleting
from coordinator.quota import QuotaScope
from coordinator.uploads import (
    Claim,
    CommitIntent,
    SessionBusy,
    SessionChanged,
    TooManySessions,
    UploadSession,
    UploadSessions,
)

from .errors import (
    BeingDeleted,
    BlobUploadInvalid,
    BlobUploadUnknown,
    Denied,
    DigestInvalid,
    SizeInvalid,
    TooManyRequests,
    Unavailable,
)
from .reference import Digest
from .storage import layout
from .storage.driver import StorageDriver, UploadInterrupted, WholeUploads
from .uploadstate import UploadStates

log = logging.getLogger("wharf.upload")

# Notification records for a blob now in a repository, given its size; written with its link.
Events = Callable[[int], Sequence[Op]]


def _no_events(size: int) -> Sequence[Op]:
    return ()


class UploadMoved(Exception):
    """The session moved on since the request read it: the client must resume from its offset."""

    def __init__(self, session: UploadSession) -> None:
        super().__init__(f"upload {session.id} is at offset {session.offset}")
        self.session = session


class ClaimLapsed(Unavailable):
    """This node's lease lapsed while a request wrote to an upload: another node may claim the session
    now, so writing stops. What was recorded stays; the client resumes from the upload's offset."""

    def __init__(self) -> None:
        super().__init__(
            {"reason": "this node lost its claim on the upload; resume from its offset", "retry_after_seconds": 1},
            headers={"Retry-After": "1"},
        )


class _Counted:
    """Hashes and counts the bytes of a stream as the driver pulls them."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        hasher: rehashes.PySha256,
        limit: int | None,
        still_ours: Callable[[], bool] = lambda: True,
    ) -> None:
        self._chunks = chunks
        self.hasher = hasher
        self.count = 0
        self._limit = limit
        self._still_ours = still_ours

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._chunks:
            if self._limit is not None and self.count + len(chunk) > self._limit:
                raise SizeInvalid({"reason": "body is longer than its Content-Length or Content-Range"})
            if not self._still_ours():
                # The node's lease lapsed: another request may claim the session; stop writing.
                raise ClaimLapsed()
            self.hasher.update(chunk)
            self.count += len(chunk)
            yield chunk


# A closing PUT of at most this many bytes into an empty session is read whole before it is written.
_WHOLE_BODY = 1 << 20


async def _gather(chunks: AsyncIterator[bytes], length: int | None) -> tuple[list[bytes], Exception | None]:
    """A body's chunks, up to a little past `length`, and what broke the stream if it broke."""
    arrived: list[bytes] = []
    count = 0
    try:
        async for chunk in chunks:
            arrived.append(chunk)
            count += len(chunk)
            if length is not None and count > length:
                break  # too long: the ordinary path refuses it
    except (asyncio.CancelledError, GeneratorExit):
        raise
    except Exception as exc:
        return arrived, exc
    return arrived, None


async def _replay(arrived: list[bytes], broke: Exception | None = None) -> AsyncIterator[bytes]:
    for chunk in arrived:
        yield chunk
    if broke is not None:
        raise broke


def _hasher(state: bytes) -> rehashes.PySha256:
    # deserialize() returns a new hasher; calling it on an instance would restart from empty.
    return rehashes.PySha256.deserialize(state) if state else rehashes.PySha256()


def quota_denied(exc: quota.QuotaExceeded) -> Denied:
    """A quota's refusal as the client sees it (403 DENIED naming the scope and its figures)."""
    scope = exc.scope
    return Denied(
        {"quota": scope.name, "limit": scope.limit, "used": exc.usage, "requested": exc.size},
        message=f"quota exceeded: {scope.label}: {exc.usage} of {scope.limit} bytes used, {exc.size} more requested",
        refused_by="quota",
        rule=scope.label,
    )


def _busy(session: UploadSession) -> BlobUploadInvalid:
    what = "being committed" if session.commit is not None else "being written by another request"
    return BlobUploadInvalid({"upload": session.id, "reason": f"the upload is {what} right now"})


# How many times a blob's or manifest's record is tried while deletions of its digest keep coming in between.
COLLECTED_TRIES = 5


def collected_busy(digest: str, what: str = "blob") -> Unavailable:
    """503: deletions of `digest` kept coming in between its bytes and its record; nothing was recorded."""
    return Unavailable(
        {"digest": digest, "reason": f"the {what} kept being collected while it was recorded; try again"},
        headers={"Retry-After": "1"},
    )


def check_algorithm(algorithm: str) -> None:
    """Uploads are hashed as they stream, with a resumable SHA-256 only."""
    if algorithm != "sha256":
        raise DigestInvalid({"algorithm": algorithm[:50]}, message="only sha256 digests are supported for blob uploads")


class Uploader:
    def __init__(
        self,
        storage: StorageDriver,
        sessions: UploadSessions,
        metadata: Metadata,
        lease: NodeLease,
        *,
        quotas_for: Callable[[str], list[QuotaScope]] = lambda repository: [],
        max_sessions: int = 0,
        placed: Callable[[str, int, str], Awaitable[Sequence[Op]]] | None = None,
    ) -> None:
        self.storage = storage
        # A driver that commits a small whole upload in one step (asked once: the check is slow).
        self._whole: WholeUploads | None = storage if isinstance(storage, WholeUploads) else None
        self.sessions = sessions
        self.metadata = metadata
        self.lease = lease
        self.quotas_for = quotas_for  # the quota scopes a repository's pushes count in
        # Open sessions one owner may hold (http.uploads.maxsessions); 0: no bound.
        self.max_sessions = max_sessions
        # With regions: the records of bytes stored in this region (and copies queued for the others),
        # given (digest, size, storage key); written with the blob record (node/regions.py).
        self.placed = placed
        # Signs the offset into each Location URL, with a key every node shares through the coordinator.
        self.states = UploadStates(sessions.kv)

    async def stat(self, key: str) -> int | None:
        """The size of the object at `key`, or None: without a thread hand-off where the driver can."""
        return self._whole.stat_now(key) if self._whole is not None else await self.storage.stat(key)

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
                raise quota_denied(quota.QuotaExceeded(scope, used, size))

    async def start(self, repository: str, owner: str = "") -> UploadSession:
        upload_id = self.sessions.new_id()
        state = await self.storage.upload_start(layout.upload_key(repository, upload_id))
        return await self._create(upload_id, repository, state, owner=owner)

    async def _create(
        self,
        upload_id: str,
        repository: str,
        state: dict,  # type: ignore[type-arg]
        claim_lease: int = 0,
        *,
        owner: str,
        commit: CommitIntent | None = None,
    ) -> UploadSession:
        try:
            return await self.sessions.create(
                upload_id,
                repository,
                state,
                commit=commit,
                owner=owner,
                limit=self.max_sessions,
                claim_lease=claim_lease,
            )
        except TooManySessions as exc:
            raise TooManyRequests(
                {"open sessions": exc.limit, "owner": exc.owner},
                message=f"{exc.limit} upload sessions are open already: finish or cancel some",
                headers={"Retry-After": "60"},
                refused_by="ratelimit",
                rule="http.uploads.maxsessions",
            ) from None

    async def session(self, repository: str, upload_id: str) -> UploadSession:
        session = await self.sessions.get(upload_id)
        if session is None or session.repository != repository:
            raise BlobUploadUnknown({"upload": upload_id})
        return session

    async def _claim(self, session: UploadSession) -> Claim:
        """Claim the session for this request, waiting out a claim whose node may have died.

        A claim held by a dead node lapses with its lease (`cluster.leasettl`), so a client that
        resumes on another node at once waits that long at most instead of being refused.
        """
        deadline = time.monotonic() + self.lease.ttl + 2
        delay = 0.05
        while True:
            try:
                return await self.lease.attached(functools.partial(self.sessions.claim, session))
            except SessionBusy:
                if session.commit is not None or time.monotonic() > deadline:
                    raise _busy(session) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            except SessionChanged:
                pass
            current = await self.sessions.get(session.id)
            if current is None:
                raise BlobUploadUnknown({"upload": session.id}) from None
            if current.commit is not None:
                raise _busy(current) from None
            if current.offset != session.offset:
                raise UploadMoved(current)
            session = current  # only its record moved (a claim came and went): try again

    async def _write(
        self, claim: Claim, chunks: AsyncIterator[bytes], length: int | None
    ) -> tuple[int, rehashes.PySha256, dict]:  # type: ignore[type-arg]
        """Stream a request body at the claimed session's offset; on a broken stream keep what arrived."""
        session = claim.session
        lease = await self.lease.id()
        counted = _Counted(chunks, _hasher(session.hash_state), length, lambda: self.lease.holds(lease))
        key = layout.upload_key(session.repository, session.id)
        try:
            written, state = await self.storage.upload_write(
                key, session.driver_state, session.offset, counted.__aiter__()
            )
        except UploadInterrupted as exc:
            recorded = False
            if exc.written == counted.count:
                try:
                    await self.sessions.advance(
                        session, session.offset + exc.written, counted.hasher.serialize(), exc.state, claim=claim
                    )
                    recorded = True
                except SessionChanged:
                    pass
            if not recorded:
                await self.sessions.release(claim)
            if isinstance(exc.cause, (SizeInvalid, BlobUploadInvalid, ClaimLapsed)):
                raise exc.cause from None
            raise exc.cause from exc
        except BaseException:
            await self.sessions.release(claim)
            raise
        if written != counted.count:
            await self.sessions.release(claim)
            raise BlobUploadInvalid({"reason": "storage kept fewer bytes than were sent"})
        return written, counted.hasher, state

    async def _record_progress(
        self, claim: Claim, written: int, hasher: rehashes.PySha256, state: dict, commit: CommitIntent | None = None
    ) -> UploadSession:  # type: ignore[type-arg]
        session = claim.session
        try:
            return await self.sessions.advance(
                session, session.offset + written, hasher.serialize(), state, claim=claim, commit=commit
            )
        except SessionChanged:
            raise BlobUploadInvalid({"reason": "the upload was changed by another request at the same time"}) from None

    async def claim_checked(
        self, repository: str, upload_id: str, check: Callable[[UploadSession], None] = lambda session: None
    ) -> Claim:
        """Claim an upload for a writing request, reading it in the same coordinator transaction.

        `check` sees the session as claimed and raises to refuse the request (a range that does not
        continue the upload, a stale URL); the claim is then released and nothing else changed. A
        claim held by another request is waited out as `_claim` does.
        """
        deadline = time.monotonic() + self.lease.ttl + 2
        delay = 0.05
        while True:
            try:
                claim = await self.lease.attached(functools.partial(self.sessions.claim_open, upload_id))
            except SessionChanged:
                raise BlobUploadUnknown({"upload": upload_id}) from None
            except SessionBusy as exc:
                current = exc.session
                if current is None or current.repository != repository:
                    raise BlobUploadUnknown({"upload": upload_id}) from None
                if current.commit is not None or time.monotonic() > deadline:
                    raise _busy(current) from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            session = claim.session
            try:
                if session.repository != repository:
                    raise BlobUploadUnknown({"upload": upload_id})
                if session.commit is not None:
                    raise _busy(session)
                check(session)
            except BaseException:
                await self.sessions.release(claim)
                raise
            return claim

    async def append(
        self, session: UploadSession | Claim, chunks: AsyncIterator[bytes], *, length: int | None = None
    ) -> UploadSession:
        """Write a stream at the session's offset and record the new offset and hash state.

        Given a session as read, it is claimed first; given a claim (`claim_checked`), it is written at once.
        If the stream breaks, whatever arrived is recorded too, so the client can ask for the
        offset and resume; then the error goes on up.
        """
        claim = session if isinstance(session, Claim) else await self._claim(session)
        written, hasher, state = await self._write(claim, chunks, length)
        if length is not None and written != length:
            # Keep what arrived but tell the client its range was short.
            await self._record_progress(claim, written, hasher, state)
            raise SizeInvalid({"reason": f"expected {length} bytes, received {written}"})
        return await self._record_progress(claim, written, hasher, state)

    async def finish(
        self,
        session: UploadSession,
        digest: Digest,
        chunks: AsyncIterator[bytes] | None = None,
        *,
        length: int | None = None,
        events: Events = _no_events,
    ) -> int:
        """The closing PUT: append its body if any, check the digest, commit and link; returns the size."""
        check_algorithm(digest.algorithm)
        key = layout.blob_key(str(digest))
        if chunks is not None and session.offset == 0 and session.commit is None and 0 < (length or 0) <= _WHOLE_BODY:
            arrived, broke = await _gather(chunks, length)
            if broke is None and sum(map(len, arrived)) == length:
                return await self._finish_whole(session, digest, key, arrived, events)
            chunks = _replay(arrived, broke)  # short or broken: recorded as any request's bytes are
        if chunks is None:
            if session.commit is not None:
                raise _busy(session)
            hasher, state, size, claim = _hasher(session.hash_state), session.driver_state, session.offset, None
        else:
            claim = await self._claim(session)
            written, hasher, state = await self._write(claim, chunks, length)
            size = session.offset + written
            if length is not None and written != length:
                await self._record_progress(claim, written, hasher, state)
                raise SizeInvalid({"reason": f"expected {length} bytes, received {written}"})
        # Finalising ends a hasher: finalise a copy, the state may still be recorded below.
        actual = "sha256:" + _hasher(hasher.serialize()).finalize()
        if actual != str(digest):
            await self._discard(session, claim, state)
            raise DigestInvalid({"expected": str(digest), "actual": actual})
        try:
            await self.check_room(session.repository, size, str(digest))
        except BaseException:
            await self._discard(session, claim, state)
            raise
        intent = CommitIntent(str(digest), key, await self.stat(key) is not None)
        try:
            if claim is not None:
                committing = await self._record_progress(claim, size - session.offset, hasher, state, intent)
            else:
                committing = await self.sessions.advance(
                    session, session.offset, session.hash_state, session.driver_state, commit=intent
                )
        except SessionChanged:
            raise BlobUploadInvalid({"reason": "the upload was changed by another request at the same time"}) from None
        await self._commit(committing, events)
        return size

    async def _finish_whole(
        self, session: UploadSession, digest: Digest, key: str, body: list[bytes], events: Events
    ) -> int:
        """A closing PUT that brought a whole small blob to an empty session, read before any of it is written.

        It is checked first (digest, quotas); then one transaction takes the session and records
        the commit intent, the way a claim would (so it needs none: another request finds the
        session committing), and only then are the bytes written and committed: by a driver that
        can (the filesystem), in one step, after a look at the key that needed no thread hand-off.
        """
        hasher = rehashes.PySha256()
        for chunk in body:
            hasher.update(chunk)
        size = sum(map(len, body))
        actual = "sha256:" + _hasher(hasher.serialize()).finalize()
        if actual != str(digest):
            await self._discard(session, None, session.driver_state)
            raise DigestInvalid({"expected": str(digest), "actual": actual})
        try:
            await self.check_room(session.repository, size, str(digest))
        except BaseException:
            await self._discard(session, None, session.driver_state)
            raise
        existed = await self.stat(key) is not None
        intent = CommitIntent(str(digest), key, existed)
        try:
            committing = await self.sessions.advance(
                session, size, hasher.serialize(), session.driver_state, commit=intent
            )
        except SessionChanged:
            raise BlobUploadInvalid({"reason": "the upload was changed by another request at the same time"}) from None
        upload = layout.upload_key(session.repository, session.id)
        if self._whole is not None and not existed:
            return await self._commit_whole(self._whole, committing, upload, b"".join(body), events)
        try:
            written, state = await self.storage.upload_write(upload, session.driver_state, 0, _replay(body))
        except UploadInterrupted as exc:
            await self.reclaim(replace(committing, driver_state=exc.state))
            raise exc.cause from exc
        except BaseException:
            await self.reclaim(committing)
            raise
        if written != size:
            await self.reclaim(replace(committing, driver_state=state))
            raise BlobUploadInvalid({"reason": "storage kept fewer bytes than were sent"})
        # The driver's state after the write is known only now; the intent already covered it.
        await self._commit(replace(committing, driver_state=state), events)
        return size

    async def _commit_whole(
        self, whole: WholeUploads, committing: UploadSession, upload: str, data: bytes, events: Events
    ) -> int:
        """_finish_whole's write and commit in one storage step, under the intent (nothing stood at the key).

        Whatever a failure leaves, at the upload's key or the blob's, the intent proves this
        upload's: reclaimed at once, as the purge would. A cancelled request's step may still be
        running on its thread: that session stays committing, for the purge once it is idle.
        """
        assert committing.commit is not None
        try:
            await self.wait_to_write(committing.commit.digest)
            stored = await whole.upload_whole(upload, data, committing.commit.key)
        except Exception:
            await self.reclaim(committing)
            raise
        try:
            await self._record(committing, stored, events)
        except (Denied, BlobUploadInvalid, BlobUploadUnknown):
            await self.reclaim(committing, stored)
            raise
        return len(data)

    async def _discard(self, session: UploadSession, claim: Claim | None, state: dict) -> None:  # type: ignore[type-arg]
        """End a session whose upload can never succeed (wrong digest, no room): its bytes go too.

        Only if nobody moved it on meanwhile: a racing request's commit is left alone.
        """
        if await self.sessions.end(session, claim):
            await self.storage.upload_abort(layout.upload_key(session.repository, session.id), state)
        elif claim is not None:
            await self.sessions.release(claim)

    async def _commit(self, session: UploadSession, events: Events = _no_events) -> None:
        """Move a committing session's bytes to their key and record the blob; reclaim them on refusal."""
        intent = session.commit
        assert intent is not None
        upload = layout.upload_key(session.repository, session.id)
        if intent.existed:
            current = await self.metadata.get_blob(intent.digest)
            if current is not None and current.corrupt and current.key == intent.key:
                # A scrub found those bytes bad: these verified ones take their place.
                await self.storage.delete(intent.key)
        try:
            await self.wait_to_write(intent.digest)
        except BaseException:
            await self.reclaim(session)
            raise
        stored = await self.storage.upload_commit(upload, session.driver_state, session.offset, intent.key)
        try:
            await self._record(session, stored, events)
        except (Denied, BlobUploadInvalid, BlobUploadUnknown):
            await self.reclaim(session, stored)
            raise

    async def _record(self, session: UploadSession, stored: str, events: Events = _no_events) -> None:
        assert session.commit is not None
        repository, digest, size = session.repository, session.commit.digest, session.offset
        quotas = self.quotas_for(repository)
        placed = await self.placed(digest, size, stored) if self.placed is not None else ()
        try:
            for _ in range(COLLECTED_TRIES):
                try:
                    record = await self.metadata.commit_blob(
                        repository, digest, size, stored, upload=session, quotas=quotas, events=[*events(size), *placed]
                    )
                    break
                except BeingCollected:
                    # Garbage collection (or a refused upload's reclaim) was deleting this very digest;
                    # a collection's storage delete may have taken these bytes too. Wait it out and keep
                    # them only if intact.
                    await self.metadata.wait_collected(digest)
                    if await self.storage.stat(stored) != size:
                        raise BlobUploadInvalid(
                            {"digest": digest, "reason": "the blob was being garbage collected; upload it again"}
                        ) from None
                    if self.placed is not None:
                        placed = await self.placed(digest, size, stored)  # copies went too
            else:
                raise collected_busy(digest)
        except quota.QuotaExceeded as exc:
            raise quota_denied(exc) from None
        except RepositoryDeleting:
            raise BeingDeleted(repository) from None
        except SessionChanged:
            raise BlobUploadUnknown({"upload": session.id, "reason": "the upload was cancelled or expired"}) from None
        if record.key != stored and self.placed is None:
            # The digest was already stored elsewhere; this copy (at this upload's own key) is redundant.
            # (With regions, the copy record written with the link keeps it: it is this region's copy.)
            await self.storage.delete(stored)

    async def wait_to_write(self, digest: str) -> None:
        """Wait out a deletion of `digest` under way before writing to its key (after the commit intent
        is recorded: see Metadata.remove_unrecorded), so that the deletion cannot take these bytes."""
        await self.metadata.wait_collected(digest)

    async def reclaim(self, session: UploadSession, stored: str | None = None) -> None:
        """Remove what a committing session wrote that no blob record names, then the session.

        The commit intent proves these bytes are this upload's: the upload's own key always, and
        the blob's key unless an object was there before the commit began.
        """
        intent = session.commit
        upload = layout.upload_key(session.repository, session.id)
        if intent is not None:
            record = await self.metadata.get_blob(intent.digest)
            named = record.key if record is not None else None
            for key in {stored or upload, upload}:
                if key != intent.key and key != named and await self.storage.stat(key) is not None:
                    await self.storage.delete(key)  # under this upload's own prefix
            if record is None and not intent.existed:
                others = functools.partial(self.sessions.others_committing, intent.digest, session.id)
                await self.metadata.remove_unrecorded(intent.digest, intent.key, self.storage.delete, others)
        await self.storage.upload_abort(upload, session.driver_state)
        await self.sessions.delete(session)

    async def mount(self, repository: str, digest: str, source: str, *, events: Events = _no_events) -> bool:
        """Link a blob of `source` into `repository`, within its quotas; False if `source` lacks it."""
        try:
            linked = await self.metadata.mount_blob(
                repository, digest, source, quotas=self.quotas_for(repository), events=events
            )
        except quota.QuotaExceeded as exc:
            raise quota_denied(exc) from None
        except RepositoryDeleting:
            raise BeingDeleted(repository) from None
        return linked is not None

    async def cancel(self, session: UploadSession) -> None:
        """DELETE on an upload: gone with its bytes, unless a request is writing to it right now."""
        deadline = time.monotonic() + self.lease.ttl + 2
        while time.monotonic() <= deadline:
            try:
                await self.sessions.cancel(session)
            except SessionBusy:
                if session.commit is not None:
                    raise _busy(session) from None
                await asyncio.sleep(0.1)
                continue
            except SessionChanged:
                current = await self.sessions.get(session.id)
                if current is None:
                    raise BlobUploadUnknown({"upload": session.id}) from None
                session = current
                continue
            await self.storage.upload_abort(layout.upload_key(session.repository, session.id), session.driver_state)
            return
        raise _busy(session)

    async def monolithic(
        self,
        repository: str,
        digest: Digest,
        chunks: AsyncIterator[bytes],
        length: int | None,
        owner: str = "",
        *,
        events: Events = _no_events,
    ) -> int:
        """A whole blob in one request. Its session is created committing: nobody else can write to it."""
        if length is not None:
            await self.check_room(repository, length, str(digest))
        key = layout.blob_key(str(digest))
        upload_id = self.sessions.new_id()
        upload = layout.upload_key(repository, upload_id)
        state = await self.storage.upload_start(upload)
        intent = CommitIntent(str(digest), key, await self.stat(key) is not None)
        # Claimed as it is made, for as long as the body takes: the purge must not end it meanwhile.
        session = await self.lease.attached(
            functools.partial(self._create, upload_id, repository, state, owner=owner, commit=intent)
        )
        lease = await self.lease.id()
        counted = _Counted(chunks, rehashes.PySha256(), length, lambda: self.lease.holds(lease))
        try:
            try:
                written, state = await self.storage.upload_write(upload, state, 0, counted.__aiter__())
            except UploadInterrupted as exc:
                state = exc.state
                raise exc.cause from None
            if length is not None and written != length:
                raise SizeInvalid({"reason": f"expected {length} bytes, received {written}"})
            actual = "sha256:" + counted.hasher.finalize()
            if actual != str(digest):
                raise DigestInvalid({"expected": str(digest), "actual": actual})
        except BaseException:
            await self.storage.upload_abort(upload, state)
            await self.sessions.delete(session)
            raise
        # The driver state and size are known only now; the intent already stood.
        session = replace(session, offset=written, driver_state=state)
        await self._commit(session, events)
        return written
