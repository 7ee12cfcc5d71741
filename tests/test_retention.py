"""Retention policies: which tags and untagged manifests go, what follows its subject, and safe re-runs."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from inprocess import InProcessRegistry
from oci_client import OCI_INDEX, OCI_MANIFEST, OCIClient, digest_of
from services import EtcdCluster, wait_until
from wharf_process import WharfProcess

from coordinator import retention as planner
from coordinator import retention_apply as applying
from coordinator import spool
from coordinator.kv import Delete
from node import retention
from node.config import ConfigError, load

ANY = {"Accept": "*/*"}
HOUR = 3600.0
ROOT = Path(__file__).resolve().parent.parent


class Registry(InProcessRegistry):
    """An in-process app on embedded KV and filesystem storage, configured by extra sections."""

    async def image(self, repo: str, tag: str | None, **fields: Any) -> str:
        """A small image of its own (random layer); pushed by tag, or by digest when `tag` is None."""
        layer = os.urandom(64)
        config = json.dumps({"architecture": "amd64", "os": "linux", "layer": digest_of(layer)}).encode()
        for blob in (config, layer):
            await self.blob(repo, blob)
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest_of(config),
                "size": len(config),
            },
            "layers": [{"mediaType": "application/octet-stream", "digest": digest_of(layer), "size": len(layer)}],
            **fields,
        }
        return await self.manifest(repo, tag, doc)

    async def index(self, repo: str, tag: str | None, children: list[str]) -> str:
        descriptors = []
        for i, child in enumerate(children):
            size = len((await self.http.get(f"/v2/{repo}/manifests/{child}", headers=ANY)).content)
            descriptors.append(
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": child,
                    "size": size,
                    "platform": {"architecture": f"a{i}", "os": "linux"},
                }
            )
        return await self.manifest(repo, tag, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors})

    async def manifest(self, repo: str, tag: str | None, doc: dict[str, Any]) -> str:
        return (await self.put_manifest(repo, tag, doc))[0]

    async def retag(self, repo: str, digest: str, tag: str) -> None:
        """Point `tag` at an existing manifest, as `crane tag` does."""
        got = await self.http.get(f"/v2/{repo}/manifests/{digest}", headers=ANY)
        r = await self.http.put(
            f"/v2/{repo}/manifests/{tag}", content=got.content, headers={"Content-Type": got.headers["content-type"]}
        )
        assert r.status_code == 201, r.text

    async def tags(self, repo: str) -> list[str]:
        r = await self.http.get(f"/v2/{repo}/tags/list")
        return sorted(r.json()["tags"] or []) if r.status_code == 200 else []

    async def has(self, repo: str, digest: str) -> bool:
        return (await self.http.head(f"/v2/{repo}/manifests/{digest}", headers=ANY)).status_code == 200

    async def apply(self, *, now: float | None = None, dry_run: bool = False) -> retention.Run:
        return await retention.apply(self.services, now=now, dry_run=dry_run)


def policies(*rules: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return {"retention": {"policies": list(rules), **settings}}


def sig_tag(digest: str, kind: str = "sig") -> str:
    return f"sha256-{digest.split(':', 1)[1]}.{kind}"


def deleted(run: retention.Run) -> set[str]:
    """`repo:tag` and `repo@digest` of what a run deleted (or, for a dry run, would delete)."""
    rows = run.plan.rows() if run.result is None else run.result.rows()
    return {
        f"{r['repository']}:{r['reference']}" if r["action"] == "delete tag" else f"{r['repository']}@{r['reference']}"
        for r in rows
    }


@pytest.fixture()
async def registry_factory(tmp_path):
    made: list[Registry] = []

    def make(**sections: Any) -> Registry:
        root = tmp_path / f"registry{len(made)}"
        root.mkdir()
        reg = Registry(root, **sections)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        await reg.close()


# -- each rule kind ---------------------------------------------------------------------------


async def test_keep_last_n_keeps_the_most_recently_pushed_tags(registry_factory):
    reg = registry_factory(**policies({"name": "last-two", "repositories": ["team/**"], "keeplast": 2}))
    for n in range(1, 6):
        await reg.image("team/app", f"v{n}")
    await reg.image("other/app", "v1")
    await reg.image("other/app", "v2")
    run = await reg.apply()
    assert await reg.tags("team/app") == ["v4", "v5"]
    assert await reg.tags("other/app") == ["v1", "v2"], "a repository no policy covers is left alone"
    assert deleted(run) == {"team/app:v1", "team/app:v2", "team/app:v3"}
    assert all(r["reason"].startswith("last-two: not among the 2 most recently pushed") for r in run.plan.rows())


async def test_keep_last_counts_push_time_not_tag_names(registry_factory):
    reg = registry_factory(**policies({"keeplast": 1}))
    await reg.image("team/app", "z-old")
    await reg.image("team/app", "a-new")
    await reg.apply()
    assert await reg.tags("team/app") == ["a-new"]


async def test_keep_tags_regex_keeps_whole_matching_tags_only(registry_factory):
    reg = registry_factory(**policies({"name": "releases", "keeptags": [r"v\d+\.\d+\.\d+", "latest"]}))
    for tag in ("v1.0.0", "v1.2.3", "v1.2.3-rc1", "latest", "dev-abc", "main-42"):
        await reg.image("team/app", tag)
    run = await reg.apply()
    assert await reg.tags("team/app") == ["latest", "v1.0.0", "v1.2.3"]
    assert deleted(run) == {"team/app:v1.2.3-rc1", "team/app:dev-abc", "team/app:main-42"}
    kept = {k.tag: k.reason for k in run.plan.kept}
    assert kept["latest"] == "matches keeptags 'latest'"


async def test_older_than_deletes_only_tags_pushed_before_the_cutoff(registry_factory):
    reg = registry_factory(**policies({"name": "month", "olderthan": "30d"}))
    await reg.image("team/app", "old-1")
    await reg.image("team/app", "old-2")
    boundary = time.time()
    await reg.image("team/app", "new-1")
    await reg.image("team/app", "new-2")
    # Thirty days after `boundary`, the first two are older than thirty days, the others are not.
    later = boundary + 30 * 86400
    dry = await reg.apply(now=later, dry_run=True)
    assert deleted(dry) == {"team/app:old-1", "team/app:old-2"}
    assert dry.plan.rows()[0]["reason"] == "month: older than 30d"
    assert await reg.tags("team/app") == ["new-1", "new-2", "old-1", "old-2"], "a dry run changes nothing"
    assert deleted(await reg.apply(now=time.time())) == set(), "nothing is thirty days old today"
    await reg.apply(now=later)
    assert await reg.tags("team/app") == ["new-1", "new-2"]


async def test_pulled_within_keeps_the_pulled_tag_and_removes_the_unpulled_one(registry_factory):
    reg = registry_factory(**policies({"name": "in use", "pulledwithin": "30d"}))
    pulled = await reg.image("team/app", "pulled")
    await reg.image("team/app", "unpulled")
    assert (await reg.http.get("/v2/team/app/manifests/pulled", headers=ANY)).status_code == 200
    await reg.services.pulls.flush()
    run = await reg.apply()
    assert await reg.tags("team/app") == ["pulled"]
    assert deleted(run) == {"team/app:unpulled"}
    assert run.plan.rows()[0]["reason"] == "in use: not pulled within 30d"
    assert {k.tag: k.reason for k in run.plan.kept} == {"pulled": "pulled within 30d"}
    # Thirty days after that pull, it goes too.
    (at,) = (await reg.services.pulls.pulls.last_pulled("team/app", [pulled])).values()
    assert deleted(await reg.apply(now=at + 30 * 86400 + 1, dry_run=True)) == {"team/app:pulled"}


async def test_pulled_within_with_older_than_spares_new_pushes_never_pulled(registry_factory):
    reg = registry_factory(**policies({"pulledwithin": "30d", "olderthan": "7d"}))
    await reg.image("team/app", "new")
    run = await reg.apply()
    assert deleted(run) == set() and await reg.tags("team/app") == ["new"]
    later = time.time() + 8 * 86400
    assert deleted(await reg.apply(now=later, dry_run=True)) == {"team/app:new"}


async def test_a_tag_is_kept_if_any_of_its_rules_keeps_it(registry_factory):
    reg = registry_factory(**policies({"keeplast": 1, "keeptags": ["stable"], "olderthan": "1h"}))
    await reg.image("team/app", "stable")
    await reg.image("team/app", "old")
    boundary = time.time()
    await reg.image("team/app", "recent")
    await reg.image("team/app", "newest")
    await reg.apply(now=boundary + HOUR)
    assert await reg.tags("team/app") == ["newest", "recent", "stable"]


async def test_untagged_after_deletes_old_untagged_manifests_only(registry_factory):
    reg = registry_factory(
        **policies(
            {"name": "untagged-week", "repositories": ["team/*"], "untaggedafter": "7d"},
            {"name": "tags-only", "repositories": ["keep/**"], "keeplast": 5},
        )
    )
    old_loose = await reg.image("team/app", None)
    tagged = await reg.image("team/app", "v1")
    kept_elsewhere = await reg.image("keep/app", None)
    boundary = time.time()
    young_loose = await reg.image("team/app", None)
    run = await reg.apply(now=boundary + 7 * 86400)
    assert deleted(run) == {f"team/app@{old_loose}"}
    assert "untagged-week: no tag reaches it" in run.result.rows()[0]["reason"]  # type: ignore[union-attr]
    assert not await reg.has("team/app", old_loose)
    for digest in (tagged, young_loose):
        assert await reg.has("team/app", digest)
    assert await reg.has("keep/app", kept_elsewhere), "a policy without untaggedafter keeps untagged manifests"
    assert await reg.tags("team/app") == ["v1"], "a policy that sets no tag rule keeps every tag"


async def test_manifests_whose_tags_a_run_deletes_go_in_the_same_run_once_old(registry_factory):
    reg = registry_factory(**policies({"keeplast": 1, "untaggedafter": "1h"}))
    first = await reg.image("team/app", "v1")
    second = await reg.image("team/app", "v2")
    run = await reg.apply(now=time.time() + HOUR)
    assert deleted(run) == {"team/app:v1", f"team/app@{first}"}
    assert not await reg.has("team/app", first) and await reg.has("team/app", second)


async def test_the_first_matching_policy_applies_to_a_repository(registry_factory):
    reg = registry_factory(
        **policies(
            {"name": "precious", "repositories": ["team/precious-*"], "keeplast": 10},
            {"name": "everything", "repositories": ["**"], "keeplast": 1},
        )
    )
    for repo in ("team/precious-db", "team/web", "solo"):
        for n in range(3):
            await reg.image(repo, f"v{n}")
    run = await reg.apply()
    assert await reg.tags("team/precious-db") == ["v0", "v1", "v2"]
    assert await reg.tags("team/web") == ["v2"]
    assert await reg.tags("solo") == ["v2"]
    assert {r["reason"].split(":")[0] for r in run.plan.rows()} == {"everything"}


@pytest.mark.parametrize(
    "policy, complaint",
    [
        ({"keeptags": ["v("]}, r"retention.policies\[0\].keeptags: expected a regular expression .*, got 'v\('"),
        ({"keeplast": -1}, r"retention.policies\[0\].keeplast: expected a number of tags, 0 or more, got -1"),
        ({"olderthan": "three weeks"}, r"retention.policies\[0\].olderthan: expected a duration .*got 'three weeks'"),
    ],
)
def test_bad_policies_are_refused_at_load_naming_the_policy(tmp_path, policy, complaint):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"retention": {"policies": [policy]}}))
    with pytest.raises(ConfigError, match=complaint):
        load(str(path), environ={})


# -- what follows its subject -----------------------------------------------------------------


async def test_cosign_signature_tags_follow_their_subject(registry_factory):
    reg = registry_factory(**policies({"name": "last-one", "keeplast": 1}))
    old = await reg.image("team/app", "v1")
    new = await reg.image("team/app", "v2")
    # Signatures, attestations and SBOMs pushed after the images do not take a place in keeplast.
    for subject in (old, new):
        for kind in ("sig", "att", "sbom"):
            await reg.image("team/app", sig_tag(subject, kind))
    orphan = "sha256:" + "f" * 64
    await reg.image("team/app", sig_tag(orphan))
    run = await reg.apply()
    assert await reg.tags("team/app") == sorted(["v2", sig_tag(new), sig_tag(new, "att"), sig_tag(new, "sbom")])
    assert deleted(run) == {
        "team/app:v1",
        f"team/app:{sig_tag(old)}",
        f"team/app:{sig_tag(old, 'att')}",
        f"team/app:{sig_tag(old, 'sbom')}",
        f"team/app:{sig_tag(orphan)}",
    }
    reasons = {r["reference"]: r["reason"] for r in run.plan.rows()}
    assert reasons[sig_tag(old)].startswith("last-one: follows its subject")


async def test_a_signature_tag_stays_while_another_tag_keeps_its_subject(registry_factory):
    reg = registry_factory(**policies({"keeptags": ["stable"]}))
    image = await reg.image("team/app", "build-1")
    await reg.retag("team/app", image, "stable")
    await reg.image("team/app", sig_tag(image))
    await reg.apply()
    assert await reg.tags("team/app") == sorted(["stable", sig_tag(image)])


async def test_keep_tags_can_keep_a_signature_tag_whose_subject_goes(registry_factory):
    reg = registry_factory(**policies({"keeplast": 1, "keeptags": [r"sha256-.*\.att"]}))
    old = await reg.image("team/app", "v1")
    await reg.image("team/app", "v2")
    for kind in ("sig", "att"):
        await reg.image("team/app", sig_tag(old, kind))
    await reg.apply()
    assert await reg.tags("team/app") == sorted(["v2", sig_tag(old, "att")])


async def test_signatures_stored_in_another_repository_follow_their_image_there(registry_factory):
    reg = registry_factory(**policies({"keeplast": 1}))
    old = await reg.image("team/app", "v1")
    new = await reg.image("team/app", "v2")
    for subject in (old, new):
        await reg.image("team/signatures", sig_tag(subject))
    await reg.apply()
    assert await reg.tags("team/signatures") == [sig_tag(new)]


async def test_oci_referrers_follow_their_subject_and_stay_with_a_staying_one(registry_factory):
    reg = registry_factory(**policies({"name": "one", "keeplast": 1, "untaggedafter": "1h"}))

    async def subject_with_referrers(tag: str) -> tuple[str, list[str]]:
        subject = await reg.image("team/app", tag)
        body = (await reg.http.get(f"/v2/team/app/manifests/{subject}", headers=ANY)).content
        desc = {"mediaType": OCI_MANIFEST, "digest": subject, "size": len(body)}
        sbom = await reg.image("team/app", None, subject=desc, artifactType="application/spdx+json")
        # A signature of the SBOM: a referrer whose subject is itself a referrer.
        sbom_body = (await reg.http.get(f"/v2/team/app/manifests/{sbom}", headers=ANY)).content
        sbom_desc = {"mediaType": OCI_MANIFEST, "digest": sbom, "size": len(sbom_body)}
        signature = await reg.image("team/app", None, subject=sbom_desc, artifactType="application/vnd.dev.sigstore")
        return subject, [sbom, signature]

    old, old_referrers = await subject_with_referrers("v1")
    new, new_referrers = await subject_with_referrers("v2")
    run = await reg.apply(now=time.time() + HOUR)
    assert deleted(run) == {"team/app:v1", f"team/app@{old}", *(f"team/app@{d}" for d in old_referrers)}
    order = [r["reference"] for r in run.plan.rows() if r["action"] == "delete manifest"]
    assert order == [old, *old_referrers], "subjects go before their referrers"
    for digest in (new, *new_referrers):
        assert await reg.has("team/app", digest), "referrers of a staying manifest stay, untagged and old"
    listed = (await reg.http.get(f"/v2/team/app/referrers/{new}")).json()["manifests"]
    assert [m["digest"] for m in listed] == new_referrers[:1]
    assert (await reg.http.get(f"/v2/team/app/referrers/{old}")).json()["manifests"] == []


async def test_referrers_of_a_young_untagged_manifest_stay(registry_factory):
    reg = registry_factory(**policies({"untaggedafter": "1h"}))
    loose = await reg.image("team/app", None)
    body = (await reg.http.get(f"/v2/team/app/manifests/{loose}", headers=ANY)).content
    desc = {"mediaType": OCI_MANIFEST, "digest": loose, "size": len(body)}
    referrer = await reg.image("team/app", None, subject=desc, artifactType="x/sig")
    boundary = time.time()
    # Pushing the subject again makes it young; its referrer stays old by the plan's clock.
    await reg.retag("team/app", loose, "tmp")
    assert (await reg.http.delete("/v2/team/app/manifests/tmp")).status_code == 202
    run = await reg.apply(now=boundary + HOUR)
    assert deleted(run) == set()
    assert await reg.has("team/app", loose) and await reg.has("team/app", referrer)


async def test_multi_arch_index_children_stay_while_the_index_is_tagged(registry_factory):
    reg = registry_factory(**policies({"keeplast": 1, "untaggedafter": "1h"}))
    shared = await reg.image("team/app", None)
    old_only = await reg.image("team/app", None)
    old_index = await reg.index("team/app", "v1", [shared, old_only])
    new_only = await reg.image("team/app", None)
    new_index = await reg.index("team/app", "v2", [shared, new_only])
    nested = await reg.index("team/app", None, [new_only])
    outer = await reg.index("team/app", "v3", [nested])
    await reg.http.delete("/v2/team/app/manifests/v3")  # an untagged index of an index: both go
    run = await reg.apply(now=time.time() + HOUR)
    assert deleted(run) == {
        "team/app:v1",
        f"team/app@{old_index}",
        f"team/app@{old_only}",
        f"team/app@{outer}",
        f"team/app@{nested}",
    }
    order = [r["reference"] for r in run.plan.rows() if r["action"] == "delete manifest"]
    assert order.index(old_index) < order.index(old_only) and order.index(outer) < order.index(nested)
    for digest in (new_index, shared, new_only):
        assert await reg.has("team/app", digest), "children of a tagged index are never untagged"
    assert await reg.tags("team/app") == ["v2"]


# -- dry run, races and leader changes --------------------------------------------------------


async def _mixed_content(reg: Registry) -> None:
    """Per repository: 5 tags and 8 manifests for MIXED to delete, and as much to keep."""
    for repo in ("team/app", "team/web"):
        await reg.index(repo, "multi-old", [await reg.image(repo, None) for _ in range(2)])
        images = [await reg.image(repo, f"build-{n}") for n in range(4)]
        await reg.image(repo, "v1.0.0")
        await reg.image(repo, sig_tag(images[0]))
        await reg.image(repo, sig_tag(images[-1]))
        await reg.image(repo, None)
        await reg.index(repo, "multi", [await reg.image(repo, None) for _ in range(2)])


MIXED = policies({"name": "mixed", "keeplast": 3, "keeptags": [r"v\d+\.\d+\.\d+"], "untaggedafter": "1h"})


async def _state(reg: Registry) -> list[tuple[str, bytes, int]]:
    return [(k.key, k.value, k.mod_revision) for k in await reg.kv.range("")]


@pytest.mark.parametrize("held", [None, 3], ids=["in-memory", "spilled-to-disk"])
async def test_dry_run_reports_exactly_what_a_real_run_then_deletes(registry_factory, monkeypatch, held):
    if held is not None:  # the plan's and the result's lists keep 3 records in memory, the rest on disk
        monkeypatch.setattr(spool, "KEEP", held)
    reg = registry_factory(**MIXED)
    await _mixed_content(reg)
    now = time.time() + HOUR
    before = await _state(reg)
    dry = await reg.apply(now=now, dry_run=True)
    assert await _state(reg) == before, "a dry run changes nothing"
    real = await reg.apply(now=now)
    assert real.result is not None and not real.result.skipped
    assert dry.plan.rows() == real.result.rows()
    assert len([r for r in real.result.rows() if r["action"] == "delete tag"]) == 2 * 5
    assert len([r for r in real.result.rows() if r["action"] == "delete manifest"]) == 2 * 8
    assert len(real.plan.tags) == 2 * 5 and len(real.plan.kept) == len(dry.plan.kept) > 3
    assert list(real.plan.kept) == list(dry.plan.kept)
    again = await reg.apply(now=now)
    assert again.plan.rows() == [], "a second run finds nothing more to delete"


async def test_a_real_run_deletes_in_one_repository_before_judging_the_next(registry_factory, monkeypatch):
    """Memory stays one repository deep: each repository's decision is applied before the next is made."""
    reg = registry_factory(**policies({"keeplast": 1}))
    for repo in ("team/a", "team/b"):
        await reg.image(repo, "old")
        await reg.image(repo, "new")
    events: list[str] = []
    decide, txn = planner._decide, reg.kv.txn

    def judging(repo, *args):
        events.append(f"judge {repo.name}")
        return decide(repo, *args)

    async def writing(compares, ops, gets=()):
        events.extend(f"delete {op.key}" for op in ops if isinstance(op, Delete) and op.key.startswith("tag/"))
        return await txn(compares, ops, gets)

    monkeypatch.setattr(planner, "_decide", judging)
    monkeypatch.setattr(reg.kv, "txn", writing)
    run = await reg.apply()
    assert deleted(run) == {"team/a:old", "team/b:old"}
    assert events == ["judge team/a", "delete tag/team/a@old", "judge team/b", "delete tag/team/b@old"]


