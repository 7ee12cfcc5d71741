"""Opening a registry's store: its storage, its coordinator, and the identity that ties the two.

`wharf serve` and every command open a store here, from the same configuration, the same way.

A store identity (a random id) is written into the storage (`wharf/store.json`) and into the
coordinator (`store/identity`) when a store is first used. Whoever opens a store compares the two;
when they disagree (an empty coordinator on a used store, another cluster's etcd prefix, a swapped
bucket) nothing is written or deleted and `StoreRefused` says what was found and what fixes it.
The coordinator record is written first, in a "claiming" state, so that a start interrupted between
the two writes finishes the claim next time instead of refusing its own store.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from coordinator import identity
from coordinator.kv import KV

from .config import Config, embedded_path_in, legacy_embedded_paths
from .storage import layout
from .storage.driver import StorageDriver

log = logging.getLogger("wharf.store")

# serve: may create a new store, adopt a registry:2 one, finish a claim, move a legacy file in.
# write: a command that changes an existing store (gc, rm, retention apply, import by hand).
# read: creates and changes nothing anywhere (dry runs, listings).
# restore: the coordinator is being rebuilt; its identity comes from the snapshot.
Mode = Literal["serve", "write", "read", "restore", "import"]

IDENTITY_FORMAT = 1


class StoreRefused(Exception):
    """Storage and coordinator do not belong together, or there is no store: nothing was changed."""


@dataclass(frozen=True)
class Identity:
    id: str
    created: float

    def storage_json(self) -> bytes:
        return json.dumps({"format": IDENTITY_FORMAT, "id": self.id, "created": self.created}, indent=1).encode()


@dataclass
class Store:
    """An opened store. `identity` is None only for read-only opens of a store not yet identified."""

    kv: KV
    storage: StorageDriver
    identity: Identity | None
    # What the opening found, for the start-up log: "existing", "new", "adopting registry:2 store" ...
    found: str

    async def close(self) -> None:
        await self.storage.close()
        await self.kv.close()


def describe_storage(config: Config) -> str:
    if config.storage.s3 is not None:
        s3 = config.storage.s3
        where = f"s3://{s3.bucket}/{s3.rootdirectory.strip('/')}"
        return where + (f" at {s3.regionendpoint}" if s3.regionendpoint else "")
    assert config.storage.filesystem is not None
    return f"filesystem {config.storage.filesystem.rootdirectory}"


def describe_coordinator(config: Config) -> str:
    if config.coordinator.etcd is not None:
        etcd = config.coordinator.etcd
        return f"etcd {','.join(etcd.endpoints)} prefix {etcd.prefix}"
    assert config.coordinator.embedded is not None
    return f"embedded {config.coordinator.embedded.path}"


async def open_kv(config: Config, *, readonly: bool = False, path: str | None = None) -> KV:
    coordinator = config.coordinator
    if coordinator.etcd is not None:
        from coordinator.etcd import EtcdKV

        etcd = coordinator.etcd
        return await EtcdKV.open(
            etcd.endpoints,
            prefix=etcd.prefix,
            username=etcd.username or None,
            password=etcd.password or None,
            ca=etcd.tls.ca or None,
            cert=etcd.tls.cert or None,
            key=etcd.tls.key or None,
            timeout=etcd.timeout,
        )
    from coordinator.embedded import EmbeddedKV

    assert coordinator.embedded is not None
    return EmbeddedKV(path or coordinator.embedded.path, readonly=readonly)


def open_storage(config: Config, *, create: bool = True) -> StorageDriver:
    if config.storage.s3 is not None:
        from .storage.s3 import S3Driver

        return S3Driver(config.storage.s3)
    from .storage.filesystem import FilesystemDriver

    assert config.storage.filesystem is not None
    fs = config.storage.filesystem
    return FilesystemDriver(fs.rootdirectory, max_threads=fs.maxthreads, create=create)


def embedded_file(config: Config, mode: Mode) -> str | None:
    """The embedded coordinator file to open, moving an earlier Wharf's file in where allowed.

    None when there is no file and this mode may not create one.
    """
    embedded = config.coordinator.embedded
    assert embedded is not None
    path = embedded.path
    filesystem = config.storage.filesystem
    legacy: list[str] = []
    if filesystem is not None and path == embedded_path_in(filesystem.rootdirectory):
        legacy = [p for p in legacy_embedded_paths(filesystem.rootdirectory) if os.path.isfile(p)]
    if os.path.isfile(path):
        for old in legacy:
            log.warning(
                "an earlier Wharf's coordinator file %s is still beside the storage root; %s is the one in use",
                old,
                path,
            )
        return path
    if legacy:
        old = legacy[0]
        if mode == "read":
            return old  # read it where it is: a read-only command moves nothing
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(old + suffix):
                os.replace(old + suffix, path + suffix)
        log.warning(
            "moved the coordinator file %s into the storage root: %s (it belongs with the blobs it describes)",
            old,
            path,
            extra={"fields": {"from": old, "to": path}},
        )
        return path
    return path if mode in ("serve", "restore", "import") else None


async def _storage_identity(storage: StorageDriver, where: str) -> Identity | None:
    try:
        raw = await storage.read_bytes(layout.STORE_IDENTITY)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        return Identity(str(data["id"]), float(data["created"]))
    except (ValueError, KeyError, TypeError):
        raise StoreRefused(
            f"{where}: {layout.STORE_IDENTITY} is not a Wharf store identity; nothing was changed. "
            "Restore the file from a backup of the storage, or move it away if it is not Wharf's."
        ) from None


async def _coordinator_identity(kv: KV) -> tuple[Identity | None, bool]:
    """(identity, still claiming) from the coordinator."""
    record = await identity.read(kv)
    return (None, False) if record is None else (Identity(record.id, record.created), record.claiming)


async def _any(storage: StorageDriver, prefix: str, needle: str = "") -> bool:
    async for key in storage.list(prefix):
        if needle in key:
            return True
    return False


async def holds_registry2_tree(storage: StorageDriver) -> bool:
    """Whether Distribution has written repositories here (manifest links, not only uploads)."""
    return await _any(storage, layout.REPOSITORIES, "/_manifests/")


async def _claim(kv: KV, storage: StorageDriver, *, adopt: bool) -> Identity:
    """Give a store its identity, coordinator first; a concurrent first start agrees on one id."""
    held = await identity.claim(kv, str(uuid.uuid4()), time.time(), adopt=adopt)
    mine = Identity(held.id, held.created)
    await _bind(kv, storage, mine)
    return mine


async def _bind(kv: KV, storage: StorageDriver, found: Identity) -> None:
    """Write the identity into storage (if absent) and mark the coordinator's record bound."""
    current = await _storage_identity(storage, "storage")
    if current is None:
        await storage.write_bytes(layout.STORE_IDENTITY, found.storage_json())
    elif current.id != found.id:
        raise StoreRefused(
            f"the storage was claimed by store {current.id} while this process claimed {found.id}; "
            "nothing more was changed"
        )
    await identity.bind(kv, found.id, found.created)


