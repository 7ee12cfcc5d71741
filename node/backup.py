"""Coordinator backups: `wharf backup`, `wharf restore`, and the leader's snapshots into the storage.

A snapshot (format: coordinator/snapshot.py) is one file, named by `layout.snapshot_key` so that
names sort by time. Where snapshots are kept:

- `DIR`: files at the top of a local directory (`wharf backup` creates it if missing).
- `s3://bucket/prefix`: objects under that prefix. It is reached with the configuration's
  `storage.s3` settings (endpoint, region, access keys, TLS options) when the registry stores in
  S3. `--s3-endpoint URL` (with `--s3-region`) names another S3 service instead; its credentials
  then come from the standard AWS environment variables or profile (`AWS_ACCESS_KEY_ID`,
  `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`), never from a command line.
- the registry's own storage, under `wharf/snapshots/` (outside Distribution's `docker/` tree):
  the leader writes one every `backup.interval` and keeps the newest `backup.keep`, deleting only
  older objects there whose names are exactly a snapshot's. A copy of the storage alone then
  restores every tag as of the last snapshot: `wharf restore CONFIG --from-storage`.

`--from` takes the newest snapshot in a directory or under an S3 prefix, or the one file or
object named; `--snapshot NAME` picks another. A dry run reads and checks, then says what it
would do; it creates and changes nothing anywhere (no file, directory, key or object).

Exit codes: 0 done; 1 failed (unreachable, unreadable or damaged; one line says what); 2 usage or
configuration; 3 refused: the coordinator is not empty (`--force` overwrites it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from coordinator import snapshot
from coordinator.kv import KV

from .config import Config, S3Storage
from .services import Services
from .storage import layout
from .storage.driver import StorageDriver
from .store import (
    embedded_file,
    open_kv,
    open_storage,
)

log = logging.getLogger("wharf.backup")

# After a failed scheduled snapshot, try again this soon (or at the interval, if shorter).
_RETRY_SECONDS = 300.0
# A newest snapshot dated further ahead than this is a clock problem, not a reason to wait.
_CLOCK_SLACK = 60.0
_FILE_CHUNK = 1024 * 1024

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3


class BackupError(Exception):
    """A clear, one-line reason a command cannot go on; nothing was changed by it."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# -- where snapshots are kept --------------------------------------------------------------------


@dataclass(frozen=True)
class StoredSnapshot:
    key: str
    created: float
    revision: int

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]


# An alias: inside SnapshotStore, `list` is the method.
_Snapshots = list[StoredSnapshot]
_Keys = list[str]


class SnapshotStore:
    """Snapshots under one key prefix of one storage driver."""

    def __init__(self, driver: StorageDriver, prefix: str, where: str, *, owned: bool = False) -> None:
        self.driver = driver
        self.prefix = prefix
        self.where = where
        self._owned = owned

    async def list(self) -> _Snapshots:
        """The snapshots here, oldest first; any other object is ignored."""
        found: list[StoredSnapshot] = []
        async for key in self.driver.list(self.prefix):
            parsed = layout.snapshot_from_key(key, self.prefix)
            if parsed is not None:
                found.append(StoredSnapshot(key, *parsed))
        return sorted(found, key=lambda s: (s.created, s.revision, s.key))

    async def find(self, name: str | None) -> StoredSnapshot:
        """The snapshot called `name`, or the newest."""
        snapshots: _Snapshots = await self.list()
        if name is None:
            if not snapshots:
                raise BackupError(f"no snapshots in {self.where}")
            return snapshots[-1]
        for found in snapshots:
            if found.name == name:
                return found
        raise BackupError(f"no snapshot {name} in {self.where} ({len(snapshots)} snapshots there)")

    async def write(self, kv: KV) -> tuple[StoredSnapshot, snapshot.SnapshotInfo]:
        async with snapshot.open_dump(kv) as running:
            header = running.header
            key = layout.snapshot_key(header.created, header.revision, self.prefix)
            await self.driver.write_stream(key, running.chunks())
        created, revision = layout.snapshot_from_key(key, self.prefix) or (header.created, header.revision)
        return StoredSnapshot(key, created, revision), running.info

    def source(self, stored: StoredSnapshot) -> snapshot.Source:
        return lambda: self.driver.read(stored.key)

    async def prune(self, keep: int, *, spare: str) -> _Keys:
        """Delete all but the newest `keep` snapshots here (never `spare`, the one just written)."""
        snapshots = await self.list()
        doomed = [s.key for s in snapshots[: max(len(snapshots) - keep, 0)] if s.key != spare]
        if doomed:
            await self.driver.delete_many(doomed)
        return doomed

    async def close(self) -> None:
        if self._owned:
            await self.driver.close()


@dataclass(frozen=True)
class Target:
    """A parsed --to/--from: a directory, one file, or an S3 prefix (and maybe one object's name)."""

    kind: str  # "dir", "file" or "s3"
    path: str = ""
    bucket: str = ""
    prefix: str = ""
    name: str | None = None  # one snapshot, named in the target itself

    def __str__(self) -> str:
        if self.kind == "s3":
            return f"s3://{self.bucket}/{self.prefix}{self.name or ''}"
        return self.path


