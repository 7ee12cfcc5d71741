"""Storage per repository and namespace, kept incrementally: linked, exclusive and shared bytes.

What a repository holds is its blob links and its manifests (a manifest's bytes are an object in
storage too). Every transaction that adds or removes one also writes a mark (metadata.HOLDING_CHANGED:
a blind put, so pushes never contend on it). A settler (the leader, every couple of seconds, and
`wharf du`) reads the marks, looks at the records they name, and in one transaction per batch keeps:

- an object record per object (`usage/object/<digest>`): for an object one repository holds (most of
  them: an image's layers, config and manifest), that repository's name and holding, and nothing else;
  for one held more widely, a summary (its size, how many repositories hold it, and how many under
  each namespace) and a holder record per repository (`usage/holder/<digest>/<repository>`);
- a counter per repository, per namespace (a name ending in '/') and for the registry.

Every change to an object's holdings rewrites its object record, which each update compares: that is
what lets settlers run at once. The records are compact (coordinator/encoding.py); the JSON of earlier
versions still reads, and a record is rewritten compactly (an object's holder records folded into its
object record once one repository is left) only when its figures change.

From an object's summary alone the settler knows, for any scope, whether the object is held there
only (exclusive: deleting the scope frees it), there and elsewhere (shared), or not at all, so a
change rewrites just the counters whose figures move: the cost is per change, never per registry.
Counters are always exactly what the holder records add up to (each update compares the summaries
and counters it read); holder records follow the links and manifests, as a change after a settler
read them leaves a new mark. `reconcile` compares both sides whole, once for a store counted before
marks existed (and on demand: `wharf du --recount`).

Byte figures of a scope: `linked` counts an object once per repository holding it (what quotas
count), `unique` once (`exclusive` + `shared`). The registry's total is its deduplicated bytes.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields

from . import encoding, keys
from .kv import KV, Compare, Delete, Get, KeyValue, Op, Put, pages
from .metadata import HOLDING_CHANGED, LinkRecord, ManifestRecord, decode

TOTAL = ""
"""The scope name of the registry as a whole."""

# Marks read per round, repositories of one object planned together, and room in one transaction.
_PAGE = 200
_CHUNK = 10
_TXN_BUDGET = 110
_READS = 99


def namespaces_of(repo: str) -> list[str]:
    """The namespaces around a repository, outermost first: team/sub/app -> team/, team/sub/."""
    parts = repo.split("/")[:-1]
    return ["/".join(parts[: i + 1]) + "/" for i in range(len(parts))]


@dataclass(frozen=True)
class Holding:
    """What one repository holds of one object, as last counted."""

    size: int
    link: bool = False
    manifest: bool = False

    def encode(self, repository: str | None = None) -> bytes:
        """A holder record's value; with `repository`, the object record of an object only it holds."""
        return encoding.pack_holding(self.size, self.link, self.manifest, repository)

    @classmethod
    def decode(cls, raw: bytes) -> Holding:
        fields = encoding.unpack_holding(raw)
        return cls(int(fields["size"]), bool(fields.get("link", False)), bool(fields.get("manifest", False)))


@dataclass
class ScopeUsage:
    """The figures of one repository, namespace or the registry."""

    linked: int = 0
    unique: int = 0
    exclusive: int = 0
    objects: int = 0
    exclusive_objects: int = 0
    manifests: int = 0

    @property
    def shared(self) -> int:
        return self.unique - self.exclusive

    @property
    def shared_objects(self) -> int:
        return self.objects - self.exclusive_objects

    def plus(self, other: ScopeUsage, sign: int = 1) -> ScopeUsage:
        return ScopeUsage(*(getattr(self, f.name) + sign * getattr(other, f.name) for f in fields(self)))

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self))

    def report(self) -> dict[str, int]:
        return {**asdict(self), "shared": self.shared, "shared_objects": self.shared_objects}

    def encode(self) -> bytes:
        figures = asdict(self)
        if min(figures.values()) < 0:
            return _as_json(figures)  # never so when counted right; kept readable rather than refused
        return encoding.pack_scope_usage(figures)

    @classmethod
    def decode(cls, raw: bytes) -> ScopeUsage:
        found = encoding.unpack_scope_usage(raw)
        return cls(**{f.name: int(found.get(f.name, 0)) for f in fields(cls)})


