"""Filesystem storage driver: objects are files under a root directory, committed by rename."""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO, TypeVar

from .driver import StoredObject, UploadInterrupted, UploadState

T = TypeVar("T")

_READ_CHUNK = 1 << 20
# Incoming bytes are gathered to this size before one write call leaves the event loop.
_WRITE_BATCH = 1 << 20
# Empty directories are pruned as blobs and uploads go; a writer retries if one vanishes under it.
_DIR_RACE_ATTEMPTS = 5
_LIST_BATCH = 1000


class FilesystemDriver:
    name = "filesystem"

    def __init__(self, root: str, *, max_threads: int = 16, create: bool = True) -> None:
        """`create=False` (read-only commands, dry runs) leaves a missing root missing."""
        self.root = os.path.abspath(root)
        if create:
            os.makedirs(self.root, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="wharf-fs")

    def _path(self, key: str) -> str:
        # Keys come from layout.py out of validated names and digests; refuse anything odd anyway.
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad storage key {key!r}")
        return os.path.join(self.root, key)

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # -- committed objects ------------------------------------------------------------------

    async def stat(self, key: str) -> int | None:
        try:
            return (await self._run(os.stat, self._path(key))).st_size
        except FileNotFoundError:
            return None

    async def modified(self, key: str) -> float | None:
        try:
            return (await self._run(os.stat, self._path(key))).st_mtime
        except FileNotFoundError:
            return None

    async def read(self, key: str, offset: int = 0, length: int | None = None) -> AsyncIterator[bytes]:
        handle: BinaryIO = await self._run(open, self._path(key), "rb")
        try:
            await self._run(handle.seek, offset)
            remaining = length
            while remaining is None or remaining > 0:
                size = _READ_CHUNK if remaining is None else min(_READ_CHUNK, remaining)
                data: bytes = await self._run(handle.read, size)
                if not data:
                    break
                if remaining is not None:
                    remaining -= len(data)
                yield data
        finally:
            await self._run(handle.close)

    async def read_bytes(self, key: str) -> bytes:
        return await self._run(_read_file, self._path(key))

    async def write_bytes(self, key: str, data: bytes) -> None:
        await self._run(_write_atomic, self._path(key), data)

    async def write_stream(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        path = self._path(key)
        tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}")
        handle: BinaryIO = await self._run(_open_new, tmp)
        size = 0
        try:
            batch: list[bytes] = []
            batched = 0
            async for chunk in chunks:
                batch.append(chunk)
                batched += len(chunk)
                if batched >= _WRITE_BATCH:
                    await self._run(handle.write, b"".join(batch))
                    size += batched
                    batch, batched = [], 0
            if batch:
                await self._run(handle.write, b"".join(batch))
                size += batched
            await self._run(_flush_sync, handle)
            await self._run(handle.close)
            await self._run(_replace_durably, tmp, path)
        except BaseException:
            await self._run(handle.close)
            await self._run(_silent_remove, tmp)
            raise
        return size

    async def copy(self, source: str, key: str) -> int:
        return await self.write_stream(key, self.read(source))

    async def delete(self, key: str) -> None:
        await self._run(_remove_and_prune, self._path(key), self.root)

    async def delete_many(self, keys: list[str]) -> None:
        await self._run(_remove_all, [self._path(key) for key in keys], self.root)

    async def list(self, prefix: str) -> AsyncIterator[str]:  # type: ignore[override]
        # Walked a batch at a time on the pool: memory stays bounded and the first key comes at once.
        walk = _walk_files(self._path(prefix.rstrip("/")))
        while True:
            batch: list[str] = await self._run(_next_batch, walk)
            for path in batch:
                key = os.path.relpath(path, self.root).replace(os.sep, "/")
                if ".tmp-" not in key:
                    yield key
            if len(batch) < _LIST_BATCH:
                return

    async def list_objects(self, prefix: str) -> AsyncIterator[StoredObject]:  # type: ignore[override]
        found: list[tuple[str, int, float]] = await self._run(_walk_stat, self._path(prefix.rstrip("/")))
        for path, size, modified in found:
            key = os.path.relpath(path, self.root).replace(os.sep, "/")
            if ".tmp-" not in key:
                yield StoredObject(key, size, modified)

    async def redirect_url(self, key: str) -> str | None:
        return None

    def local_path(self, key: str) -> str | None:
        return self._path(key)

    # -- uploads ----------------------------------------------------------------------------

    async def upload_start(self, upload_key: str) -> UploadState:
        # Nothing on disk yet: the first write creates the file, after its session is recorded.
        self._path(upload_key)
        return {}

    async def upload_write(
        self, upload_key: str, state: UploadState, offset: int, chunks: AsyncIterator[bytes]
    ) -> tuple[int, UploadState]:
        # The file is opened (or created) with the first full batch, and the last batch is written,
        # synced and closed in one hop to the pool: a body smaller than a batch (a small blob) costs
        # one hop, a larger one a hop per batch and one more.
        path = self._path(upload_key)
        handle: BinaryIO | None = None
        written = 0
        batch: list[bytes] = []
        batched = 0
        closed = False
        try:
            try:
                async for chunk in chunks:
                    if not chunk:
                        continue
                    batch.append(chunk)
                    batched += len(chunk)
                    if batched >= _WRITE_BATCH:
                        if handle is None:
                            handle = await self._run(_open_for_write, path, offset)
                        await self._run(handle.write, b"".join(batch))
                        written += batched
                        batch, batched = [], 0
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except Exception as exc:
                # The stream broke: keep every byte that arrived so the client can resume.
                closed = True
                await self._run(_write_sync_close, handle, path, offset, b"".join(batch))
                written += batched
                raise UploadInterrupted(written, state, exc) from exc
            closed = True
            await self._run(_write_sync_close, handle, path, offset, b"".join(batch))
            written += batched
        finally:
            if handle is not None and not closed:
                await self._run(handle.close)
        return written, state

    def stat_now(self, key: str) -> int | None:
        # One stat of a local path: less than the two thread hand-offs a trip to the pool costs.
        try:
            return os.stat(self._path(key)).st_size
        except FileNotFoundError:
            return None

    async def upload_whole(self, upload_key: str, data: bytes, key: str) -> str:
        # The same file, syncs and rename as upload_write then upload_commit, in one hop to the pool.
        await self._run(_write_whole, self._path(upload_key), data, self._path(key), self.root)
        return key

    async def upload_commit(self, upload_key: str, state: UploadState, size: int, key: str) -> str:
        await self._run(_commit, self._path(upload_key), size, self._path(key), self.root)
        return key

    async def upload_abort(self, upload_key: str, state: UploadState) -> None:
        await self._run(_remove_upload_dir, self._path(upload_key), self.root)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- blocking helpers, run on the driver's thread pool ----------------------------------------


