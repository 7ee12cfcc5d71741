"""Whole repositories and namespaces: deleted in one step each, and emptied ones leaving the catalog.

A deletion first puts a fence (`fence/<name>`, on the deleter's lease): every push transaction into
the repository, or into any repository under the namespace, compares that no fence is there, so from
then on pushes are refused (metadata.RepositoryDeleting) and what the deleter lists cannot change.
Each repository then goes in one transaction: its tags, the digest -> tag index, manifests, links,
referrers, last-pulled times and its catalog record, with its quota counters given back; the same
transaction compares the fence and the repository record, so nothing is deleted without the fence and
nothing written since the listing is lost unseen. A push racing it either committed before the fence
(and goes with the repository, whole) or is refused; one that uploaded blobs before and writes its
manifest after finds them gone (MANIFEST_BLOB_UNKNOWN). If the deleter dies, its fence lapses with
its lease, and every repository is either gone whole or untouched.

Release records written before the step tell garbage collection that what the repository held was let
go of now, so the space comes back at the next collection by its usual rules, and marks written after
it let the storage figures count the change (a recount note in the step covers a deleter dying in
between). A repository whose last manifest goes by other means (OCI deletes, retention, collection)
leaves the catalog once the figures show it holds none (`prune_empty`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import keys, pulls, quota
from .kv import KV, Compare, Delete, KeyValue, Op, Put, pages, prefix_end
from .lease import KeptLease
from .metadata import CATALOG_CHANGED, HOLDING_CHANGED, LinkRecord, ManifestRecord, decode, release

Frozen = Callable[[str, str], str | None]
"""(repository, tag) -> the immutability rule that protects the tag, or None."""

_BATCH = 100
_ATTEMPTS = 10


def _nothing_frozen(repository: str, tag: str) -> str | None:
    return None


class Protected(Exception):
    """Immutable tags stand in the way: nothing was deleted."""

    def __init__(self, tags: list[tuple[str, str, str]]) -> None:
        shown = ", ".join(f"{repo}:{tag} ({rule})" for repo, tag, rule in tags[:5])
        more = f" and {len(tags) - 5} more" if len(tags) > 5 else ""
        super().__init__(f"immutable tags would be deleted: {shown}{more}")
        self.tags = tags


class NotPermitted(Exception):
    """The caller may not delete some of the repositories concerned: nothing was deleted."""

    def __init__(self, repos: list[str]) -> None:
        shown = ", ".join(repos[:5]) + (f" and {len(repos) - 5} more" if len(repos) > 5 else "")
        super().__init__(f"not allowed to delete {shown}")
        self.repos = repos


class DeletionRunning(Exception):
    """The fence of this deletion lapsed (or another deleter's finished): it stopped where it was."""


@dataclass
class DeletedRepository:
    name: str
    tags: int = 0
    manifests: int = 0
    links: int = 0
    linked_bytes: int = 0


@dataclass
class _Held:
    """What a repository holds, as listed under the fence."""

    record: KeyValue | None
    tags: int = 0
    manifests: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    linked_bytes: int = 0
    sizes: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.record is None and not self.tags and not self.manifests and not self.links


class RepositoryRemover:
    """Deletes whole repositories and namespaces for one node (`node` names it in the fence)."""

    def __init__(
        self,
        kv: KV,
        *,
        node: str,
        quotas: quota.QuotaScopes | None = None,
        frozen: Frozen = _nothing_frozen,
        ttl: int = 10,
    ) -> None:
        self.kv = kv
        self.node = node
        self.quotas = quotas or quota.QuotaScopes()
        self.frozen = frozen
        self.ttl = max(ttl, 2)

    async def delete_repository(self, repo: str) -> DeletedRepository | None:
        """Delete `repo` whole; None if it holds nothing. Protected if an immutable tag stands in the way."""
        found = await self._delete_under_fence(repo, [repo], None)
        return found[0] if found else None

    async def delete_namespace(
        self, namespace: str, *, allowed: Callable[[str], bool] | None = None
    ) -> list[DeletedRepository]:
        """Delete every repository under `namespace` ('team/'), each whole.

        Before any goes, and with no repository able to appear meanwhile: NotPermitted if `allowed`
        refuses one of them, Protected if an immutable tag is among them.
        """
        namespace = namespace.rstrip("/") + "/"
        return await self._delete_under_fence(namespace, None, allowed)

    async def _delete_under_fence(
        self, name: str, repos: list[str] | None, allowed: Callable[[str], bool] | None
    ) -> list[DeletedRepository]:
        fence = keys.fence(name)
        value = json.dumps({"at": time.time(), "node": self.node}).encode()
        async with KeptLease(self.kv, self.ttl) as lease:
            # Concurrent deletions of one name each wait for the other's fence to go (its lease at worst).
            put = await self.kv.txn([Compare.absent(fence)], [Put(fence, value, lease=lease.id)])
            if not put.succeeded:
                raise DeletionRunning(f"{name} is being deleted by another process")
            guard = Compare.unchanged(fence, put.revision)
            try:
                if repos is None:
                    repos = await repositories_under(self.kv, name)
                refused = [repo for repo in repos if allowed is not None and not allowed(repo)]
                if refused:
                    raise NotPermitted(refused)
                await self._check_frozen(repos)
                deleted: list[DeletedRepository] = []
                for repo in repos:
                    if lease.lost.is_set():
                        raise DeletionRunning(f"the fence of {name} lapsed; deleted {len(deleted)} repositories")
                    one = await self._delete_one(repo, guard)
                    if one is not None:
                        deleted.append(one)
                return deleted
            finally:
                await self.kv.txn([guard], [Delete(fence)])

    async def _check_frozen(self, repos: list[str]) -> None:
        """Protected if any tag of these repositories is immutable (read under the fence: no tag can come)."""
        protected: list[tuple[str, str, str]] = []
        for repo in repos:
            prefix = keys.tags_of(repo)
            async for page in pages(self.kv, prefix):
                for kv in page:
                    tag = kv.key[len(prefix) :]
                    rule = self.frozen(repo, tag)
                    if rule is not None:
                        protected.append((repo, tag, rule))
        if protected:
            raise Protected(protected)

    async def _delete_one(self, repo: str, fence: Compare) -> DeletedRepository | None:
        for _ in range(_ATTEMPTS):
            held = await self._list(repo)
            if held.empty:
                return None
            freed = quota.freed_by(((repo, size) for size in held.sizes), self.quotas)
            counters, given_back = await quota.release(self.kv, freed)
            guards = [fence, Compare.unchanged(keys.repository(repo), held.record.mod_revision if held.record else 0)]
            ops: list[Op] = [
                Delete(keys.tags_of(repo), prefix=True),
                Delete(keys.tagged_in(repo), prefix=True),
                Delete(keys.manifests_of(repo), prefix=True),
                Delete(keys.links_of(repo), prefix=True),
                Delete(keys.referrers_in(repo), prefix=True),
                Delete(keys.pending_manifests_of(repo), prefix=True),
                *pulls.forget(repo),
                Delete(keys.repository(repo)),
                Delete(keys.tag_version(repo)),
                CATALOG_CHANGED,
                Put(keys.usage_recount(repo), json.dumps({"at": time.time()}).encode()),
                *given_back,
            ]
            result = await self.kv.txn([*guards, *counters], ops, [])
            if result.succeeded:
                break
            if (await self.kv.get(fence.key)) is None:
                raise DeletionRunning(f"the fence of {repo} lapsed before it was deleted")
            # The repository record moved (a node that knows no fences wrote) or a quota counter did: again.
        else:
            raise DeletionRunning(f"{repo} kept changing while it was being deleted")
        held_digests = list(dict.fromkeys([*held.manifests, *held.links]))
        for start in range(0, len(held_digests), _BATCH):
            await self.kv.txn([], [HOLDING_CHANGED(repo, d) for d in held_digests[start : start + _BATCH]])
        await self.kv.delete(keys.usage_recount(repo))
        return DeletedRepository(repo, held.tags, len(held.manifests), len(held.links), held.linked_bytes)

    async def _list(self, repo: str) -> _Held:
        """What `repo` holds, writing a release for each manifest and link as it goes (see the module)."""
        held = _Held(await self.kv.get(keys.repository(repo)), await self.kv.count(keys.tags_of(repo)))
        prefix = keys.manifests_of(repo)
        async for page in pages(self.kv, prefix):
            notes = []
            for kv in page:
                record = decode(ManifestRecord, kv.value)
                held.manifests.append(record.digest)
                notes.append(release(repo, record.digest, blobs=record.blobs, manifests=record.manifests))
            await self._write(notes)
        manifests = set(held.manifests)
        prefix = keys.links_of(repo)
        async for page in pages(self.kv, prefix):
            notes = []
            for kv in page:
                digest = kv.key[len(prefix) :]
                size = decode(LinkRecord, kv.value).size
                held.links.append(digest)
                held.sizes.append(size)
                held.linked_bytes += size
                if digest not in manifests:
                    notes.append(release(repo, digest))
            await self._write(notes)
        return held

    async def _write(self, ops: list[Put]) -> None:
        for start in range(0, len(ops), _BATCH):
            await self.kv.txn([], ops[start : start + _BATCH])


async def repositories_under(kv: KV, namespace: str) -> list[str]:
    """Every repository under `namespace`: those in the catalog, and any that left it still linking blobs."""
    found: set[str] = set()
    async for page in pages(kv, keys.REPOSITORIES + namespace):
        found.update(item.key[len(keys.REPOSITORIES) :] for item in page)
    start: str | None = None
    while True:
        # One read per repository, not per link: skip past each repository's links.
        item = await kv.range(keys.LINKS + namespace, start=start, limit=1)
        if not item:
            break
        repo, _ = keys.split_repo_key(item[0].key, keys.LINKS)
        found.add(repo)
        start = prefix_end(keys.links_of(repo))
    return sorted(found)


async def prune_empty(kv: KV, repos: list[str]) -> list[str]:
    """Take repositories that hold no tag or manifest out of the catalog; returns those taken out.

    Every write that adds to a repository rewrites its record, so a record unchanged since the checks
    proves nothing arrived meanwhile. Links such a repository still has are collected as usual.
    """
    pruned = []
    for repo in repos:
        found = await kv.get(keys.repository(repo))
        if found is None:
            continue
        if await kv.range(keys.tags_of(repo), limit=1) or await kv.range(keys.manifests_of(repo), limit=1):
            continue
        ops: list[Op] = [Delete(found.key), Delete(keys.tag_version(repo)), CATALOG_CHANGED]
        if (await kv.txn([Compare.unchanged(found.key, found.mod_revision)], ops)).succeeded:
            pruned.append(repo)
    return pruned