@dataclass
class _Object:
    """An object's summary: its size, how many repositories hold it (and manifests), per namespace too."""

    size: int = 0
    repositories: int = 0
    manifests: int = 0
    namespaces: dict[str, list[int]] = field(default_factory=dict)  # namespace -> [holders, manifests]

    def copy(self) -> _Object:
        return _Object(self.size, self.repositories, self.manifests, {k: list(v) for k, v in self.namespaces.items()})

    def apply(self, repo: str, before: Holding | None, after: Holding | None) -> None:
        if after is not None:
            self.size = after.size
        held = int(after is not None) - int(before is not None)
        manifests = int(after is not None and after.manifest) - int(before is not None and before.manifest)
        self.repositories += held
        self.manifests += manifests
        for namespace in namespaces_of(repo):
            counts = self.namespaces.setdefault(namespace, [0, 0])
            counts[0] += held
            counts[1] += manifests
            if counts == [0, 0]:
                del self.namespaces[namespace]

    def share(self, scope: str, holding: Holding | None) -> ScopeUsage:
        """What this object adds to `scope`'s figures (`holding`: the repository's, for a repository)."""
        size = self.size
        if scope == TOTAL:
            if not self.repositories:
                return ScopeUsage()
            return ScopeUsage(size * self.repositories, size, size, 1, 1, self.manifests)
        if scope.endswith("/"):
            held, manifests = self.namespaces.get(scope, (0, 0))
            only = held == self.repositories
        elif holding is not None:
            held, manifests, only = 1, int(holding.manifest), self.repositories == 1
        else:
            held = 0
        if not held:
            return ScopeUsage()
        return ScopeUsage(size * held, size, size if only else 0, 1, int(only), manifests)

    def encode(self) -> bytes:
        counts = [self.size, self.repositories, self.manifests, *(n for pair in self.namespaces.values() for n in pair)]
        if min(counts) < 0:
            return _as_json(asdict(self))  # as ScopeUsage.encode
        return encoding.pack_usage_summary(self.size, self.repositories, self.manifests, self.namespaces)

    @classmethod
    def decode(cls, raw: bytes) -> _Object:
        found = encoding.unpack_usage_summary(raw)
        namespaces = {name: [int(held), int(manifests)] for name, (held, manifests) in found["namespaces"].items()}
        return cls(int(found["size"]), int(found["repositories"]), int(found["manifests"]), namespaces)


Sole = tuple[str, Holding]
"""The one repository holding an object, and what it holds."""


def _as_json(fields: dict[str, object]) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


def _read_object(raw: bytes) -> tuple[_Object, Sole | None]:
    """An object record: its summary, and (when the record names it) the one repository holding it.

    An object record that names its repository has no holder records beside it.
    """
    if not encoding.is_sole_holding(raw):
        return _Object.decode(raw), None
    found = encoding.unpack_holding(raw)
    repo, holding = str(found["repository"]), Holding.decode(raw)
    summary = _Object()
    summary.apply(repo, None, holding)
    return summary, (repo, holding)


def _held(link: KeyValue | None, manifest: KeyValue | None) -> Holding | None:
    """What a repository holds of an object, from its link and manifest records."""
    if link is None and manifest is None:
        return None
    size = decode(LinkRecord, link.value).size if link is not None else decode(ManifestRecord, manifest.value).size  # type: ignore[union-attr]
    return Holding(size, link is not None, manifest is not None)


@dataclass
class _Plan:
    """One object's change, ready to commit: guards and writes, and what it moves per scope."""

    compares: list[Compare] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    deltas: dict[str, ScopeUsage] = field(default_factory=dict)
    # Repositories found holding none of the object now: left without manifests, they leave the catalog.
    lacking: set[str] = field(default_factory=set)