def _read_file(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    # Unbuffered: a file object's open asks the kernel three more things a one-write file needs not.
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".tmp-{uuid.uuid4().hex}")
    try:
        fd = _in_new_dir(tmp, lambda: os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        _silent_remove(tmp)
        raise
    _fsync_dir(directory)


def _open_new(path: str) -> BinaryIO:
    return _in_new_dir(path, lambda: open(path, "wb"))


def _replace_durably(tmp: str, path: str) -> None:
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _silent_remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _remove_empty_dir(directory: str, root: str) -> None:
    """Remove an object's own directory if empty; shared parents stay, so writers rarely race."""
    if directory.startswith(root + os.sep):
        try:
            os.rmdir(directory)
        except OSError:
            pass


def _remove_and_prune(path: str, root: str) -> None:
    _silent_remove(path)
    _remove_empty_dir(os.path.dirname(path), root)


def _remove_all(paths: list[str], root: str) -> None:
    for path in paths:
        _remove_and_prune(path, root)


def _walk_files(base: str) -> Iterator[str]:
    for directory, dirs, files in os.walk(base):
        dirs.sort()
        for name in sorted(files):
            yield os.path.join(directory, name)


def _next_batch(walk: Iterator[str]) -> list[str]:
    return list(itertools.islice(walk, _LIST_BATCH))


def _walk_stat(base: str) -> list[tuple[str, int, float]]:
    found: list[tuple[str, int, float]] = []
    for directory, _dirs, files in os.walk(base):
        for name in files:
            path = os.path.join(directory, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue  # removed since the directory was read
            found.append((path, st.st_size, st.st_mtime))
    return found


def _in_new_dir(path: str, make: Callable[[], T]) -> T:
    """Create `path`'s directory and run `make`, again if a concurrent prune removed the directory."""
    for _ in range(_DIR_RACE_ATTEMPTS - 1):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return make()
        except FileNotFoundError:
            continue  # another request removed the emptied directory between the two calls
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return make()


def _create_empty(path: str) -> None:
    def create() -> None:
        with open(path, "wb"):
            pass

    _in_new_dir(path, create)


def _open_at(path: str, offset: int) -> BinaryIO:
    handle = open(path, "r+b")
    # Bytes past the recorded offset belong to a request that broke before it was recorded.
    handle.truncate(offset)
    handle.seek(offset)
    return handle


def _open_for_write(path: str, offset: int) -> BinaryIO:
    try:
        return _open_at(path, offset)
    except FileNotFoundError:
        # A session whose file vanished (or was never made by this driver) starts it again.
        if offset:
            raise
        _create_empty(path)
        return _open_at(path, offset)


def _write_sync_close(handle: BinaryIO | None, path: str, offset: int, data: bytes) -> None:
    """Write the last bytes of an upload request, sync and close; opens the file if nothing did yet."""
    if handle is None:
        handle = _open_for_write(path, offset)
    try:
        if data:
            handle.write(data)
        _flush_sync(handle)
    finally:
        handle.close()


def _flush_sync(handle) -> None:  # type: ignore[no-untyped-def]
    handle.flush()
    os.fsync(handle.fileno())


def _write_whole(upload_path: str, data: bytes, path: str, root: str) -> None:
    """A whole small upload: written and synced at the upload's key, then committed as _commit does."""
    if os.path.exists(path):
        # Content-addressed: the same digest already stands for the same bytes.
        _remove_upload_dir(upload_path, root)
        return
    # Unbuffered, as _write_atomic: a file object's open asks the kernel three more things a one-write
    # file needs not. Truncated: bytes of an earlier request that broke before it was recorded are no part of it.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    fd = _in_new_dir(upload_path, lambda: os.open(upload_path, flags, 0o666))
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _move_into_place(upload_path, path, root)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _commit(upload_path: str, size: int, path: str, root: str) -> None:
    if os.path.exists(path):
        # Content-addressed: the same digest already stands for the same bytes.
        _remove_upload_dir(upload_path, root)
        return
    if size == 0 and not os.path.exists(upload_path):
        _create_empty(upload_path)  # an empty blob: nothing was ever written to the upload
    with open(upload_path, "r+b") as handle:
        # upload_write synced every byte it wrote; the file needs syncing again only when bytes past
        # `size` (from a request that broke before it was recorded) are cut off here.
        if os.fstat(handle.fileno()).st_size != size:
            handle.truncate(size)
            handle.flush()
            os.fsync(handle.fileno())
    _move_into_place(upload_path, path, root)


def _move_into_place(upload_path: str, path: str, root: str) -> None:
    """Rename a synced upload file to its key, sync the directory that names it, drop the upload's."""
    _in_new_dir(path, lambda: os.replace(upload_path, path))
    _fsync_dir(os.path.dirname(path))
    _remove_upload_dir(upload_path, root)


def _remove_upload_dir(upload_path: str, root: str) -> None:
    directory = os.path.dirname(upload_path)
    if directory.startswith(root + os.sep):
        try:
            os.rmdir(directory)  # empty, as a commit leaves it: nothing to list
            return
        except FileNotFoundError:
            return
        except OSError:
            pass  # files left in it (an aborted upload's): removed below
    try:
        for name in os.listdir(directory):
            _silent_remove(os.path.join(directory, name))
    except FileNotFoundError:
        return
    _remove_empty_dir(directory, root)
