"""Storage figures per repository and namespace: counted from marks, always what the records add up to."""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import asdict

import pytest
from usage_before import counter_record, object_records

from coordinator import encoding, keys
from coordinator.kv import KV, Delete, Put
from coordinator.metadata import EVERY_HOLDER_CHANGED, HOLDING_CHANGED, LinkRecord, ManifestRecord
from coordinator.usage import TOTAL, ScopeUsage, Usage, namespaces_of


@pytest.fixture
def kv(either_kv):
    return either_kv


def expected(truth: dict[tuple[str, str], tuple[int, bool, bool]]) -> dict[str, ScopeUsage]:
    """Every scope's figures, computed from scratch: (repo, digest) -> (size, link, manifest)."""
    holders: dict[str, set[str]] = {}
    size_of: dict[str, int] = {}
    for (repo, digest), (size, _, _) in truth.items():
        holders.setdefault(digest, set()).add(repo)
        size_of[digest] = size
    scopes: dict[str, ScopeUsage] = {}

    def add(scope: str, figure: ScopeUsage) -> None:
        scopes[scope] = scopes.get(scope, ScopeUsage()).plus(figure)

    for digest, repos in holders.items():
        size = size_of[digest]
        manifests = sum(1 for repo in repos if truth[(repo, digest)][2])
        add(TOTAL, ScopeUsage(size * len(repos), size, size, 1, 1, manifests))
        names = {ns for repo in repos for ns in namespaces_of(repo)}
        for scope in names:
            inside = {repo for repo in repos if repo.startswith(scope)}
            only = inside == repos
            m = sum(1 for repo in inside if truth[(repo, digest)][2])
            add(scope, ScopeUsage(size * len(inside), size, size if only else 0, 1, int(only), m))
        for repo in repos:
            only = repos == {repo}
            add(repo, ScopeUsage(size, size, size if only else 0, 1, int(only), int(truth[(repo, digest)][2])))
    return {scope: figure for scope, figure in scopes.items() if figure}


async def counted(kv: KV) -> dict[str, ScopeUsage]:
    usage = Usage(kv)
    found = {name: figure async for name, figure in usage.under()}
    total = await usage.scope(TOTAL)
    if total:
        found[TOTAL] = total
    return found


def _manifest(digest: str, size: int) -> bytes:
    return json.dumps(asdict(ManifestRecord(digest, "application/vnd.oci.image.manifest.v1+json", size))).encode()


def _link(size: int) -> bytes:
    return json.dumps(asdict(LinkRecord(size, 0.0))).encode()


def _json(fields: dict) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


async def as_written_before(kv: KV) -> int:
    """Rewrite the storage figures' records as every version before the compact ones wrote them: JSON,
    and for every object a summary and a holder record per repository holding it. Returns the records."""
    usage = Usage(kv)
    written = 0
    for record in await kv.range(keys.USAGE_OBJECTS):
        puts = [Put(key, value) for key, value in await object_records(usage, record.key)]
        await kv.txn([], puts)
        written += len(puts)
    for record in [*await kv.range(keys.USAGE_SCOPES), *await kv.range(keys.USAGE_TOTAL)]:
        await kv.put(*counter_record(record))
        written += 1
    return written


async def test_figures_equal_what_the_records_add_up_to_after_any_changes(kv):
    rng = random.Random(16)
    repos = ["a", "team/app", "team/web", "team/sub/x", "team/sub/y", "other/app", "other/deep/er/z"]
    digests = [f"sha256:{n:064x}" for n in range(12)]
    sizes = {d: rng.randint(1, 10_000) for d in digests}
    truth: dict[tuple[str, str], tuple[int, bool, bool]] = {}
    usage = Usage(kv)
    await usage.build()
    for step in range(800):
        repo, digest = rng.choice(repos), rng.choice(digests)
        size, link, manifest = truth.get((repo, digest), (sizes[digest], False, False))
        kind = rng.random()
        if kind < 0.05:
            # A blob collected with every link (manifests of that digest stay: they are not links).
            for (r, d), (s, _, m) in list(truth.items()):
                if d == digest:
                    await kv.delete(keys.link(r, d))
                    if m:
                        truth[(r, d)] = (s, False, True)
                    else:
                        del truth[(r, d)]
            await kv.txn([], [EVERY_HOLDER_CHANGED(digest)])
        else:
            if kind < 0.55:
                link = not link
                op = Put(keys.link(repo, digest), _link(size)) if link else Delete(keys.link(repo, digest))
            else:
                manifest = not manifest
                record = keys.manifest(repo, digest)
                op = Put(record, _manifest(digest, size)) if manifest else Delete(record)
            await kv.txn([], [op, HOLDING_CHANGED(repo, digest)])
            if link or manifest:
                truth[(repo, digest)] = (size, link, manifest)
            else:
                truth.pop((repo, digest), None)
        if rng.random() < 0.2:
            # Two settlers at once (a leader and `wharf du`): they never count a change twice.
            await asyncio.gather(usage.settle(), Usage(kv).settle())
            assert await counted(kv) == expected(truth), f"after step {step}"
            if rng.random() < 0.1:
                # A store an earlier version counted: its JSON records read, and change into compact ones.
                await as_written_before(kv)
                assert await counted(kv) == expected(truth), f"rewritten as before, after step {step}"
    await usage.settle()
    assert await usage.current()
    assert await counted(kv) == expected(truth)
    assert await usage.reconcile() == 0, "nothing drifted"


