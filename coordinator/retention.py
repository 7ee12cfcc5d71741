"""Retention's plan: which tags and untagged manifests the policies delete (retention_apply.py applies it).

Planning reads the KV once and decides, per repository, under the first rule that covers it:
- A tag is kept if it is immutable, matches `keep_tags` (whole tag), is among the `keep_last` most
  recently pushed, was pushed within `older_than`, or its manifest was pulled within `pulled_within`
  (as far as nodes have written their last-pulled times). A rule that sets none of these keeps every tag.
- Signature and attestation tags (cosign's `sha256-<hex>.sig`, `.att`, `.sbom`) follow their subject
  unless immutable or matching `keep_tags`, and take no place among the most recently pushed: they
  go iff, once the plan's tags are gone, no remaining tag reaches the subject (in this repository,
  or in another one when the subject is not stored here).
- With `untagged_after`, manifests no remaining tag reaches and pushed longer ago than that go too;
  children of a staying index and referrers of a staying manifest always stay.
"""

from __future__ import annotations

import datetime
import heapq
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field

from . import keys
from .kv import KV, KeyValue, pages
from .metadata import ManifestRecord, TagRecord, decode, reachable
from .pulls import Pulls
from .spool import Spool

_COSIGN_TAG = re.compile(r"sha256-(?P<hex>[0-9a-f]{64})\.(?:sig|att|sbom)")

Frozen = Callable[[str, str], str | None]
"""(repository, tag) -> the name of the immutability rule that protects the tag, or None."""


def _nothing_frozen(repository: str, tag: str) -> str | None:
    return None


@dataclass(frozen=True)
class Rule:
    """One retention policy, already parsed; `covers` says which repositories it applies to."""

    name: str
    covers: Callable[[str], bool]
    keep_last: int | None = None
    keep_tags: tuple[re.Pattern[str], ...] = ()
    older_than: float | None = None  # seconds
    untagged_after: float | None = None  # seconds
    pulled_within: float | None = None  # seconds

    @property
    def prunes_tags(self) -> bool:
        return (
            self.keep_last is not None
            or bool(self.keep_tags)
            or self.older_than is not None
            or self.pulled_within is not None
        )


@dataclass(frozen=True)
class TagDeletion:
    repository: str
    tag: str
    digest: str
    mod_revision: int
    reason: str
    pushed: float

    def row(self) -> dict[str, str]:
        return _row(self.repository, self.tag, self.digest, "delete tag", self.reason, self.pushed)


@dataclass(frozen=True)
class ManifestDeletion:
    repository: str
    digest: str
    mod_revision: int
    reason: str
    pushed: float
    subject: str | None = None

    def row(self) -> dict[str, str]:
        return _row(self.repository, self.digest, self.digest, "delete manifest", self.reason, self.pushed)


@dataclass(frozen=True)
class KeptTag:
    repository: str
    tag: str
    digest: str
    reason: str


@dataclass
class Plan:
    """What the policies delete, in the order to apply: repository by repository, each one's tags,
    then its manifests parents-first. The lists are Spools: a plan over a large backlog costs disk,
    not memory."""

    now: float
    revision: int  # the KV revision planning began at
    tags: Spool[TagDeletion] = field(default_factory=lambda: Spool(TagDeletion))
    manifests: Spool[ManifestDeletion] = field(default_factory=lambda: Spool(ManifestDeletion))
    kept: Spool[KeptTag] = field(
        default_factory=lambda: Spool(KeptTag)
    )  # tags of covered repositories that stay, and why

    @classmethod
    async def start(cls, kv: KV, now: float | None = None) -> Plan:
        """An empty plan at the KV's current revision (`now` defaults to the clock)."""
        return cls(now=time.time() if now is None else now, revision=(await kv.txn([], [])).revision)

    def add(self, decision: Decision) -> None:
        self.tags.extend(decision.tags)
        self.kept.extend(decision.kept)
        self.manifests.extend(decision.manifests)

    def each_row(self) -> Iterator[dict[str, str]]:
        for t in self.tags:
            yield t.row()
        for m in self.manifests:
            yield m.row()

    def rows(self) -> list[dict[str, str]]:
        """Every row (each_row for a plan that may be large)."""
        return list(self.each_row())


