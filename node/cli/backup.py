"""`wharf backup` and `wharf restore`: coordinator snapshots written to and read from a directory, S3 or
the registry's own storage (node/backup.py says where snapshots are kept and what the exit codes mean)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from coordinator import snapshot
from coordinator.kv import KV, SnapshotLost

from ..backup import (
    EXIT_FAILED,
    EXIT_REFUSED,
    EXIT_USAGE,
    BackupError,
    SnapshotStore,
    Target,
    file_source,
    open_coordinator,
    open_registry_storage,
    open_target,
    parse_target,
    storage_snapshots,
)
from ..config import Config
from ..storage import layout
from ..store import StoreRefused, adopt_identity_after_restore, describe_coordinator, open_storage
from .output import brief, size
from .registry import Commands, with_config


def add_commands(commands: Commands) -> None:
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
    backup.set_defaults(run=with_config(run_backup))

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
    restore.set_defaults(run=with_config(run_restore))


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
        print(f"wharf {name}: {brief(exc)}", file=sys.stderr)
        return EXIT_FAILED


def run_backup(args: argparse.Namespace, config: Config) -> int:
    async def work() -> int:
        target = parse_target(args.to, reading=False)
        kv = await open_coordinator(config, readonly=True)
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
            f"({info.left_out} ephemeral left out), {size(info.size)} in {info.seconds:.2f}s"
        )
        return 0

    return _command("backup", work)


async def _backup_dry_run(config: Config, kv: KV, target: Target, args: argparse.Namespace) -> int:
    async with snapshot.open_dump(kv) as running:
        written = 0
        async for chunk in running.chunks():
            written += len(chunk)
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
        f"({info.left_out} ephemeral left out), {size(written)}; nothing was written"
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
        store = storage_snapshots(open_registry_storage(config), owned=True)
    else:
        target = parse_target(args.source, reading=True)
        if target.kind == "file":
            if args.snapshot:
                raise BackupError("--snapshot picks a snapshot in a directory or under an S3 prefix, not in a file", 2)
            return file_source(target.path), target.path
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
    kv = await open_coordinator(config, readonly=args.dry_run)
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
        kv = await open_coordinator(config, readonly=False)
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