@pytest.mark.parametrize("phase", ["tags", "manifests"])
async def test_a_run_interrupted_half_way_is_finished_by_the_next_leader_without_double_deletes(
    registry_factory, phase
):
    reg = registry_factory(**MIXED)
    await _mixed_content(reg)
    now = time.time() + HOUR
    whole = await retention.make_plan(reg.services, now=now)
    cut = len(whole.tags) // 2 if phase == "tags" else len(whole.tags) + len(whole.manifests) // 2
    half = planner.Plan(now, whole.revision)
    half.tags.extend(itertools.islice(whole.tags, cut))
    half.manifests.extend(itertools.islice(whole.manifests, max(0, cut - len(whole.tags))))

    # The old leader applies the first half of the plan and is stopped before it records a summary.
    def lose_leadership(done: int, total: int) -> None:
        if done == total:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await applying.Applier(reg.kv, node="old-leader", progress=lose_leadership).apply(half)
    assert json.loads((await reg.kv.get(applying.PROGRESS)).value)["node"] == "old-leader"  # type: ignore[union-attr]
    assert await reg.kv.get(applying.LAST_RUN) is None

    # The new leader plans again from what is there now, and applies that.
    second = await reg.apply(now=now)
    assert second.result is not None and second.result.interrupted is not None
    assert not second.result.skipped, "nothing the new plan names was gone already"
    first_rows = {(r["action"], r["repository"], r["reference"]) for r in half.rows()}
    second_rows = {(r["action"], r["repository"], r["reference"]) for r in second.result.rows()}
    assert not first_rows & second_rows, "nothing is deleted twice"
    assert first_rows | second_rows == {(r["action"], r["repository"], r["reference"]) for r in whole.rows()}
    assert await reg.kv.get(applying.PROGRESS) is None
    assert json.loads((await reg.kv.get(applying.LAST_RUN)).value)["resumed_interrupted_run"]  # type: ignore[union-attr]
    assert (await retention.make_plan(reg.services, now=now)).rows() == []
    assert await reg.kv.range("gc/pending-manifest/") == []