async def check_identity(kv: KV, storage: StorageDriver, config: Config, mode: Mode) -> tuple[Identity | None, str]:
    """Compare the two identities; claim a new store where `mode` allows. Returns (identity, found)."""
    where_s = describe_storage(config)
    where_c = describe_coordinator(config)
    writes = mode in ("serve", "write", "import")
    ours, claiming = await _coordinator_identity(kv)
    theirs = await _storage_identity(storage, where_s)
    if theirs is not None and ours is None:
        # A concurrent first start writes the coordinator before the storage: look once more.
        ours, claiming = await _coordinator_identity(kv)
    if ours is not None and theirs is not None:
        if ours.id != theirs.id:
            raise StoreRefused(
                f"storage {where_s} belongs to store {theirs.id}, but coordinator {where_c} holds store "
                f"{ours.id}: they are not one registry, so nothing was written or deleted. Point "
                "coordinator.etcd.prefix (or the embedded path) and the storage at the same registry."
            )
        if claiming and writes:
            await _bind(kv, storage, ours)
        return ours, "existing"
    if theirs is not None:
        empty = not await identity.has_records(kv)
        raise _coordinator_lost(theirs, where_s, where_c, "is empty" if empty else "holds an unidentified registry")
    if ours is not None:
        if claiming and writes:
            await _bind(kv, storage, ours)  # an earlier start stopped between the two writes
            return ours, "existing"
        if claiming:
            return ours, "existing (identity not yet written to storage)"
        raise StoreRefused(
            f"coordinator {where_c} holds store {ours.id}, but storage {where_s} has no store identity "
            f"({layout.STORE_IDENTITY}): this is not that registry's storage (another bucket, prefix or "
            "root?), so nothing was written or deleted. Point storage.* at the registry's storage."
        )
    # Neither side knows of a store yet.
    if await identity.has_records(kv):
        # A store from before identities: bind the two as they are.
        if writes:
            return await _claim(kv, storage, adopt=False), "existing (store identity written now)"
        return None, "existing (no store identity yet)"
    if await holds_registry2_tree(storage):
        if mode in ("serve", "import"):
            return await _claim(kv, storage, adopt=True), "registry:2 store, adopting"
        if mode == "read":
            return None, "registry:2 store, not yet adopted"
        raise _not_adopted(where_s)
    if mode == "serve" or mode == "import":
        return await _claim(kv, storage, adopt=False), "new store"
    if mode == "read":
        return None, "empty"
    raise StoreRefused(f"there is no Wharf store at {where_s} (coordinator {where_c} is empty): nothing to do")


