"""The coordinator kept healthy by Wharf: compaction on a schedule, defragmentation while pushes go on,
its size exported, and out of space as a clear, safe state that ends without a restart."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from inprocess import InProcessRegistry
from oci_client import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, OCIClient, assert_error, descriptor, digest_of
from prometheus_client.parser import text_string_to_metric_families
from services import EtcdCluster, wait_until
from wharf_process import WharfProcess

from coordinator.compaction import Compactor
from coordinator.embedded import EmbeddedKV
from coordinator.etcd import EtcdKV
from coordinator.kv import OutOfSpace
from node.storage.filesystem import FilesystemDriver

ROOT = Path(__file__).resolve().parent.parent
ANY = {"Accept": "*/*"}
FILLER = "/filler/"
POLL = 15.0  # a node polls the coordinator's space every 5 s


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def _metrics(node: WharfProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(node.metrics_url, timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _series(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> dict[str, float]:
    """Values of one family by their `member` label ("" when it has none)."""
    return {dict(labels).get("member", ""): value for (found, labels), value in metrics.items() if found == name}


def _chunked_push(http: httpx.Client, repo: str, data: bytes) -> None:
    """POST, two PATCHes and a PUT: every step rewrites the session record, so history piles up."""
    started = http.post(f"/v2/{repo}/blobs/uploads/")
    assert started.status_code == 202, started.text
    half = len(data) // 2
    first = http.patch(started.headers["location"], content=data[:half], headers={"Content-Range": f"0-{half - 1}"})
    assert first.status_code == 202, first.text
    second = http.patch(
        first.headers["location"], content=data[half:], headers={"Content-Range": f"{half}-{len(data) - 1}"}
    )
    assert second.status_code == 202, second.text
    done = http.put(second.headers["location"], params={"digest": digest_of(data)})
    assert done.status_code == 201, done.text


def _image_doc(config: bytes, layers: list[bytes]) -> dict:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, layer) for layer in layers],
    }


async def _live_bytes(endpoints: list[str], prefix: str) -> int:
    kv = await EtcdKV.open(endpoints, prefix=prefix)
    try:
        return sum(len(prefix) + len(k.key) + len(k.value) for k in await kv.range(""))
    finally:
        await kv.close()


async def _largest_in_use(endpoints: list[str]) -> int:
    kv = await EtcdKV.open(endpoints, prefix="/")
    try:
        return max(m.in_use for m in (await kv.space()).members)
    finally:
        await kv.close()


# -- compaction and defragmentation under a push loop -------------------------------------------------


def test_push_loop_on_three_members_keeps_the_database_bounded_and_defrag_runs_during_pushes(tmp_path):
    prefix = f"/wharf-{uuid.uuid4().hex[:8]}/"
    with EtcdCluster(3) as etcd:
        coordinator = {"etcd": {"endpoints": etcd.endpoints, "prefix": prefix, "compaction": {"interval": "1s"}}}
        coordinator["etcd"]["compaction"]["keep"] = 100
        with (
            WharfProcess(tmp_path / "node", coordinator=coordinator) as node,
            httpx.Client(base_url=node.url, timeout=60) as http,
        ):
            oci = OCIClient(http)
            before = _metrics(node)
            failures: list[str] = []
            figures: dict[int, tuple[int, int]] = {}
            defrag: dict[str, subprocess.CompletedProcess[str]] = {}
            previous = None
            for n in range(200):
                try:
                    layer, config = os.urandom(2000), json.dumps({"n": n}).encode()
                    _chunked_push(http, "team/app", layer)
                    oci.push_blob("team/app", config)
                    image = oci.push_manifest("team/app", "latest", _image_doc(config, [layer]))
                    if previous is not None:
                        deleted = http.delete(f"/v2/team/app/manifests/{previous}")
                        assert deleted.status_code == 202, deleted.text
                    previous = image.digest
                except AssertionError as exc:
                    failures.append(f"push {n}: {exc}")
                if n in (60, 199):
                    figures[n] = (
                        asyncio.run(_largest_in_use(etcd.endpoints)),
                        asyncio.run(_live_bytes(etcd.endpoints, prefix)),
                    )
                if n == 100:
                    runner = threading.Thread(
                        target=lambda: defrag.update(run=_cli("coordinator", "defrag", "-c", str(node.config_path)))
                    )
                    runner.start()
            runner.join(120)
            assert failures == []
            ran = defrag["run"]
            assert ran.returncode == 0, ran.stderr
            started = [line for line in ran.stdout.splitlines() if line.startswith("defragmenting")]
            assert len(started) == 3 and started[-1].startswith("defragmenting leader"), ran.stdout
            assert sum(member in ran.stdout for member in etcd.endpoints) == 3

            # History is compacted away: the in-use size grows with the live records, not with every revision.
            (mid_in_use, mid_live), (end_in_use, end_live) = figures[60], figures[199]
            assert end_in_use - mid_in_use <= 4 * (end_live - mid_live) + 128 * 1024, figures
            with pytest.raises(subprocess.CalledProcessError) as lost:
                etcd._etcdctl("get", "--rev=2", prefix, "--prefix")
            assert "compacted" in lost.value.stderr

            def moved() -> dict | None:
                after = _metrics(node)
                if _series(after, "wharf_coordinator_compacted_revision")[""] <= 0:
                    return None
                return after

            after = wait_until(moved, timeout=POLL, what="the compacted revision in the metrics")
            assert _series(after, "wharf_coordinator_revision")[""] > _series(before, "wharf_coordinator_revision")[""]
            sizes = _series(after, "wharf_coordinator_db_size_bytes")
            assert sorted(sizes) == sorted(etcd.endpoints)
            assert all(value > 0 for value in sizes.values())
            assert set(_series(after, "wharf_coordinator_db_size_in_use_bytes")) == set(sizes)
            assert all(v == 2 * 1024**3 for v in _series(after, "wharf_coordinator_quota_bytes").values())
            assert 0 < _series(after, "wharf_coordinator_quota_used_ratio")[""] < 0.01
            assert not any(v for (name, _), v in after.items() if name == "wharf_coordinator_alarm")


# -- etcd out of space --------------------------------------------------------------------------


async def _fill(endpoints: list[str], *, room: int) -> int:
    """Fill etcd up to its quota with filler keys, then free about `room` bytes of it."""
    kv = await EtcdKV.open(endpoints, prefix=FILLER)
    try:
        n = 0
        while n < 10_000:
            try:
                await kv.put(f"{n:05d}", os.urandom(8000))
            except OutOfSpace:
                break
            n += 1
        # A full etcd holds a little more than its quota: free what is over it, and `room` more.
        member = (await kv.space()).members[0]
        for k in range(min((member.size - member.quota + room) // 8000 + 1, n)):
            await kv.delete(f"{n - 1 - k:05d}")
        await kv.compact((await kv.txn([], [])).revision)
        await kv.defragment()
        await _disarmed(kv)
        return n
    finally:
        await kv.close()


async def _disarmed(kv: EtcdKV, *, clean_reads: int = 3, timeout: float = 30.0) -> None:
    """Disarm, until the alarm list reads empty several times running. A write the node tried while
    etcd was full (its leases, jobs) raises NOSPACE again when its alarm request lands after a
    disarm; the node clears such an alarm itself at its next poll, but the test's pushes start now."""
    deadline = time.monotonic() + timeout
    clean = 0
    while clean < clean_reads:
        if time.monotonic() > deadline:
            raise AssertionError(f"the NOSPACE alarm kept coming back for {timeout:.0f} s")
        if (await kv.space()).alarms:
            clean = 0
            await kv.disarm()
        else:
            clean += 1
        await asyncio.sleep(0.3)


