"""The storage driver protocol: what the registry needs from a place that keeps bytes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

# Opaque, JSON-serialisable state a driver keeps for an upload between requests. It travels in the
# coordinator's upload session record, so any node can continue an upload that another began.
UploadState = dict[str, Any]


class UploadInterrupted(Exception):
    """The body stream broke midway; `written` bytes of it were kept and `state` describes them."""

    def __init__(self, written: int, state: UploadState, cause: BaseException) -> None:
        super().__init__(f"upload interrupted after {written} bytes: {cause!r}")
        self.written = written
        self.state = state
        self.cause = cause


@dataclass(frozen=True)
class StoredObject:
    """A committed object as a listing sees it."""

    key: str
    size: int
    modified: float  # seconds since the epoch


class StorageDriver(Protocol):
    """Keys are '/'-separated paths made by `layout`; values are immutable once committed."""

    name: str

    async def stat(self, key: str) -> int | None:
        """Size of a committed object, or None."""
        ...

    def read(self, key: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        """Stream `length` bytes (to the end if None) of an object from `offset`."""
        ...

    async def modified(self, key: str) -> float | None:
        """When a committed object was last written (seconds since the epoch), or None."""
        ...

    async def read_bytes(self, key: str) -> bytes:
        """A whole small object (manifests); FileNotFoundError if absent."""
        ...

    async def write_bytes(self, key: str, data: bytes) -> None:
        """Store a small object atomically: readers see all of it or nothing."""
        ...

    async def write_stream(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        """Store an object of any size from a stream, atomically; returns its size.

        Readers see the old object (or none) until all of the new one is there; a stream that
        breaks leaves no trace. Memory stays within about one S3 part, whatever the size.
        """
        ...

    async def copy(self, source: str, key: str) -> int:
        """Copy a committed object to `key` atomically, without the bytes passing through the node
        where the store can copy by itself; returns the size."""
        ...

    async def delete(self, key: str) -> None:
        """Remove an object; absent is fine."""
        ...

    async def delete_many(self, keys: list[str]) -> None:
        """Remove several objects, in as few storage requests as the store allows."""
        ...

    def list(self, prefix: str) -> AsyncIterator[str]:
        """Every committed object key under `prefix`, in no particular order."""
        ...

    def list_objects(self, prefix: str) -> AsyncIterator[StoredObject]:
        """Like `list`, with each object's size and modification time from the same listing."""
        ...

    async def redirect_url(self, key: str) -> str | None:
        """A URL a client may fetch the object from directly, or None to stream through the node."""
        ...

    def local_path(self, key: str) -> str | None:
        """A file path the server may send without copying, or None."""
        ...

    async def upload_start(self, upload_key: str) -> UploadState: ...

    async def upload_write(
        self, upload_key: str, state: UploadState, offset: int, chunks: AsyncIterator[bytes]
    ) -> tuple[int, UploadState]:
        """Append the stream at `offset` (bytes past it from a broken earlier request are dropped).

        Returns the bytes written and the new state; raises UploadInterrupted when the stream
        breaks, after keeping what arrived.
        """
        ...

    async def upload_commit(self, upload_key: str, state: UploadState, size: int, key: str) -> str:
        """Make the upload's `size` bytes a committed object, atomically, and drop the upload.

        `key` is where the blob belongs; a driver that cannot put it there without copying the
        bytes (an S3 multipart upload is completed where it was begun) may leave it elsewhere.
        Returns the key the object now has; the blob record names it.
        """
        ...

    async def upload_abort(self, upload_key: str, state: UploadState) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class WholeUploads(Protocol):
    """A driver that can tell at once whether an object stands at a key, and write a small upload
    whole and commit it in one step (the filesystem: no thread hand-off for the look, one for the rest)."""

    def stat_now(self, key: str) -> int | None:
        """As `stat`, on the calling thread: only where that costs about a system call."""
        ...

    async def upload_whole(self, upload_key: str, data: bytes, key: str) -> str:
        """`upload_write` of `data` into an empty upload, then `upload_commit` to `key`, as one step.

        Returns the key the object now has. On a failure the bytes may be at the upload's key or at
        `key`; the caller's commit intent names both.
        """
        ...