@dataclass
class _Batch:
    """Plans to commit in one transaction, each with its object and marks, and what they add up to
    (each counter a plan moves is one more write and compare), kept as plans are added: whether the
    next fits costs the same however many there are."""

    items: list[tuple[_Plan, str, list[KeyValue]]] = field(default_factory=list)
    scopes: set[str] = field(default_factory=set)
    ops: int = 0
    compares: int = 0

    def fits(self, plan: _Plan) -> bool:
        """Whether the batch with `plan` added (and the counters they move) fits one transaction."""
        scopes = len(self.scopes) + sum(1 for scope in plan.deltas if scope not in self.scopes)
        return (
            self.ops + len(plan.ops) + scopes <= _TXN_BUDGET
            and self.compares + len(plan.compares) + scopes <= _TXN_BUDGET
        )

    def add(self, plan: _Plan, digest: str, marks: list[KeyValue]) -> None:
        self.items.append((plan, digest, marks))
        self.scopes.update(plan.deltas)
        self.ops += len(plan.ops)
        self.compares += len(plan.compares)


@dataclass
class Settled:
    """What one settling did: marks counted, and repositories that now hold no manifest."""

    marks: int = 0
    emptied: list[str] = field(default_factory=list)


class Usage:
    """The storage figures: read them, settle the marks into them, check them against the records."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv

    # -- reading ----------------------------------------------------------------------------

    async def scope(self, name: str) -> ScopeUsage:
        """The figures of a repository, a namespace (ending in '/') or the registry (TOTAL)."""
        found = await self.kv.get(keys.usage_scope(name))
        return ScopeUsage.decode(found.value) if found is not None else ScopeUsage()

    async def scopes(self, names: Sequence[str]) -> dict[str, ScopeUsage]:
        """Several scopes' figures, in few requests."""
        found: dict[str, ScopeUsage] = {}
        for start in range(0, len(names), _READS):
            batch = list(names[start : start + _READS])
            result = await self.kv.txn([], [Get(keys.usage_scope(n)) for n in batch])
            for name, kv in zip(batch, result.gets, strict=True):
                found[name] = ScopeUsage.decode(kv.value) if kv is not None else ScopeUsage()
        return found

    async def under(self, namespace: str = "") -> AsyncIterator[tuple[str, ScopeUsage]]:
        """Every counted repository and namespace under `namespace` (all with ''), in name order."""
        prefix = keys.USAGE_SCOPES + namespace
        async for page in pages(self.kv, prefix):
            for kv in page:
                yield kv.key[len(keys.USAGE_SCOPES) :], ScopeUsage.decode(kv.value)

    async def current(self) -> bool:
        """Whether every change is counted: the store was counted whole and no mark waits."""
        result = await self.kv.txn([], [Get(keys.USAGE_BUILT)])
        return result.gets[0] is not None and not await self.kv.range(keys.USAGE_MARKS, limit=1)

    async def built(self) -> bool:
        return await self.kv.get(keys.USAGE_BUILT) is not None

    async def holders(self, digest: str) -> dict[str, Holding]:
        """The repositories counted as holding `digest`."""
        record = await self.kv.get(keys.usage_object(digest))
        sole = _read_object(record.value)[1] if record is not None else None
        if sole is not None:
            return {sole[0]: sole[1]}
        prefix = keys.usage_holders_of(digest)
        found: dict[str, Holding] = {}
        async for page in pages(self.kv, prefix):
            for kv in page:
                found[kv.key[len(prefix) :]] = Holding.decode(kv.value)
        return found

    # -- settling the marks -----------------------------------------------------------------

    async def settle(self, *, limit: int = 100_000) -> Settled:
        """Count waiting marks (up to about `limit`); safe to run anywhere, any number at once."""
        settled = Settled()
        while settled.marks < limit:
            page = await self.kv.range(keys.USAGE_MARKS, limit=_PAGE)
            if not page:
                break
            before = settled.marks
            await self._settle_page(page, settled)
            if settled.marks == before:
                break  # others are counting the same marks: leave them to it
        return settled

    async def _settle_page(self, page: list[KeyValue], settled: Settled) -> None:
        by_object: dict[str, list[KeyValue]] = {}
        for mark in page:
            digest, _ = keys.split_usage_key(mark.key, keys.USAGE_MARKS)
            by_object.setdefault(digest, []).append(mark)
        batch = _Batch()
        for digest, found in by_object.items():
            every = [m for m in found if keys.split_usage_key(m.key, keys.USAGE_MARKS)[1] == keys.EVERY_HOLDER]
            if every:
                if await self._settle_every_holder(digest, every[0], settled):
                    settled.marks += 1
                found = [m for m in found if m not in every]
            for start in range(0, len(found), _CHUNK):
                chunk = found[start : start + _CHUNK]
                if batch.items and batch.items[-1][1] == digest:
                    # The object's previous chunk first: this one is planned from what that one leaves.
                    await self._commit_batch(batch, settled)
                    batch = _Batch()
                plan = await self._plan(digest, chunk)
                if batch.items and not batch.fits(plan):
                    await self._commit_batch(batch, settled)
                    batch = _Batch()
                batch.add(plan, digest, chunk)
        if batch.items:
            await self._commit_batch(batch, settled)

    async def _commit_batch(self, batch: _Batch, settled: Settled) -> None:
        """Commit plans together; if something moved under them, plan and commit each one again alone,
        so one mark rewritten all the time holds up no other."""
        if await self._commit([plan for plan, _, _ in batch.items], settled):
            settled.marks += sum(len(marks) for _, _, marks in batch.items)
            return
        if len(batch.items) == 1:
            return
        for _, digest, marks in batch.items:
            if await self._commit([await self._plan(digest, marks)], settled):
                settled.marks += len(marks)

    async def _settle_every_holder(self, digest: str, mark: KeyValue, settled: Settled) -> bool:
        """Check every repository counted as holding `digest` (its blob went with all its links)."""
        after = ""
        while True:
            record = await self.kv.get(keys.usage_object(digest))
            sole = _read_object(record.value)[1] if record is not None else None
            if record is not None and sole is not None:
                # One repository holds it (perhaps only since the last round): the record names it.
                plan = await self._plan(digest, [mark], [sole[0]])
                plan.compares.append(Compare.unchanged(record.key, record.mod_revision))
                return await self._commit([plan], settled)
            start = keys.after(keys.usage_holder(digest, after)) if after else None
            found = await self.kv.range(keys.usage_holders_of(digest), start=start, limit=_CHUNK)
            repos = [keys.split_usage_key(kv.key, keys.USAGE_HOLDERS)[1] for kv in found]
            last = len(found) < _CHUNK
            plan = await self._plan(digest, [mark] if last else [], repos)
            if not await self._commit([plan], settled):
                return False
            if last:
                return True
            after = repos[-1]

    async def _plan(self, digest: str, marks: Sequence[KeyValue], repos: Sequence[str] | None = None) -> _Plan:
        """What counting holdings of `digest` changes (the marked repositories', or `repos`), from one read."""
        if repos is None:
            repos = [keys.split_usage_key(m.key, keys.USAGE_MARKS)[1] for m in marks]
        reads: list[Op] = [Get(keys.usage_object(digest))]
        for repo in repos:
            reads += [
                Get(keys.usage_holder(digest, repo)),
                Get(keys.link(repo, digest)),
                Get(keys.manifest(repo, digest)),
            ]
        gets = (await self.kv.txn([], reads)).gets
        summary = gets[0]
        before, sole = _read_object(summary.value) if summary is not None else (_Object(), None)
        after = before.copy()
        changes: dict[str, tuple[Holding | None, Holding | None]] = {}
        lacking: set[str] = set()
        for i, repo in enumerate(repos):
            holder, link, manifest = gets[1 + 3 * i : 4 + 3 * i]
            if sole is not None:
                was = sole[1] if sole[0] == repo else None
            else:
                was = Holding.decode(holder.value) if holder is not None else None
            now = _held(link, manifest)
            if now is None:
                lacking.add(repo)
            if was != now and repo not in changes:
                changes[repo] = (was, now)
                after.apply(repo, was, now)
        plan = _Plan(lacking=lacking)
        plan.compares.append(Compare.unchanged(keys.usage_object(digest), summary.mod_revision if summary else 0))
        plan.compares += [Compare.unchanged(m.key, m.mod_revision) for m in marks]
        plan.ops += [Delete(m.key) for m in marks]
        if not changes:
            return plan
        sole_before, sole_after = await self._sole_holders(digest, before, after, changes, sole)
        plan.deltas = _deltas(before, after, changes, sole_before, sole_after[0] if sole_after else None)
        plan.ops += _writes(digest, after, changes, sole, sole_after)
        return plan

    async def _sole_holders(
        self,
        digest: str,
        before: _Object,
        after: _Object,
        changes: dict[str, tuple[Holding | None, Holding | None]],
        sole: Sole | None,
    ) -> tuple[str | None, Sole | None]:
        """The one repository holding `digest` before the changes, and the one (with its holding) after
        them, where only one does. `sole`: the one the object record names."""
        sole_before = next((r for r, (was, _) in changes.items() if was is not None), None)
        sole_after = next(((r, now) for r, (_, now) in changes.items() if now is not None), None)
        if sole is not None:
            # The record names the one repository that held it: nothing to read.
            sole_before = sole_before or sole[0]
            if sole_after is None and sole[0] not in changes:
                sole_after = sole
        elif (before.repositories == 1 and sole_before is None) or (after.repositories == 1 and sole_after is None):
            # Holder records change only with the object record, which the commit compares: this read is current.
            found = await self.kv.range(keys.usage_holders_of(digest), limit=len(changes) + 2)
            holding = [(keys.split_usage_key(kv.key, keys.USAGE_HOLDERS)[1], Holding.decode(kv.value)) for kv in found]
            if before.repositories == 1 and sole_before is None:
                sole_before = next((repo for repo, _ in holding), None)
            if after.repositories == 1 and sole_after is None:
                sole_after = next(((repo, held) for repo, held in holding if repo not in changes), None)
        return (sole_before if before.repositories == 1 else None), (sole_after if after.repositories == 1 else None)

    async def _commit(self, plans: Sequence[_Plan], settled: Settled) -> bool:
        """Write plans and the counters they move in one transaction (False: something moved; retry later)."""
        deltas: dict[str, ScopeUsage] = {}
        for plan in plans:
            for scope, delta in plan.deltas.items():
                deltas[scope] = deltas.get(scope, ScopeUsage()).plus(delta)
        scopes = sorted(scope for scope, delta in deltas.items() if delta)
        lacking_any = {repo for plan in plans for repo in plan.lacking}
        lacking = sorted(lacking_any - set(scopes))
        compares = [c for plan in plans for c in plan.compares]
        ops = [op for plan in plans for op in plan.ops]
        emptied = []
        if scopes or lacking:
            result = await self.kv.txn([], [Get(keys.usage_scope(scope)) for scope in [*scopes, *lacking]])
            for scope, found in zip([*scopes, *lacking], result.gets, strict=True):
                old = ScopeUsage.decode(found.value) if found is not None else ScopeUsage()
                new = old.plus(deltas[scope]) if scope in deltas else old
                key = keys.usage_scope(scope)
                compares.append(Compare.unchanged(key, found.mod_revision if found is not None else 0))
                if scope in deltas:
                    ops.append(Put(key, new.encode()) if new else Delete(key))
                is_repository = bool(scope) and not scope.endswith("/")
                if is_repository and not new.manifests and (scope in lacking_any or old.manifests):
                    emptied.append(scope)
        if not (await self.kv.txn(compares, ops)).succeeded:
            return False
        settled.emptied += emptied
        return True

    # -- checking the counted holdings against the records ------------------------------------

    async def reconcile(self) -> int:
        """Mark every holding whose counted state differs from the links and manifests; returns how many.

        Reads every link, manifest and holder record once, a page at a time.
        """
        marked = 0
        for prefix in (keys.LINKS, keys.MANIFESTS):
            async for page in pages(self.kv, prefix):
                held = [keys.split_repo_key(kv.key, prefix) for kv in page]
                reads: list[Op] = []
                for repo, digest in held:
                    reads += [Get(keys.usage_holder(digest, repo)), Get(keys.usage_object(digest))]
                found = await self._get_many_ops(reads)
                uncounted = []
                for i, (repo, digest) in enumerate(held):
                    holder, record = found[2 * i], found[2 * i + 1]
                    sole = _read_object(record.value)[1] if record is not None else None
                    if holder is None and (sole is None or sole[0] != repo):
                        uncounted.append((repo, digest))
                marked += await self._mark(uncounted)
        async for page in pages(self.kv, keys.USAGE_HOLDERS):
            counted = [(*keys.split_usage_key(kv.key, keys.USAGE_HOLDERS), Holding.decode(kv.value)) for kv in page]
            marked += await self._mark(await self._stale(counted))
        async for page in pages(self.kv, keys.USAGE_OBJECTS):
            sole_holders = []
            for kv in page:
                sole = _read_object(kv.value)[1]
                if sole is not None:
                    sole_holders.append((kv.key[len(keys.USAGE_OBJECTS) :], *sole))
            marked += await self._mark(await self._stale(sole_holders))
        return marked

    async def _stale(self, counted: Sequence[tuple[str, str, Holding]]) -> list[tuple[str, str]]:
        """(repository, digest) of the counted holdings (digest, repository, holding) the records contradict."""
        records: list[Op] = []
        for digest, repo, _ in counted:
            records += [Get(keys.link(repo, digest)), Get(keys.manifest(repo, digest))]
        found = await self._get_many_ops(records)
        return [
            (repo, digest)
            for i, (digest, repo, holding) in enumerate(counted)
            if holding != _held(found[2 * i], found[2 * i + 1])
        ]

    async def build(self) -> int:
        """Count a store whose holdings were never counted (from before the figures): marks everything once."""
        if await self.built():
            return 0
        marked = await self.reconcile()
        await self.kv.put(keys.USAGE_BUILT, json.dumps({"at": time.time(), "marked": marked}).encode())
        return marked

    async def recount_noted(self, *, older_than: float = 60.0) -> int:
        """Reconcile if a whole-repository delete died before marking what it removed (its note stayed)."""
        cutoff = time.time() - older_than
        notes = [kv for kv in await self.kv.range(keys.USAGE_RECOUNTS, limit=_PAGE) if _noted_at(kv) < cutoff]
        if not notes:
            return 0
        marked = await self.reconcile()
        for note in notes:
            await self.kv.txn([Compare.unchanged(note.key, note.mod_revision)], [Delete(note.key)])
        return marked

    async def top(self, n: int) -> Top:
        """The `n` largest repositories (by linked bytes) and top-level namespaces, the rest summed."""
        top = Top(total=await self.scope(TOTAL))
        repositories: list[tuple[int, str, ScopeUsage]] = []
        namespaces: list[tuple[int, str, ScopeUsage]] = []
        async for name, figures in self.under():
            if name.endswith("/"):
                if name.count("/") == 1:
                    namespaces.append((figures.linked, name, figures))
            else:
                repositories.append((figures.linked, name, figures))
        for found, largest, rest in (
            (repositories, top.repositories, "repositories_rest"),
            (namespaces, top.namespaces, "namespaces_rest"),
        ):
            found.sort(key=lambda item: (-item[0], item[1]))
            largest += [(name, figures) for _, name, figures in found[:n]]
            remainder = ScopeUsage()
            for _, _, figures in found[n:]:
                remainder = remainder.plus(figures)
            setattr(top, rest, remainder)
        return top

    async def _get_many_ops(self, reads: Sequence[Op]) -> list[KeyValue | None]:
        found: list[KeyValue | None] = []
        for start in range(0, len(reads), _READS):
            found += (await self.kv.txn([], list(reads[start : start + _READS]))).gets
        return found

    async def _mark(self, held: Iterable[tuple[str, str]]) -> int:
        marks = [HOLDING_CHANGED(repo, digest) for repo, digest in held]
        for start in range(0, len(marks), _READS):
            await self.kv.txn([], marks[start : start + _READS])
        return len(marks)