async def _empty_filler(endpoints: list[str]) -> None:
    kv = await EtcdKV.open(endpoints, prefix=FILLER)
    try:
        await kv.delete("", prefix=True)
    finally:
        await kv.close()


def _push_until_refused(http: httpx.Client, limit: int = 2000) -> tuple[list[str], httpx.Response]:
    """Push small images until one step is refused; (the tags pushed whole, the refusal)."""
    pushed = []
    for n in range(limit):
        layer = os.urandom(200)
        for blob in (layer, b'{"n": %d}' % n):
            response = http.post("/v2/team/app/blobs/uploads/", params={"digest": digest_of(blob)}, content=blob)
            if response.status_code != 201:
                return pushed, response
        doc = _image_doc(b'{"n": %d}' % n, [layer])
        body = json.dumps(doc).encode()
        response = http.put(f"/v2/team/app/manifests/v{n}", content=body, headers={"Content-Type": OCI_MANIFEST})
        if response.status_code != 201:
            return pushed, response
        pushed.append(f"v{n}")
    raise AssertionError(f"{limit} pushes and the coordinator is still not full")


def _assert_refused_clearly(response: httpx.Response, cause: str) -> None:
    error = assert_error(response, 503, "UNAVAILABLE")
    assert "out of space" in error["message"]
    assert error["detail"]["reason"] == cause
    assert int(response.headers["retry-after"]) > 0