async def test_build_counts_a_store_from_before_the_figures(kv):
    records = [
        Put(keys.link("team/app", "sha256:" + "1" * 64), _link(100)),
        Put(keys.link("team/web", "sha256:" + "1" * 64), _link(100)),
        Put(keys.link("team/app", "sha256:" + "2" * 64), _link(40)),
        Put(keys.manifest("team/app", "sha256:" + "3" * 64), _manifest("sha256:" + "3" * 64, 7)),
    ]
    await kv.txn([], records)
    usage = Usage(kv)
    assert not await usage.current()
    assert await usage.build() == 4
    assert await usage.build() == 0, "built once"
    await usage.settle()
    assert await usage.current()
    app = await usage.scope("team/app")
    assert (app.linked, app.exclusive, app.shared, app.manifests) == (147, 47, 100, 1)
    team = await usage.scope("team/")
    assert (team.linked, team.unique, team.exclusive, team.shared) == (247, 147, 147, 0)
    assert (await usage.scope(TOTAL)).unique == 147


async def test_reconcile_marks_what_drifted_and_settling_repairs_it(kv):
    usage = Usage(kv)
    await usage.build()
    digest = "sha256:" + "4" * 64
    # A link written without its mark (by a node from before the figures, say).
    await kv.put(keys.link("team/app", digest), _link(55))
    await usage.settle()
    assert (await usage.scope("team/app")).linked == 0
    assert await usage.reconcile() == 1
    await usage.settle()
    assert (await usage.scope("team/app")).exclusive == 55
    await kv.delete(keys.link("team/app", digest))
    assert await usage.reconcile() == 1
    await usage.settle()
    assert not await usage.scope("team/app") and not await usage.scope(TOTAL)


async def test_settling_reports_repositories_left_without_manifests(kv):
    usage = Usage(kv)
    await usage.build()
    digest = "sha256:" + "5" * 64
    await kv.txn(
        [], [Put(keys.manifest("team/app", digest), _manifest(digest, 9)), HOLDING_CHANGED("team/app", digest)]
    )
    assert (await usage.settle()).emptied == []
    await kv.txn([], [Delete(keys.manifest("team/app", digest)), HOLDING_CHANGED("team/app", digest)])
    assert (await usage.settle()).emptied == ["team/app"]


async def test_an_object_one_repository_holds_has_one_compact_record_and_no_holder_record(kv):
    usage = Usage(kv)
    await usage.build()
    digest = "sha256:" + "6" * 64
    await kv.txn([], [Put(keys.link("team/app", digest), _link(300)), HOLDING_CHANGED("team/app", digest)])
    await usage.settle()
    assert not await kv.range(keys.USAGE_HOLDERS)
    [record] = await kv.range(keys.USAGE_OBJECTS)
    assert encoding.is_compact(record.value) and len(record.value) <= 3 + len("team/app") + 2
    assert (await usage.holders(digest)).keys() == {"team/app"}
    for scope in ("team/app", "team/", TOTAL):
        counter = await kv.get(keys.usage_scope(scope))
        assert counter is not None and encoding.is_compact(counter.value) and len(counter.value) <= 13

    # A second repository: a summary and a holder record each; back to one, and to one record.
    await kv.txn([], [Put(keys.link("team/web", digest), _link(300)), HOLDING_CHANGED("team/web", digest)])
    await usage.settle()
    assert len(await kv.range(keys.USAGE_HOLDERS)) == 2
    assert (await usage.scope("team/app")).shared == 300 and (await usage.scope("team/")).exclusive == 300
    await kv.txn([], [Delete(keys.link("team/app", digest)), HOLDING_CHANGED("team/app", digest)])
    await usage.settle()
    assert not await kv.range(keys.USAGE_HOLDERS)
    assert (await usage.holders(digest)).keys() == {"team/web"}
    assert (await usage.scope("team/web")).exclusive == 300 and not await usage.scope("team/app")
    assert await usage.reconcile() == 0