def _pushed(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _row(repository: str, reference: str, digest: str, action: str, reason: str, pushed: float) -> dict[str, str]:
    return {
        "repository": repository,
        "reference": reference,
        "digest": digest,
        "action": action,
        "reason": reason,
        "pushed": _pushed(pushed),
    }


# -- planning ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tag:
    name: str
    digest: str
    pushed: float
    mod_revision: int
    pulled: float | None = None


@dataclass(frozen=True)
class _Manifest:
    digest: str
    children: tuple[str, ...]
    subject: str | None
    pushed: float
    mod_revision: int


def _split(key: str, prefix: str) -> tuple[str, str]:
    repo, _, rest = key[len(prefix) :].rpartition("@")
    return repo, rest


def cosign_subject(tag: str) -> str | None:
    """The digest a cosign-style signature, attestation or SBOM tag is about, or None."""
    match = _COSIGN_TAG.fullmatch(tag)
    return f"sha256:{match['hex']}" if match else None


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds >= 86400:
        return f"{seconds / 86400:.1f}d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds:g}s"


def _closure(roots: Iterable[str], manifests: dict[str, _Manifest], referrers: dict[str, list[str]]) -> set[str]:
    """Digests reachable from `roots` through index children and referrers."""

    def successors(digest: str) -> list[str]:
        return [c for c in manifests[digest].children if c in manifests] + referrers.get(digest, [])

    return reachable((r for r in roots if r in manifests), successors)


class _Repository:
    """One repository's tags and manifests, decoded for judging."""

    def __init__(
        self,
        name: str,
        rule: Rule | None,
        tag_items: list[KeyValue],
        manifest_items: list[KeyValue],
        pulled: dict[str, float] | None = None,
    ) -> None:
        self.name = name
        self.rule = rule
        self.tags: list[_Tag] = []
        pulled = pulled or {}
        for item in tag_items:
            record = decode(TagRecord, item.value)
            tag = _split(item.key, keys.TAGS)[1]
            self.tags.append(_Tag(tag, record.digest, record.pushed, item.mod_revision, pulled.get(record.digest)))
        self.manifests: dict[str, _Manifest] = {}
        self.referrers: dict[str, list[str]] = {}
        for item in manifest_items:
            digest = _split(item.key, keys.MANIFESTS)[1]
            manifest = decode(ManifestRecord, item.value)
            self.manifests[digest] = _Manifest(
                digest, tuple(manifest.manifests), manifest.subject, manifest.pushed, item.mod_revision
            )
            if manifest.subject:
                self.referrers.setdefault(manifest.subject, []).append(digest)
        self.roots: set[str] = set()  # digests of the tags that remain
        self.live: set[str] = set()

    def relive(self) -> None:
        self.live = _closure(self.roots, self.manifests, self.referrers)


async def _groups(kv: KV, prefix: str) -> AsyncIterator[tuple[str, list[KeyValue]]]:
    """(repository, its keys) under `prefix`, one repository at a time, in key order."""
    name: str | None = None
    items: list[KeyValue] = []
    async for page in pages(kv, prefix):
        for item in page:
            repo = _split(item.key, prefix)[0]
            if repo != name:
                if name is not None:
                    yield name, items
                name, items = repo, []
            items.append(item)
    if name is not None:
        yield name, items


async def _repositories(kv: KV) -> AsyncIterator[tuple[str, list[KeyValue], list[KeyValue]]]:
    """Each repository's tag and manifest keys, one repository at a time: memory stays one repository deep.

    Both ranges are ordered by `name@` ('@' never occurs in a name), so they are walked side by side.
    """
    tags = _groups(kv, keys.TAGS)
    manifests = _groups(kv, keys.MANIFESTS)
    tag = await anext(tags, None)
    manifest = await anext(manifests, None)
    while tag is not None or manifest is not None:
        name = min(group[0] + "@" for group in (tag, manifest) if group is not None)[:-1]
        tag_items: list[KeyValue] = []
        manifest_items: list[KeyValue] = []
        if tag is not None and tag[0] == name:
            tag_items = tag[1]
            tag = await anext(tags, None)
        if manifest is not None and manifest[0] == name:
            manifest_items = manifest[1]
            manifest = await anext(manifests, None)
        yield name, tag_items, manifest_items


@dataclass
class Decision:
    """What the rules decide for one repository."""

    repository: str
    tags: list[TagDeletion] = field(default_factory=list)
    kept: list[KeptTag] = field(default_factory=list)
    manifests: list[ManifestDeletion] = field(default_factory=list)
    deferred: set[str] = field(default_factory=set)  # subjects stored elsewhere, not known yet to stay or go
    live: set[str] = field(default_factory=set)


# Whether a digest stored in another repository stays reachable there; None while that is not known.
ForeignLive = Callable[[str], bool | None]


def _unknown(subject: str) -> bool | None:
    return None


def _decide(repo: _Repository, now: float, frozen: Frozen, foreign: ForeignLive = _unknown) -> Decision:
    """One repository's tags and manifests judged under its rule (no rule: everything stays)."""
    decision = Decision(repo.name)
    followers: list[tuple[_Tag, str]] = []
    for tag, verdict, why in _judge_tags(repo, now, frozen):
        if verdict == _FOLLOW:
            followers.append((tag, why))
        elif verdict == _DELETE:
            decision.tags.append(TagDeletion(repo.name, tag.name, tag.digest, tag.mod_revision, why, tag.pushed))
        else:
            repo.roots.add(tag.digest)
            if why:
                decision.kept.append(KeptTag(repo.name, tag.name, tag.digest, why))
    repo.relive()

    def stays(subject: str) -> bool | None:
        return subject in repo.live if subject in repo.manifests else foreign(subject)

    # A kept signature tag keeps its own manifest, which may be the subject of another: repeat.
    while followers:
        stay = [f for f in followers if stays(f[1])]
        if not stay:
            break
        for tag, subject in stay:
            repo.roots.add(tag.digest)
            decision.kept.append(KeptTag(repo.name, tag.name, tag.digest, f"its subject {subject} stays"))
        repo.relive()
        followers = [f for f in followers if f not in stay]
    for tag, subject in followers:
        if stays(subject) is None:
            decision.deferred.add(subject)
            continue
        assert repo.rule is not None
        decision.tags.append(
            TagDeletion(
                repo.name,
                tag.name,
                tag.digest,
                tag.mod_revision,
                f"{repo.rule.name}: follows its subject {short(subject)}, which no remaining tag reaches",
                tag.pushed,
            )
        )
    if repo.rule is not None and repo.rule.untagged_after is not None and not decision.deferred:
        decision.manifests = _untagged(repo, repo.rule, repo.rule.untagged_after, now)
    decision.live = repo.live
    return decision


async def decisions(
    kv: KV, rules: list[Rule], *, now: float, frozen: Frozen = _nothing_frozen
) -> AsyncIterator[Decision]:
    """What `rules` decide, one repository at a time, from the current state; changes nothing.

    Memory stays one repository deep: repositories are read, judged and handed on one at a time, in
    name order, so a caller can apply or print each decision before the next is read. Signature tags
    whose subject is stored in another repository (cosign's COSIGN_REPOSITORY) make their
    repository wait for further passes that learn which of those subjects stay anywhere; those
    repositories' decisions come last (and are held until then).
    """

    def rule_for(name: str) -> Rule | None:
        return next((r for r in rules if r.covers(name)), None)

    waiting: set[str] = set()  # subjects stored elsewhere that some repository's decision waits on
    pending: set[str] = set()  # those repositories
    async for name, tag_items, manifest_items in _repositories(kv):
        rule = rule_for(name)
        if rule is None:
            continue  # nothing to decide here; read again only if signatures elsewhere ask
        repo = _Repository(name, rule, tag_items, manifest_items, await _pulled(kv, rule, name))
        decision = _decide(repo, now, frozen)
        if decision.deferred:
            waiting |= decision.deferred
            pending.add(name)
        else:
            yield decision

    # Which waited-on subjects stay anywhere: the least answer consistent with every repository's
    # decision, found by passes that only ever add subjects (so at most one pass per subject).
    # Decisions already handed on (and perhaps applied) do not change what stays: they delete only
    # what their rules judged gone, which no later pass counts as staying.
    live: set[str] = set()
    decided: list[Decision] = []
    for _ in range(len(waiting) + 1):
        if not waiting:
            break
        decided, found = [], set()
        async for name, tag_items, manifest_items in _repositories(kv):
            rule = rule_for(name)
            repo = _Repository(name, rule, tag_items, manifest_items, await _pulled(kv, rule, name))
            decision = _decide(repo, now, frozen, live.__contains__)
            found |= decision.live & waiting
            if name in pending:
                decided.append(decision)
        if found == live:
            break
        live = found
    for decision in decided:
        yield decision


async def plan(kv: KV, rules: list[Rule], *, now: float | None = None, frozen: Frozen = _nothing_frozen) -> Plan:
    """The whole plan from the current state; changes nothing. Its lists spill to disk when large."""
    result = await Plan.start(kv, now)
    async for decision in decisions(kv, rules, now=result.now, frozen=frozen):
        result.add(decision)
    return result


async def _pulled(kv: KV, rule: Rule | None, name: str) -> dict[str, float] | None:
    """The last-pulled times of a repository whose rule asks for them (read one repository at a time)."""
    if rule is None or rule.pulled_within is None:
        return None
    return await Pulls(kv).of_repository(name)


_KEEP, _DELETE, _FOLLOW = "keep", "delete", "follow"


def _judge_tags(repo: _Repository, now: float, frozen: Frozen) -> list[tuple[_Tag, str, str]]:
    """(tag, verdict, why) for every tag of a repository.

    keep: why it stays ("" when no policy covers the repository or the policy prunes no tags);
    delete: the reason, naming the rule; follow: a signature tag's subject digest, decided later.
    """
    rule = repo.rule
    if rule is None:
        return [(t, _KEEP, "") for t in repo.tags]
    # Signature tags are not images: they take no place among the most recently pushed.
    images = [t for t in repo.tags if cosign_subject(t.name) is None]
    ranked = sorted(images, key=lambda t: (-t.pushed, t.name))
    recent = {t.name for t in ranked[: rule.keep_last]} if rule.keep_last is not None else set()
    cutoff = now - rule.older_than if rule.older_than is not None else None
    pulled_cutoff = now - rule.pulled_within if rule.pulled_within is not None else None
    judged: list[tuple[_Tag, str, str]] = []
    for tag in repo.tags:
        protected = frozen(repo.name, tag.name)
        subject = cosign_subject(tag.name)
        pattern = next((p for p in rule.keep_tags if p.fullmatch(tag.name)), None)
        if protected is not None:
            judged.append((tag, _KEEP, f"immutable (rule: {protected})"))
        elif pattern is not None:
            judged.append((tag, _KEEP, f"matches keeptags {pattern.pattern!r}"))
        elif subject is not None:
            judged.append((tag, _FOLLOW, subject))
        elif not rule.prunes_tags:
            judged.append((tag, _KEEP, ""))
        elif tag.name in recent:
            judged.append((tag, _KEEP, f"among the {rule.keep_last} most recently pushed"))
        elif cutoff is not None and tag.pushed >= cutoff:
            judged.append((tag, _KEEP, f"pushed within {format_duration(rule.older_than or 0)}"))
        elif pulled_cutoff is not None and tag.pulled is not None and tag.pulled >= pulled_cutoff:
            judged.append((tag, _KEEP, f"pulled within {format_duration(rule.pulled_within or 0)}"))
        else:
            why = []
            if rule.keep_last is not None:
                why.append(f"not among the {rule.keep_last} most recently pushed")
            if rule.keep_tags:
                why.append("matches no keeptags")
            if rule.older_than is not None:
                why.append(f"older than {format_duration(rule.older_than)}")
            if rule.pulled_within is not None:
                why.append(f"not pulled within {format_duration(rule.pulled_within)}")
            judged.append((tag, _DELETE, f"{rule.name}: {', '.join(why)}"))
    return judged


def _untagged(repo: _Repository, rule: Rule, after: float, now: float) -> list[ManifestDeletion]:
    """Manifests no remaining tag reaches, pushed before `now - after`, parents and subjects first."""
    cutoff = now - after
    young = [d for d, m in repo.manifests.items() if m.pushed >= cutoff]
    staying = _closure([*repo.live, *young], repo.manifests, repo.referrers)
    doomed = {d: m for d, m in repo.manifests.items() if d not in staying}
    # Parents go before their children and subjects before their referrers, so a run cut short
    # never leaves a staying index without a child or a staying subject without its referrer.
    # Kahn's algorithm, smallest digest first among those ready, keeps the order deterministic.
    successors: dict[str, list[str]] = {d: [] for d in doomed}
    waiting: dict[str, int] = dict.fromkeys(doomed, 0)
    for m in doomed.values():
        edges = [(m.digest, child) for child in m.children]
        if m.subject:
            edges.append((m.subject, m.digest))
        for first, then in edges:
            if first in doomed and then in doomed and first != then:
                successors[first].append(then)
                waiting[then] += 1
    ready = [d for d, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        digest = heapq.heappop(ready)
        order.append(digest)
        for then in successors[digest]:
            waiting[then] -= 1
            if waiting[then] == 0:
                heapq.heappush(ready, then)
    # Content addressing rules out cycles; keep any leftover anyway rather than lose it.
    order += sorted(set(doomed) - set(order))
    deletions = []
    for digest in order:
        m = doomed[digest]
        deletions.append(
            ManifestDeletion(
                repo.name,
                digest,
                m.mod_revision,
                f"{rule.name}: no tag reaches it and it is older than {format_duration(after)}",
                m.pushed,
                m.subject,
            )
        )
    return deletions


def short(digest: str) -> str:
    algorithm, _, hex_ = digest.partition(":")
    return f"{algorithm}:{hex_[:12]}"