def _assert_pulls_whole(http: httpx.Client, tags: list[str]) -> None:
    for tag in tags:
        manifest = http.get(f"/v2/team/app/manifests/{tag}", headers=ANY)
        assert manifest.status_code == 200, (tag, manifest.text)
        doc = manifest.json()
        for desc in [doc["config"], *doc["layers"]]:
            blob = http.get(f"/v2/team/app/blobs/{desc['digest']}")
            assert blob.status_code == 200 and digest_of(blob.content) == desc["digest"], tag


def _nothing_unaccounted(node: WharfProcess) -> None:
    """Every object in storage is named by a record (a blob's, or an upload session's that reclaims it)."""
    ran = _cli("gc", "--dry-run", "--json", str(node.config_path))
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["unaccounted_objects"] == 0, ran.stdout


def test_a_full_etcd_refuses_writes_clearly_serves_pulls_and_takes_writes_again_without_a_restart(tmp_path):
    with EtcdCluster(1, extra_args=("--quota-backend-bytes", str(4 * 1024 * 1024))) as etcd:
        coordinator = {"etcd": {"endpoints": etcd.endpoints, "prefix": "/wharf/", "compaction": {"interval": "2s"}}}
        with (
            WharfProcess(tmp_path / "node", coordinator=coordinator) as node,
            httpx.Client(base_url=node.url, timeout=60) as http,
        ):
            oci = OCIClient(http)
            first = oci.push_image("team/app", "first", layers=[os.urandom(500)])
            asyncio.run(_fill(etcd.endpoints, room=400_000))
            pushed, refused = _push_until_refused(http)
            _assert_refused_clearly(refused, "coordinator out of space")
            assert pushed, f"some pushes fit into the room left; the first: {refused.status_code} {refused.text}"
            # Every kind of write is refused the same way, while pulls go on.
            _assert_refused_clearly(http.post("/v2/team/app/blobs/uploads/"), "coordinator out of space")
            _assert_refused_clearly(http.delete(f"/v2/team/app/manifests/{first.digest}"), "coordinator out of space")
            _assert_pulls_whole(http, ["first", *pushed])
            assert http.get("/v2/team/app/tags/list").json()["tags"]

            def says_read_only() -> dict | None:
                body = http.get("/debug/ready").json()
                return body if body["readonly"].startswith("coordinator out of space: read-only") else None

            ready = wait_until(says_read_only, timeout=POLL, what="readiness to say the coordinator is full")
            assert http.get("/debug/ready").status_code == 200  # pulls are served: still in rotation
            assert "warning: over 80% of the quota" in ready["coordinator_space"]
            log = node.log_text()
            assert "wharf coordinator defrag -c CONFIG" in log and "coordinator out of space" in log
            assert "of its quota" in log  # the warning at 80%
            metrics = _metrics(node)
            assert _series(metrics, "wharf_coordinator_writes_refused_total")[""] >= 3
            alarms = {dict(labels)["alarm"]: v for (n, labels), v in metrics.items() if n == "wharf_coordinator_alarm"}
            assert alarms["NOSPACE"] == 1
            status = _cli("coordinator", "status", "--json", "-c", str(node.config_path))
            assert status.returncode == 0 and json.loads(status.stdout)["alarms"] == ["NOSPACE"]

            # The operator's fix: records freed (as garbage collection would), then `wharf coordinator defrag`.
            asyncio.run(_empty_filler(etcd.endpoints))
            fixed = _cli("coordinator", "defrag", "-c", str(node.config_path))
            assert fixed.returncode == 0, fixed.stdout + fixed.stderr
            assert "cleared the NOSPACE alarm" in fixed.stdout
            again = oci.push_image("team/app", "again", layers=[os.urandom(500)])
            _assert_pulls_whole(http, ["first", "again", *pushed])
            wait_until(
                lambda: http.get("/debug/ready").json()["readonly"] == "writable",
                timeout=POLL,
                what="readiness to say writable again",
            )
            assert (
                http.get("/v2/team/app/manifests/again", headers=ANY).headers["docker-content-digest"] == again.digest
            )
            _nothing_unaccounted(node)