async def test_applying_the_same_plan_twice_deletes_nothing_the_second_time(registry_factory):
    reg = registry_factory(**MIXED)
    await _mixed_content(reg)
    now = time.time() + HOUR
    plan = await retention.make_plan(reg.services, now=now)
    first = await applying.Applier(reg.kv, node="a").apply(plan)
    second = await applying.Applier(reg.kv, node="b").apply(plan)
    assert len(first.rows()) == len(plan.rows())
    assert second.rows() == []
    assert {s.why for s in second.skipped} == {"already deleted"}


async def test_a_tag_pushed_again_after_planning_is_left_alone(registry_factory):
    reg = registry_factory(**policies({"keeplast": 1, "untaggedafter": "1h"}))
    moved_from = await reg.image("team/app", "v1")
    await reg.image("team/app", "v2")
    loose = await reg.image("team/app", None)
    child = await reg.image("team/app", None)
    plan = await retention.make_plan(reg.services, now=time.time() + HOUR)
    assert {r["reference"] for r in plan.rows()} == {"v1", moved_from, loose, child}
    moved_to = await reg.image("team/app", "v1")  # the tag moves
    await reg.retag("team/app", loose, "rescued")  # an untagged manifest is tagged
    await reg.index("team/app", "bundle", [child])  # a new index uses an untagged manifest
    result = await applying.Applier(reg.kv, node="a").apply(plan)
    assert [m.digest for m in result.manifests_deleted] == [moved_from]
    assert {s.reference for s in result.skipped} == {"v1", loose, child}
    assert (await reg.http.head("/v2/team/app/manifests/v1", headers=ANY)).headers["docker-content-digest"] == moved_to
    for digest in (loose, child):
        assert await reg.has("team/app", digest)
    assert await reg.kv.range("gc/pending-manifest/") == [], "skipped manifests keep no pending mark"