def _noted_at(kv: KeyValue) -> float:
    try:
        return float(json.loads(kv.value)["at"])
    except (ValueError, KeyError, TypeError):
        return 0.0


@dataclass
class Top:
    """The largest scopes by linked bytes, what the rest add up to, and the registry's total."""

    total: ScopeUsage
    repositories: list[tuple[str, ScopeUsage]] = field(default_factory=list)
    repositories_rest: ScopeUsage = field(default_factory=ScopeUsage)
    namespaces: list[tuple[str, ScopeUsage]] = field(default_factory=list)
    namespaces_rest: ScopeUsage = field(default_factory=ScopeUsage)


def _deltas(
    before: _Object,
    after: _Object,
    changes: dict[str, tuple[Holding | None, Holding | None]],
    sole_before: str | None,
    sole_after: str | None,
) -> dict[str, ScopeUsage]:
    """How an object's changes move each scope's figures: every scope its status may change in."""
    scopes = {TOTAL, *changes, *before.namespaces, *after.namespaces}
    for repo in changes:
        scopes.update(namespaces_of(repo))
    # A repository that holds the object throughout changes only in what is exclusive to it.
    unchanged = Holding(after.size or before.size)
    for sole in (sole_before, sole_after):
        if sole is not None:
            scopes.add(sole)
    deltas: dict[str, ScopeUsage] = {}
    for scope in scopes:
        if scope in changes:
            was, now = changes[scope]
        elif scope.endswith("/") or scope == TOTAL:
            was = now = None
        else:
            was = now = unchanged
        delta = after.share(scope, now).plus(before.share(scope, was), -1)
        if delta:
            deltas[scope] = delta
    return deltas