async def test_figures_an_earlier_version_counted_read_reconcile_and_turn_compact_as_they_change(kv):
    usage = Usage(kv)
    await usage.build()
    one, two = "sha256:" + "7" * 64, "sha256:" + "8" * 64
    await kv.txn(
        [],
        [
            Put(keys.link("team/app", one), _link(10)),
            Put(keys.link("team/app", two), _link(20)),
            Put(keys.link("team/web", two), _link(20)),
            *(HOLDING_CHANGED(repo, d) for repo, d in (("team/app", one), ("team/app", two), ("team/web", two))),
        ],
    )
    await usage.settle()
    truth = {("team/app", one): (10, True, False), ("team/app", two): (20, True, False)}
    truth[("team/web", two)] = (20, True, False)
    assert await as_written_before(kv) == 2 + 3 + 4  # two summaries, three holders, four counters
    assert all(not encoding.is_compact(r.value) for r in await kv.range(keys.USAGE))
    assert await counted(kv) == expected(truth)
    assert await usage.reconcile() == 0, "the JSON records agree with the links"
    assert (await usage.holders(one)).keys() == {"team/app"}

    # A change rewrites what it moves, compactly: the object, its holders and the counters it moves.
    await kv.txn([], [Delete(keys.link("team/web", two)), HOLDING_CHANGED("team/web", two)])
    del truth[("team/web", two)]
    await usage.settle()
    assert await counted(kv) == expected(truth)
    rewritten = {r.key for r in await kv.range(keys.USAGE) if encoding.is_compact(r.value)}
    assert rewritten == {
        keys.usage_object(two),
        *(keys.usage_scope(s) for s in ("team/app", "team/web", "team/", TOTAL)),
    } - {
        keys.usage_scope("team/web")  # nothing left: its counter went
    }
    assert [r.key for r in await kv.range(keys.USAGE_HOLDERS)] == [keys.usage_holder(one, "team/app")]
    assert await usage.reconcile() == 0


@pytest.mark.parametrize("survivor", [0, 10, 11])
async def test_a_blob_collected_from_more_repositories_than_one_round_checks_leaves_the_one_still_holding_it(
    kv, survivor
):
    usage = Usage(kv)
    await usage.build()
    digest = "sha256:" + "9" * 64
    repos = [f"team/r{n:02d}" for n in range(12)]
    await kv.txn([], [op for r in repos for op in (Put(keys.link(r, digest), _link(70)), HOLDING_CHANGED(r, digest))])
    await usage.settle()
    assert len(await kv.range(keys.USAGE_HOLDERS)) == 12 and (await usage.scope("team/")).exclusive == 70
    # Every link goes but one (its repository pushed the blob again meanwhile): one mark for all of them.
    await kv.txn([], [*(Delete(keys.link(r, digest)) for r in repos if r != repos[survivor])])
    await kv.txn([], [EVERY_HOLDER_CHANGED(digest)])
    await usage.settle()
    assert await usage.current()
    assert await counted(kv) == expected({(repos[survivor], digest): (70, True, False)})
    assert not await kv.range(keys.USAGE_HOLDERS)
    assert (await usage.holders(digest)).keys() == {repos[survivor]}
    assert await usage.reconcile() == 0


async def test_a_page_of_marks_settles_in_transactions_that_each_fit_the_coordinators_limit(kv):
    """Hundreds of changes at once: the settler splits them into batches (etcd takes 128 operations a
    transaction), and the figures are still exactly what the records add up to."""
    rng = random.Random(7)
    repos = ["a", "team/app", "team/web", "team/sub/x", "other/deep/er/z"]
    truth: dict[tuple[str, str], tuple[int, bool, bool]] = {}
    for n in range(400):
        repo, digest, size = rng.choice(repos), f"sha256:{n:064x}", rng.randint(1, 10_000)
        await kv.txn([], [Put(keys.link(repo, digest), _link(size)), HOLDING_CHANGED(repo, digest)])
        truth[(repo, digest)] = (size, True, False)
    usage = Usage(kv)
    await usage.build()
    sizes: list[int] = []
    txn = kv.txn

    async def counting(compares, success, failure=()):
        sizes.append(max(len(compares), len(success)))
        return await txn(compares, success, failure)

    kv.txn = counting  # type: ignore[method-assign]
    await usage.settle()
    assert await counted(kv) == expected(truth)
    assert sizes and max(sizes) <= 128
    assert sum(1 for size in sizes if size > 60) >= 3, "marks were settled many to a transaction"