async def test_an_index_pushed_between_marking_and_deleting_saves_its_child(registry_factory):
    reg = registry_factory(**policies({"untaggedafter": "1h"}))
    child = await reg.image("team/app", None)
    plan = await retention.make_plan(reg.services, now=time.time() + HOUR)
    applier = applying.Applier(reg.kv, node="a")
    original = reg.kv.range

    async def push_index_after_the_re_read(prefix: str, **kwargs: Any):
        found = await original(prefix, **kwargs)
        if prefix.startswith("manifest/"):
            reg.kv.range = original  # type: ignore[method-assign]
            await reg.index("team/app", "bundle", [child])
        return found

    reg.kv.range = push_index_after_the_re_read  # type: ignore[method-assign]
    result = await applier.apply(plan)
    assert list(result.manifests_deleted) == []
    assert await reg.has("team/app", child)
    assert (await reg.http.get("/v2/team/app/manifests/bundle", headers=ANY)).status_code == 200


# -- over real processes ----------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env
    )


def _remove_prefix(etcd: EtcdCluster, prefix: str) -> None:
    from coordinator.etcd import EtcdKV

    async def remove() -> None:
        kv = await EtcdKV.open(etcd.endpoints, prefix=prefix)
        try:
            await kv.delete("", prefix=True)
        finally:
            await kv.close()

    asyncio.run(remove())