def _writes(
    digest: str,
    after: _Object,
    changes: dict[str, tuple[Holding | None, Holding | None]],
    sole: Sole | None,
    sole_after: Sole | None,
) -> list[Op]:
    """The writes that leave `digest`'s records as counted after `changes` (`sole`: the repository the
    object record named before them; `sole_after`: the one left holding it, where only one is).

    Held by one repository: its object record names it, and no holder record is kept. Held by more:
    a summary and a holder record for each (the one the object record named gets its own).
    """
    object_key = keys.usage_object(digest)
    # Holder records there now: every counted holding's, unless the object record named the only one.
    listed = set() if sole is not None else {repo for repo, (was, _) in changes.items() if was is not None}
    ops: list[Op] = []
    if after.repositories == 1 and sole_after is not None:
        if sole is None and sole_after[0] not in changes:
            listed.add(sole_after[0])  # it held the object throughout: its holder record goes too
        ops += [Delete(keys.usage_holder(digest, repo)) for repo in sorted(listed)]
        ops.append(Put(object_key, sole_after[1].encode(sole_after[0])))
        return ops
    for repo, (_, now) in changes.items():
        key = keys.usage_holder(digest, repo)
        if now is not None:
            ops.append(Put(key, now.encode()))
        elif repo in listed:
            ops.append(Delete(key))
    if not after.repositories:
        ops.append(Delete(object_key))
        return ops
    if sole is not None and sole[0] not in changes:
        ops.append(Put(keys.usage_holder(digest, sole[0]), sole[1].encode()))
    ops.append(Put(object_key, after.encode()))
    return ops