def _coordinator_lost(theirs: Identity, where_s: str, where_c: str, what: str) -> StoreRefused:
    return StoreRefused(
        f"storage {where_s} is Wharf store {theirs.id} (created {_when(theirs.created)}), but coordinator "
        f"{where_c} {what}: serving it would lose its tags, so nothing was written or deleted. If the "
        "coordinator was lost, rebuild it with `wharf restore CONFIG --from-storage` (the leader keeps "
        "snapshots in the storage) or from a backup with `wharf restore CONFIG --from DIR`; if the "
        "configuration points at the wrong coordinator, fix coordinator.* and start again."
    )


def _not_adopted(where_s: str) -> StoreRefused:
    return StoreRefused(
        f"storage {where_s} holds a registry:2 store that Wharf has not adopted yet; start `wharf serve` "
        "on it or run `wharf import CONFIG` first. Nothing was changed."
    )


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


async def open_store(config: Config, mode: Mode) -> Store:
    """Open storage and coordinator as `mode` allows and check that they belong together."""
    readonly = mode == "read"
    path = embedded_file(config, mode) if config.coordinator.embedded is not None else None
    storage = open_storage(config, create=mode in ("serve", "import", "restore"))
    if config.coordinator.embedded is not None and mode != "restore" and (path is None or not os.path.isfile(path)):
        # No coordinator file: a store that has an identity lost it; creating one would be a write.
        try:
            theirs = await _storage_identity(storage, describe_storage(config))
            registry2 = theirs is None and await holds_registry2_tree(storage)
        except BaseException:
            await storage.close()
            raise
        if theirs is not None or path is None or readonly:
            await storage.close()
            if theirs is not None:
                raise _coordinator_lost(
                    theirs, describe_storage(config), describe_coordinator(config), "has no file there"
                )
            if registry2:
                raise _not_adopted(describe_storage(config))
            raise StoreRefused(
                f"there is no Wharf store at {describe_storage(config)}: no coordinator file at "
                f"{config.coordinator.embedded.path}. Nothing was created."
            )
    try:
        kv = await open_kv(config, readonly=readonly, path=path)
    except BaseException:
        await storage.close()
        raise
    try:
        if mode == "restore":
            held, found = None, "being restored"
        else:
            held, found = await check_identity(kv, storage, config, mode)
    except BaseException:
        await storage.close()
        await kv.close()
        raise
    return Store(kv, storage, held, found)


async def adopt_identity_after_restore(kv: KV, storage: StorageDriver, config: Config) -> str:
    """Make a restored coordinator carry the storage's identity; raise StoreRefused if it is another's.

    A snapshot from before store identities (or of a store never identified) restores no identity:
    the storage's is written then, so `wharf serve` finds the two agree.
    """
    ours, _ = await _coordinator_identity(kv)
    theirs = await _storage_identity(storage, describe_storage(config))
    if theirs is None:
        if ours is not None:
            await _bind(kv, storage, ours)
            return f"store identity {ours.id} written to the storage too"
        return "no store identity yet: the first `wharf serve` gives it one"
    if ours is None:
        await _bind(kv, storage, theirs)
        return f"the snapshot had no store identity: took the storage's, {theirs.id}"
    if ours.id != theirs.id:
        raise StoreRefused(
            f"the restored snapshot is of store {ours.id}, but storage {describe_storage(config)} is store "
            f"{theirs.id}: nodes will refuse to start on them. Restore a snapshot of this store (--force)."
        )
    return f"store {ours.id}"