def test_raising_the_quota_of_a_full_etcd_lets_writes_resume_by_themselves(tmp_path):
    with EtcdCluster(1, extra_args=("--quota-backend-bytes", str(4 * 1024 * 1024))) as etcd:
        coordinator = {"etcd": {"endpoints": etcd.endpoints, "prefix": "/wharf/"}}
        with (
            WharfProcess(tmp_path / "node", coordinator=coordinator) as node,
            httpx.Client(base_url=node.url, timeout=60) as http,
        ):
            OCIClient(http).push_image("team/app", "first", layers=[os.urandom(500)])
            asyncio.run(_fill(etcd.endpoints, room=50_000))
            pushed, refused = _push_until_refused(http)
            _assert_refused_clearly(refused, "coordinator out of space")
            # The live data fills the quota: the operator raises it, restarting the member.
            etcd.stop_member(0)
            etcd.extra_args = ("--quota-backend-bytes", str(64 * 1024 * 1024))
            etcd.start_member(0, wait=False)  # an etcd with an alarm raised does not call itself healthy

            def pushes() -> bool:
                layer = os.urandom(300)
                return (
                    http.post(
                        "/v2/team/app/blobs/uploads/", params={"digest": digest_of(layer)}, content=layer
                    ).status_code
                    == 201
                )

            # The node clears the alarm once it finds room, with no disarm by hand and no restart of its own.
            wait_until(pushes, timeout=2 * POLL, interval=0.5, what="pushes to be taken again")
            _assert_pulls_whole(http, ["first", *pushed])
            assert "cleared its NOSPACE alarm" in node.log_text()


# -- the embedded coordinator on a full disk --------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB filesystem of its own (tmpfs), unmounted afterwards."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True)
    assert done.returncode == 0, f"mounting a small tmpfs needs root here: {done.stderr.decode()}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_the_embedded_coordinator_on_a_full_disk_refuses_writes_clearly_and_recovers_by_itself(tmp_path, small_disk):
    coordinator = {"embedded": {"path": str(small_disk / "coordinator.db")}}
    with (
        WharfProcess(tmp_path / "node", coordinator=coordinator) as node,
        httpx.Client(base_url=node.url, timeout=60) as http,
    ):
        OCIClient(http).push_image("team/app", "first", layers=[os.urandom(500)])
        filler = small_disk / "filler"
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * max(free - 256 * 1024, 0))
        pushed, refused = _push_until_refused(http, limit=5000)
        _assert_refused_clearly(refused, "coordinator out of space")
        _assert_pulls_whole(http, ["first", *pushed])

        def says_read_only() -> dict | None:
            body = http.get("/debug/ready").json()
            return body if body["readonly"].startswith("coordinator out of space: read-only") else None

        ready = wait_until(says_read_only, timeout=POLL, what="readiness to say the coordinator is full")
        assert "free space on the disk under the coordinator file" in ready["readonly"]
        assert "free space on the disk under the coordinator file" in node.log_text()

        filler.unlink()  # the operator makes room
        OCIClient(http).push_image("team/app", "again", layers=[os.urandom(500)])
        wait_until(
            lambda: http.get("/debug/ready").json()["readonly"] == "writable",
            timeout=POLL,
            what="readiness to say writable again",
        )
        _assert_pulls_whole(http, ["first", "again", *pushed])
        _nothing_unaccounted(node)


async def test_a_full_storage_disk_is_a_clear_503_too(tmp_path):
    class FullDisk(FilesystemDriver):
        async def upload_write(self, upload_key, state, offset, chunks):  # type: ignore[no-untyped-def]
            raise OSError(errno.ENOSPC, "No space left on device", upload_key)

    reg = InProcessRegistry(tmp_path, storage=FullDisk(str(tmp_path / "registry")))
    try:
        data = os.urandom(100)
        response = await reg.http.post("/v2/team/app/blobs/uploads/", params={"digest": digest_of(data)}, content=data)
        assert response.status_code == 503, response.text
        assert response.json()["errors"][0]["detail"]["reason"] == "storage out of space"
        assert int(response.headers["retry-after"]) > 0
        assert await reg.kv.range("blob/") == [] and await reg.kv.range("upload/") == []
    finally:
        await reg.close()


# -- the leader's schedule ------------------------------------------------------------------------


async def test_compaction_keeps_one_interval_and_keep_revisions_of_history_and_none_when_full(tmp_path):
    kv = EmbeddedKV(str(tmp_path / "kv.db"))
    compacted: list[int] = []

    async def compact(revision: int) -> None:
        compacted.append(revision)

    kv.compact = compact  # type: ignore[method-assign]

    async def puts(count: int) -> int:
        for n in range(count):
            await kv.put("k", str(n).encode())
        return (await kv.txn([], [])).revision

    try:
        compactor = Compactor(kv, keep=10)
        first = await puts(50)
        assert await compactor.run_once() is None  # the first run notes where history stands
        second = await puts(5)
        assert await compactor.run_once() == second - 10  # `keep` revisions stay
        third = await puts(100)
        assert await compactor.run_once() == second  # what the previous run saw: one interval stays
        assert await compactor.run_once() == third - 10  # no writes since: `keep` revisions stay
        assert await compactor.run_once() is None  # nothing more to forget
        assert await compactor.run_once(out_of_space=True) == third  # full: every old revision goes
        assert compacted == [second - 10, second, third - 10, third] and first < second
    finally:
        await kv.close()