def parse_target(text: str, *, reading: bool) -> Target:
    if text.startswith("s3://"):
        bucket, _, rest = text[len("s3://") :].partition("/")
        if not bucket:
            raise BackupError(f"{text}: name a bucket, as in s3://bucket/prefix", EXIT_USAGE)
        rest = rest.strip("/")
        head, _, last = rest.rpartition("/")
        if reading and layout.snapshot_from_key(last, "") is not None:
            return Target("s3", bucket=bucket, prefix=head + "/" if head else "", name=last)
        return Target("s3", bucket=bucket, prefix=rest + "/" if rest else "")
    if not text:
        raise BackupError("name a directory, a file or s3://bucket/prefix", EXIT_USAGE)
    path = os.path.abspath(text)
    if os.path.isfile(path):
        if not reading:
            raise BackupError(f"{text} is a file: name a directory to write snapshots into", EXIT_USAGE)
        return Target("file", path=path)
    if reading and not os.path.isdir(path):
        raise BackupError(f"{text}: no such file or directory")
    return Target("dir", path=path)


def _s3_settings(config: Config, target: Target, args: argparse.Namespace) -> S3Storage:
    endpoint = getattr(args, "s3_endpoint", None)
    if endpoint is None and config.storage.s3 is not None:
        settings = dataclasses.replace(config.storage.s3)
    else:
        settings = S3Storage(regionendpoint=endpoint or "", secure=not (endpoint or "").startswith("http://"))
    if getattr(args, "s3_region", None):
        settings.region = args.s3_region
    settings.bucket = target.bucket
    settings.rootdirectory = target.prefix
    return settings


def open_target(config: Config, target: Target, args: argparse.Namespace) -> SnapshotStore:
    """A SnapshotStore for a directory or S3 target (a directory is created if missing)."""
    if target.kind == "s3":
        from .storage.s3 import S3Driver

        return SnapshotStore(S3Driver(_s3_settings(config, target, args)), "", str(target), owned=True)
    from .storage.filesystem import FilesystemDriver

    return SnapshotStore(FilesystemDriver(target.path), "", target.path, owned=True)


def file_source(path: str) -> snapshot.Source:
    async def chunks() -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(open, path, "rb")
        try:
            while data := await asyncio.to_thread(handle.read, _FILE_CHUNK):
                yield data
        finally:
            await asyncio.to_thread(handle.close)

    return chunks


def storage_snapshots(storage: StorageDriver, *, owned: bool = False) -> SnapshotStore:
    """The snapshots the leader keeps in the registry's storage."""
    return SnapshotStore(storage, layout.SNAPSHOTS, f"the registry's storage ({layout.SNAPSHOTS})", owned=owned)


# -- opening the store ---------------------------------------------------------------------------
# The one place that opens the coordinator and storage for these commands, the way `wharf serve`
# does. (When the store-opening module lands, these become its read and restore modes.)


async def open_coordinator(config: Config, *, readonly: bool) -> KV | None:
    """The configured coordinator, found as `wharf serve` finds it; `readonly` creates nothing and
    gives None where there is none yet."""
    path = None
    if config.coordinator.embedded is not None:
        path = embedded_file(config, "read" if readonly else "restore")
        if path is None or (readonly and not os.path.isfile(path)):
            return None
    return await open_kv(config, readonly=readonly, path=path)


def open_registry_storage(config: Config) -> StorageDriver:
    filesystem = config.storage.filesystem
    if filesystem is not None and not os.path.isdir(filesystem.rootdirectory):
        raise BackupError(f"no snapshots: the storage root {filesystem.rootdirectory} does not exist")
    return open_storage(config, create=False)


# -- the leader's schedule -----------------------------------------------------------------------


async def scheduled(services: Services) -> None:
    """Snapshots into the storage every `backup.interval`, counted from the newest one there."""
    settings = services.config.backup
    store = storage_snapshots(services.storage)
    while True:
        try:
            wait = await _due_in(store, settings.interval_seconds)
            if wait <= 0 and services.readonly.active:
                # Nothing changes while read-only, and the storage is written to by nothing.
                wait = min(settings.interval_seconds, _RETRY_SECONDS)
            elif wait <= 0:
                await take_scheduled(services, store)
                wait = settings.interval_seconds
        except asyncio.CancelledError:
            raise
        except Exception:
            services.metrics.backup_snapshots.labels("failed").inc()
            log.exception("coordinator snapshot into the storage failed")
            wait = min(settings.interval_seconds, _RETRY_SECONDS)
        await asyncio.sleep(max(wait, 0.05))


async def _due_in(store: SnapshotStore, interval: float) -> float:
    snapshots = await store.list()
    if not snapshots:
        return 0.0
    now = time.time()
    newest = snapshots[-1].created
    if newest > now + _CLOCK_SLACK:
        return 0.0
    return min(newest + interval - now, interval)


async def take_scheduled(services: Services, store: SnapshotStore) -> StoredSnapshot:
    started = time.monotonic()
    stored, info = await store.write(services.kv)
    seconds = time.monotonic() - started
    deleted = await store.prune(services.config.backup.keep, spare=stored.key)
    metrics = services.metrics
    metrics.backup_snapshots.labels("ok").inc()
    metrics.backup_last_timestamp.set(info.header.created)
    metrics.backup_last_bytes.set(info.size)
    metrics.backup_last_keys.set(info.keys)
    metrics.backup_last_duration.set(seconds)
    log.info(
        "coordinator snapshot %s: %d keys at revision %d, %d bytes in %.2fs; %d older deleted",
        stored.key,
        info.keys,
        info.header.revision,
        info.size,
        seconds,
        len(deleted),
        extra={
            "fields": {
                "snapshot": stored.key,
                "revision": info.header.revision,
                "keys": info.keys,
                "bytes": info.size,
                "seconds": round(seconds, 3),
                "deleted": deleted,
            }
        },
    )
    return stored