def _read_key(etcd: EtcdCluster, prefix: str, key: str) -> bytes | None:
    from coordinator.etcd import EtcdKV

    async def read() -> bytes | None:
        kv = await EtcdKV.open(etcd.endpoints, prefix=prefix)
        try:
            found = await kv.get(key)
            return found.value if found else None
        finally:
            await kv.close()

    return asyncio.run(read())


@pytest.fixture()
def etcd_node(tmp_path, etcd):
    """A factory of `wharf serve` processes on the session etcd, under a key prefix of their own."""
    prefix = f"/wharf-retention-{uuid.uuid4().hex[:8]}/"
    started: list[WharfProcess] = []

    def start(**sections: Any) -> WharfProcess:
        node = WharfProcess(
            tmp_path / f"node{len(started)}",
            storage={"filesystem": {"rootdirectory": str(tmp_path / "storage")}, "delete": {"enabled": True}},
            coordinator={"etcd": {"endpoints": etcd.endpoints, "prefix": prefix}},
            cluster={"node": f"node{len(started)}", "leasettl": 3},
            **sections,
        )
        started.append(node)
        return node.start()

    start.prefix = prefix  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for node in started:
            node.stop()
        _remove_prefix(etcd, prefix)


def test_cli_dry_run_lists_exactly_what_the_real_run_then_deletes_over_http(etcd_node, etcd):
    rules = {"name": "ci", "repositories": ["ci/**"], "keeplast": 2, "keeptags": ["release-.*"], "untaggedafter": "0s"}
    node = etcd_node(retention={"enabled": False, "policies": [rules]})
    with httpx.Client(base_url=node.url, timeout=30) as http:
        oci = OCIClient(http)
        oci.push_image("ci/app", "release-1", layers=[os.urandom(32)])
        images = [oci.push_image("ci/app", f"build-{n}", layers=[os.urandom(32)]) for n in range(5)]
        first_signature = oci.push_image("ci/app", sig_tag(images[0].digest), layers=[os.urandom(32)])
        oci.push_image("ci/app", sig_tag(images[-1].digest), layers=[os.urandom(32)])
        loose = oci.push_image("ci/app", None, layers=[os.urandom(32)])
        oci.push_image("other/app", "build-0", layers=[os.urandom(32)])

        table = _cli("retention", "apply", "--dry-run", str(node.config_path))
        assert table.returncode == 0, table.stderr
        assert table.stdout.splitlines()[0].split() == ["REPOSITORY", "TAG/DIGEST", "ACTION", "PUSHED", "REASON"]
        assert "would delete: 4 tags, 5 manifests" in table.stdout and "dry run: nothing was changed" in table.stdout
        dry = _cli("retention", "apply", "--dry-run", "--json", str(node.config_path))
        assert dry.returncode == 0, dry.stderr
        assert http.get("/v2/ci/app/tags/list").json()["tags"] == sorted(
            [*(f"build-{n}" for n in range(5)), "release-1", sig_tag(images[0].digest), sig_tag(images[-1].digest)]
        )
        real = _cli("retention", "apply", "--json", str(node.config_path))
        assert real.returncode == 0, real.stderr
        dry_rows, real_rows = json.loads(dry.stdout)["delete"], json.loads(real.stdout)["delete"]
        assert dry_rows == real_rows
        signature_of_first = http.head(f"/v2/ci/app/manifests/{sig_tag(images[0].digest)}", headers=ANY)
        assert signature_of_first.status_code == 404, "the real run happened"
        assert {(r["action"], r["reference"]) for r in real_rows} == {
            *(("delete tag", f"build-{n}") for n in range(3)),
            ("delete tag", sig_tag(images[0].digest)),
            *(("delete manifest", images[n].digest) for n in range(3)),
            ("delete manifest", first_signature.digest),
            ("delete manifest", loose.digest),
        }
        assert json.loads(real.stdout)["summary"]["tags_deleted"] == 4
        assert http.get("/v2/ci/app/tags/list").json()["tags"] == sorted(
            ["build-3", "build-4", "release-1", sig_tag(images[-1].digest)]
        )
        for image in images[:3]:
            assert http.head(f"/v2/ci/app/manifests/{image.digest}", headers=ANY).status_code == 404
        assert http.get("/v2/other/app/tags/list").json()["tags"] == ["build-0"]
        again = _cli("retention", "apply", "--json", str(node.config_path))
        assert json.loads(again.stdout)["delete"] == []
    summary = json.loads(_read_key(etcd, etcd_node.prefix, applying.LAST_RUN) or b"{}")
    assert summary["tags_deleted"] == 0, "the last run (the second) found nothing more"


def test_the_leader_applies_the_policies_on_its_schedule(etcd_node, etcd):
    node = etcd_node(retention={"interval": "1s", "policies": [{"repositories": ["sched/**"], "keeplast": 1}]})
    with httpx.Client(base_url=node.url, timeout=30) as http:
        oci = OCIClient(http)
        for n in range(3):
            oci.push_image("sched/app", f"v{n}", layers=[os.urandom(32)])
        wait_until(
            lambda: http.get("/v2/sched/app/tags/list").json()["tags"] == ["v2"],
            timeout=20,
            what="the scheduled retention run",
        )
    record = _read_key(etcd, etcd_node.prefix, applying.LAST_RUN)
    assert record is not None and json.loads(record)["node"] == "node0"
