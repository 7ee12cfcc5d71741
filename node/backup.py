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
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from coordinator import snapshot
from coordinator.kv import KV, SnapshotLost

from .config import Config, S3Storage
from .storage import layout
from .storage.driver import StorageDriver
from .store import (
    StoreRefused,
    adopt_identity_after_restore,
    describe_coordinator,
    embedded_file,
    open_kv,
    open_storage,
)

if TYPE_CHECKING:
    from .services import Services

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


def _file_source(path: str) -> snapshot.Source:
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


async def _open_coordinator(config: Config, *, readonly: bool) -> KV | None:
    """The configured coordinator, found as `wharf serve` finds it; `readonly` creates nothing and
    gives None where there is none yet."""
    path = None
    if config.coordinator.embedded is not None:
        path = embedded_file(config, "read" if readonly else "restore")
        if path is None or (readonly and not os.path.isfile(path)):
            return None
    return await open_kv(config, readonly=readonly, path=path)


def _open_registry_storage(config: Config) -> StorageDriver:
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


# -- commands ------------------------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    backup = commands.add_parser(
        "backup",
        help="write a consistent snapshot of the coordinator to a directory or S3",
        description="Write one consistent snapshot of the coordinator (one revision); pushes go on meanwhile.",
    )
    backup.add_argument("config", nargs="?", help="configuration file")
    backup.add_argument("--to", required=True, metavar="DIR|s3://BUCKET/PREFIX", help="where to write it")
    backup.add_argument(
        "--dry-run", "-d", action="store_true", help="read and say what would be written; write nothing"
    )
    _add_s3_flags(backup)
    backup.set_defaults(run=run_backup)

    restore = commands.add_parser(
        "restore",
        help="rebuild an empty coordinator from a snapshot",
        description="Rebuild the coordinator from a snapshot. Stop the registry's nodes first; a coordinator "
        "that is not empty is refused unless --force.",
    )
    restore.add_argument("config", nargs="?", help="configuration file")
    source = restore.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--from", dest="source", metavar="DIR|FILE|s3://BUCKET/PREFIX", help="the newest snapshot there, or that file"
    )
    source.add_argument(
        "--from-storage", action="store_true", help="the newest snapshot the leader wrote into the registry's storage"
    )
    restore.add_argument("--snapshot", metavar="NAME", help="this snapshot rather than the newest")
    restore.add_argument("--force", action="store_true", help="overwrite a coordinator that is not empty")
    restore.add_argument("--dry-run", "-d", action="store_true", help="check the snapshot and say what would change")
    _add_s3_flags(restore)
    restore.set_defaults(run=run_restore)


def _add_s3_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3 service of an s3:// target (default: storage.s3's; credentials from the AWS environment)",
    )
    parser.add_argument("--s3-region", metavar="REGION", help="region of an s3:// target")


def _command(name: str, work: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run a command: one line on stderr and an exit code for every failure, never a traceback."""
    try:
        return asyncio.run(work())
    except BackupError as exc:
        print(f"wharf {name}: {exc}", file=sys.stderr)
        return exc.code
    except snapshot.CoordinatorNotEmpty as exc:
        print(f"wharf {name}: refused: {exc}; nothing was written (--force overwrites it)", file=sys.stderr)
        return EXIT_REFUSED
    except snapshot.SnapshotError as exc:
        print(f"wharf {name}: damaged snapshot: {exc}; nothing was written", file=sys.stderr)
        return EXIT_FAILED
    except SnapshotLost as exc:
        print(f"wharf {name}: {exc}; nothing was kept, run it again", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"wharf {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # unreachable coordinator or S3, permissions, ...: say it in one line
        print(f"wharf {name}: {_brief(exc)}", file=sys.stderr)
        return EXIT_FAILED


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def run_backup(args: argparse.Namespace, config: Config) -> int:
    async def work() -> int:
        target = parse_target(args.to, reading=False)
        kv = await _open_coordinator(config, readonly=True)
        if kv is None:
            raise BackupError(f"no coordinator at {describe_coordinator(config)}: nothing to back up")
        try:
            if args.dry_run:
                return await _backup_dry_run(config, kv, target, args)
            store = open_target(config, target, args)
            try:
                stored, info = await store.write(kv)
            finally:
                await store.close()
        finally:
            await kv.close()
        where = os.path.join(target.path, stored.name) if target.kind == "dir" else f"{target}{stored.name}"
        print(
            f"wrote {where}: {info.keys} keys at revision {info.header.revision} "
            f"({info.left_out} ephemeral left out), {_size(info.size)} in {info.seconds:.2f}s"
        )
        return 0

    return _command("backup", work)


async def _backup_dry_run(config: Config, kv: KV, target: Target, args: argparse.Namespace) -> int:
    async with snapshot.open_dump(kv) as running:
        size = 0
        async for chunk in running.chunks():
            size += len(chunk)
    info = running.info
    name = layout.snapshot_key(info.header.created, info.header.revision, "")
    if target.kind == "s3":
        store = open_target(config, target, args)
        try:
            existing = len(await store.list())  # reads only: checks the bucket and the credentials
        finally:
            await store.close()
        where = f"{target}{name} ({existing} snapshots there now)"
    elif os.path.isdir(target.path):
        if not os.access(target.path, os.W_OK | os.X_OK):
            raise BackupError(f"{target.path} is not writable")
        where = os.path.join(target.path, name)
    else:
        ancestor = target.path
        while not os.path.isdir(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise BackupError(f"cannot create {target.path}: {ancestor} is not writable")
        where = f"{os.path.join(target.path, name)} (creating {target.path})"
    print(
        f"dry run: would write {where}: {info.keys} keys at revision {info.header.revision} "
        f"({info.left_out} ephemeral left out), {_size(size)}; nothing was written"
    )
    return 0


def run_restore(args: argparse.Namespace, config: Config) -> int:
    async def work() -> int:
        stores: list[SnapshotStore] = []
        try:
            source, described = await _restore_source(config, args, stores)
            # Checked whole before the coordinator is opened, so a damaged file creates nothing.
            header, trailer = await snapshot.verify(source)
            print(
                f"{'dry run: ' if args.dry_run else ''}snapshot {described}: {trailer.keys} keys at revision "
                f"{header.revision} of the {header.backend} coordinator, taken {snapshot.iso_time(header.created)}",
                file=sys.stderr,
            )
            return await _restore_into(config, args, source, (header, trailer))
        finally:
            for store in stores:
                await store.close()

    return _command("restore", work)


async def _restore_source(
    config: Config, args: argparse.Namespace, stores: list[SnapshotStore]
) -> tuple[snapshot.Source, str]:
    if args.from_storage:
        store = storage_snapshots(_open_registry_storage(config), owned=True)
    else:
        target = parse_target(args.source, reading=True)
        if target.kind == "file":
            if args.snapshot:
                raise BackupError("--snapshot picks a snapshot in a directory or under an S3 prefix, not in a file", 2)
            return _file_source(target.path), target.path
        store = open_target(config, target, args)
        if target.name is not None:
            if args.snapshot:
                raise BackupError("name the snapshot once: in the s3:// URL or with --snapshot", EXIT_USAGE)
            args.snapshot = target.name
    stores.append(store)
    stored = await store.find(args.snapshot)
    return store.source(stored), f"{stored.name} in {store.where}"


async def _restore_into(
    config: Config,
    args: argparse.Namespace,
    source: snapshot.Source,
    verified: tuple[snapshot.Header, snapshot.Trailer],
) -> int:
    where = describe_coordinator(config)
    kv = await _open_coordinator(config, readonly=args.dry_run)
    if kv is None:
        # Dry run on an embedded coordinator that does not exist yet: nothing to compare with.
        print(f"dry run: would create {where} and write {verified[1].keys} keys; nothing was written")
        return 0
    try:
        result = await snapshot.restore(
            kv, source, force=args.force, dry_run=args.dry_run, progress=_progress, verified=verified
        )
    finally:
        await kv.close()
    counts = f"{result.written} keys written, {result.deleted} deleted, {result.unchanged} already so"
    if not result.dry_run:
        kv = await _open_coordinator(config, readonly=False)
        assert kv is not None
        storage = open_storage(config, create=False)
        try:
            print(await adopt_identity_after_restore(kv, storage, config), file=sys.stderr)
        except StoreRefused as exc:
            raise BackupError(str(exc), EXIT_REFUSED) from None
        finally:
            await storage.close()
            await kv.close()
    if result.dry_run:
        print(f"dry run: would restore {result.trailer.keys} keys into {where}: {counts}; nothing was written")
        return 0
    resumed = " (finishing an interrupted restore)" if result.resumed else ""
    print(
        f"restored {result.trailer.keys} keys into {where}{resumed}: {counts}, in {result.transactions} "
        f"transactions, {result.seconds:.2f}s; start the registry's nodes again"
    )
    return 0


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        print(f"\rrestoring: {done}/{total} keys", end="\n" if done >= total else "", file=sys.stderr, flush=True)
