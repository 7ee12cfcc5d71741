"""Two regions on loopback, as users run them: each its own Ceph RGW and two nodes behind its own HAProxy.

Everything is a real process: a 3-member etcd shared by both regions, two Ceph RGW clusters (region a
on the session's, region b on one of this module's, which a test stops), four `wharf serve` and two
`haproxy`. Nodes reach their own region's RGW directly and the other's through a user-space delay
proxy (the kernel here has no netem), which can also hold the link. Every RGW is reached by clients
under a second loopback name (`localhost`, its `storage.s3.publicendpoint`) and by nodes under
127.0.0.1, so each redirect shows which name it was signed for, and RGW checks the signature.

Two RGW clusters and four nodes are heavy for two cores: the module shares one set of them, keeps
images small (one 12 MiB blob), and bounds every loop in count and time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from delay_proxy import DelayProxy
from haproxy import HAProxy
from oci_client import OCI_MANIFEST, Image, OCIClient, digest_of
from rgw_server import RGWServer
from s3_server import S3Endpoint
from services import EtcdCluster, wait_until
from wharf_process import WharfProcess

from node.storage import layout

LEASE_TTL = 3
# One way between the regions (a round trip costs twice this).
DELAY = 0.02
# Replication into each region, shared by the two nodes of the region that copies.
BANDWIDTH = 4 * 1024 * 1024
BIG_BLOB = 12 * 1024 * 1024
PUSH_LOOP_MAX = 24
PUSH_LOOP_SECONDS = 60.0
REPO = "regions/app"
_ANY = {"Accept": f"{OCI_MANIFEST}, */*"}


@dataclass
class Region:
    name: str
    rgw: S3Endpoint
    root: str  # storage.s3.rootdirectory in its bucket
    inbound: DelayProxy  # how the other region's nodes reach this region's RGW
    nodes: list[WharfProcess] = field(default_factory=list)
    lb: HAProxy | None = None

    @property
    def port(self) -> int:
        return int(urlsplit(self.rgw.endpoint).port or 0)

    @property
    def public(self) -> str:
        """The name clients reach this region's storage by (nodes use 127.0.0.1)."""
        return f"localhost:{self.port}"

    @property
    def url(self) -> str:
        assert self.lb is not None
        return self.lb.url

    def s3(self, *, through_proxy: bool) -> dict[str, Any]:
        endpoint = self.inbound.url if through_proxy else self.rgw.endpoint
        config = self.rgw.storage_config(self.root, regionendpoint=endpoint, publicendpoint=f"http://{self.public}")
        return dataclasses.asdict(config)

    def object_keys(self) -> set[str]:
        """Every object key under this region's root, as its RGW lists them (without the root)."""
        prefix = self.root.strip("/") + "/"
        return {k[len(prefix) :] for k in self.rgw.keys(prefix)}

    def read_object(self, key: str) -> bytes:
        client = self.rgw.client()
        try:
            return bytes(client.get_object(Bucket=self.rgw.bucket, Key=self.root.strip("/") + "/" + key)["Body"].read())
        finally:
            client.close()


@dataclass
class World:
    etcd: EtcdCluster
    prefix: str
    dir: Path
    a: Region
    b: Region

    def other(self, region: Region) -> Region:
        return self.b if region is self.a else self.a

    def settings(self, region: Region, node: str) -> dict[str, Any]:
        other = self.other(region)
        return {
            "storage": {"s3": region.s3(through_proxy=False), "delete": {"enabled": True}},
            "coordinator": {"etcd": {"endpoints": self.etcd.endpoints, "prefix": self.prefix}},
            "cluster": {"node": node, "leasettl": LEASE_TTL, "region": region.name},
            "regions": {other.name: {"storage": {"s3": other.s3(through_proxy=True)}, "bandwidth": BANDWIDTH}},
            # Collections run by hand here (`wharf gc`), never by a leader elected mid-test.
            "gc": {"enabled": False, "grace": "1h"},
            "backup": {"enabled": False},
        }

    def node(self, name: str) -> WharfProcess:
        return next(n for r in (self.a, self.b) for n in r.nodes if n.config["cluster"]["node"] == name)

    def etcd_keys(self, prefix: str) -> list[str]:
        return list(self.etcd.records(self.prefix, prefix))

    def copy_regions(self, digest: str) -> list[str]:
        """The region of every copy record of `digest` (one entry per record)."""
        return [k.split("/")[3] for k in self.etcd_keys(f"region/copy/{digest}/")]

    def lag(self, region: str, name: str = "wharf_replication_pending_blobs") -> float:
        """A replication lag gauge for `region`, as the leader (whichever node it is) reports it."""
        return max(_metric(n, name, region) for r in (self.a, self.b) for n in r.nodes)

    def fallback_reads(self, region: Region, source: str) -> float:
        """Reads `region`'s nodes served from region `source`'s storage."""
        return sum(_metric(n, "wharf_region_fallback_reads_total", source) for n in region.nodes)

    def status(self, region: Region, image: str | None = None) -> dict[str, Any]:
        args = [sys.executable, "-m", "node.cli", "replication", "status", "--json", str(region.nodes[0].config_path)]
        done = subprocess.run(
            args + ([image] if image else []),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(Path(__file__).resolve().parent.parent),
            env={k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")},
        )
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    def replicated(self, timeout: float = 90.0) -> None:
        """Wait until no copy waits for any region (the queues themselves, not the leader's gauge)."""
        wait_until(lambda: not self.etcd_keys("replicate/queue/"), timeout=timeout, interval=0.3, what="replication")


def _metric(node: WharfProcess, name: str, region: str) -> float:
    try:
        text = httpx.get(node.metrics_url, timeout=5, trust_env=False).text
    except httpx.HTTPError:
        return 0.0
    for line in text.splitlines():
        if line.startswith(f'{name}{{region="{region}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def http_client(url: str, **kwargs: Any) -> httpx.Client:
    return httpx.Client(base_url=url, trust_env=False, timeout=60.0, **kwargs)


def wait_routed(region: Region) -> None:
    """GET /v2/ through the region's HAProxy until both its nodes have answered one."""
    marker = f"route-{uuid.uuid4().hex}"
    with http_client(region.url) as lb:

        def both() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                lb.get("/v2/", headers={"X-Request-Id": marker})
            return all(marker in node.log_text() for node in region.nodes)

        wait_until(both, timeout=30, interval=0.2, what=f"HAProxy of region {region.name} to route to both nodes")


@pytest.fixture(scope="module")
def world(rgw_server: RGWServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    token = uuid.uuid4().hex[:10]
    base = tmp_path_factory.mktemp("regions")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        rgw_b = stack.enter_context(RGWServer(bucket="wharf-region-b"))
        etcd = stack.enter_context(EtcdCluster(3, heartbeat_ms=50, election_ms=500))
        regions = []
        for name, rgw in (("a", rgw_server), ("b", rgw_b)):
            root = f"/regions-{token}-{name}"
            if rgw is rgw_server:
                stack.callback(rgw_server.remove_prefix, root.strip("/") + "/")
            port = int(urlsplit(rgw.endpoint).port or 0)
            proxy = stack.enter_context(DelayProxy(("127.0.0.1", port), delay=DELAY))
            regions.append(Region(name, rgw, root, proxy))
        world = World(etcd, f"/wharf-regions-{token}/", base, regions[0], regions[1])
        for region in regions:
            for i in (1, 2):
                name = f"{region.name}{i}"
                node = WharfProcess(base / name, **world.settings(region, name))
                stack.callback(node.stop)
                region.nodes.append(node.start(timeout=60))
            region.lb = stack.enter_context(HAProxy(backends=[("127.0.0.1", n.port) for n in region.nodes]))
        for region in regions:
            wait_routed(region)
        yield world


def _push(region: Region, tag: str, layers: list[bytes], repo: str = REPO) -> Image:
    with http_client(region.url) as http:
        return OCIClient(http).push_image(repo, tag, layers=layers, config=json.dumps({"tag": tag}).encode())


def _blobs_of(image: Image) -> list[str]:
    doc = json.loads(image.body)
    return [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]


def _pull(region: Region, repo: str, reference: str) -> tuple[bytes, dict[str, bytes]]:
    """A whole image as a client in `region` gets it (following blob redirects): manifest, blob bytes."""
    with http_client(region.url, follow_redirects=True) as http:
        manifest = http.get(f"/v2/{repo}/manifests/{reference}", headers=_ANY)
        assert manifest.status_code == 200, (region.name, reference, manifest.text[:300])
        doc = json.loads(manifest.content)
        blobs = {}
        for digest in [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]:
            got = http.get(f"/v2/{repo}/blobs/{digest}")
            assert got.status_code == 200, (region.name, digest, got.status_code, got.text[:300])
            assert digest_of(got.content) == digest
            blobs[digest] = got.content
    return manifest.content, blobs


def _blob_get(region: Region, digest: str, repo: str = REPO) -> httpx.Response:
    with http_client(region.url) as http:
        return http.get(f"/v2/{repo}/blobs/{digest}")


def test_a_pull_in_b_right_after_a_push_in_a_is_served_from_a_then_redirected_to_b_and_lag_returns_to_zero(world):
    a, b = world.a, world.b
    b.inbound.hold()  # a's copies into b wait: the push burst below stays queued
    try:
        images = [_push(a, f"burst{i}", [os.urandom(40_000), os.urandom(30_000)]) for i in range(4)]
        objects = {image.digest for image in images} | {d for image in images for d in _blobs_of(image)}
        waiting_bytes = sum(
            len(image.body) + len(json.dumps({"tag": f"burst{i}"})) + 70_000 for i, image in enumerate(images)
        )
        # The lag rises: every object of the burst waits for region b, with its bytes and its age.
        wait_until(lambda: world.lag("b") >= len(objects), timeout=30, interval=0.3, what="the lag gauge to rise")
        assert world.lag("a") == 0
        assert world.lag("b", "wharf_replication_pending_bytes") == waiting_bytes
        wait_until(
            lambda: world.lag("b", "wharf_replication_oldest_pending_seconds") > 0,
            timeout=30,
            interval=0.3,
            what="the oldest copy's age",
        )
        # A pull in b at once: served from a, byte-identical, never redirected into b's storage.
        read_from_a = world.fallback_reads(b, "a")
        manifest, blobs = _pull(b, REPO, "burst0")
        assert manifest == images[0].body
        wait_until(  # the config and the layer at least (counters are written out between requests)
            lambda: world.fallback_reads(b, "a") >= read_from_a + 2, timeout=10, interval=0.2, what="reads from a"
        )
        layer = _blobs_of(images[0])[1]
        direct = _blob_get(b, layer)
        assert direct.status_code == 200 and digest_of(direct.content) == layer
        status = world.status(b, f"{REPO}:burst0")
        rows = {row["region"]: row for row in status["image"]["regions"]}
        assert rows["a"]["complete"] and not rows["b"]["complete"] and rows["b"]["missing"] == 4
        waiting = {row["region"]: row for row in status["regions"]}
        assert waiting["b"]["waiting"] >= len(objects) and waiting["b"]["oldest_seconds"] > 0
    finally:
        b.inbound.release()
    world.replicated()
    wait_until(lambda: world.lag("b") == 0, timeout=30, interval=0.3, what="the lag gauge to return to 0")
    assert world.lag("b", "wharf_replication_pending_bytes") == 0
    for digest in objects:
        assert world.copy_regions(digest).count("b") == 1
    # After replication: redirected to b's RGW (its public name), and the signature verifies there.
    redirected = _blob_get(b, layer)
    assert redirected.status_code == 307, redirected.text
    location = redirected.headers["Location"]
    assert urlsplit(location).netloc == b.public
    fetched = httpx.get(location, trust_env=False, timeout=30)
    assert fetched.status_code == 200 and digest_of(fetched.content) == layer
    status = world.status(b, f"{REPO}:burst0")
    assert all(row["complete"] for row in status["image"]["regions"])


def test_every_redirect_names_the_public_endpoint_whose_signature_verifies(world):
    pushed = {
        region.name: _push(region, f"public-{region.name}", [os.urandom(20_000)]) for region in (world.a, world.b)
    }
    world.replicated()
    for region in (world.a, world.b):
        for image in pushed.values():
            for digest in _blobs_of(image):
                response = _blob_get(region, digest)
                assert response.status_code == 307, (region.name, response.text)
                location = response.headers["Location"]
                assert urlsplit(location).netloc == region.public
                assert "127.0.0.1" not in location
                fetched = httpx.get(location, trust_env=False, timeout=30)
                assert fetched.status_code == 200 and digest_of(fetched.content) == digest


def test_pulls_in_b_succeed_from_a_while_b_storage_is_down_and_readiness_reports_the_fallback(world):
    a, b = world.a, world.b
    before = _push(a, "before-outage", [os.urandom(25_000)])
    world.replicated()
    assert isinstance(b.rgw, RGWServer)
    b.rgw.stop_gateway()
    try:

        def fallback_reported() -> bool:
            for node in b.nodes:
                response = httpx.get(node.url + "/debug/ready", timeout=10, trust_env=False)
                if response.status_code != 200 or "fallback" not in response.json():
                    return False
            return True

        wait_until(fallback_reported, timeout=30, interval=0.5, what="readiness in b to report the fallback")
        ready = httpx.get(b.nodes[0].url + "/debug/ready", timeout=10, trust_env=False).json()
        assert "pulls are served from region a" in ready["fallback"] and ready["regions"]["b"].startswith("unreachable")
        # Through b's HAProxy (its checks still pass): what b held, and what was pushed in a since.
        during = _push(a, "during-outage", [os.urandom(25_000)])
        for image in (before, during):
            manifest, _ = _pull(b, REPO, image.digest)
            assert manifest == image.body
        for digest in _blobs_of(before):
            response = _blob_get(b, digest)
            assert response.status_code == 200 and digest_of(response.content) == digest  # streamed from a
    finally:
        b.rgw.start_gateway()

    def recovered() -> bool:
        return all(
            "fallback" not in httpx.get(n.url + "/debug/ready", timeout=10, trust_env=False).json() for n in b.nodes
        )

    wait_until(recovered, timeout=30, interval=0.5, what="readiness in b to recover")
    world.replicated()  # copies queued during the outage are made once b answers
    assert "b" in world.copy_regions(_blobs_of(during)[1])


def test_a_replication_worker_killed_mid_copy_finishes_after_restart_and_b_holds_the_right_bytes(world):
    a, b = world.a, world.b
    data = os.urandom(BIG_BLOB)
    image = _push(a, "big", [data])
    digest = _blobs_of(image)[1]
    claim = f"replicate/copying/{digest}/b"

    def claimer() -> str | None:
        value = world.etcd.records(world.prefix, claim).get(claim)
        return json.loads(value)["node"] if value else None

    holder = wait_until(claimer, timeout=30, interval=0.1, what="a worker in a to claim the copy")
    node = world.node(holder)
    # Killed mid-copy: at least 1 MiB has gone out of its 12 (at 2 MiB/s its share of the bandwidth).
    wait_until(
        lambda: _metric(node, "wharf_replication_bytes_total", "b") >= 1024 * 1024,
        timeout=30,
        interval=0.1,
        what="the copy to be under way",
    )
    node.kill()
    assert world.copy_regions(digest).count("b") == 0
    node.start(timeout=60)
    wait_until(lambda: "b" in world.copy_regions(digest), timeout=90, interval=0.3, what="the copy to complete")
    assert world.copy_regions(digest).count("b") == 1
    assert not world.etcd_keys(f"replicate/copying/{digest}/") and not world.etcd_keys(f"replicate/queue/b/{digest}")
    stored = b.read_object(layout.blob_key(digest))
    assert len(stored) == BIG_BLOB and "sha256:" + hashlib.sha256(stored).hexdigest() == digest
    manifest, blobs = _pull(b, REPO, "big")
    assert manifest == image.body and blobs[digest] == data


def test_gc_after_deletes_in_a_removes_the_blobs_from_both_rgws_and_keeps_every_tagged_image_under_a_push_loop(world):
    a, b = world.a, world.b
    kept = [_push(a, f"kept{i}", [os.urandom(20_000)]) for i in range(2)]
    doomed = [_push(a, f"doomed{i}", [os.urandom(20_000), os.urandom(10_000)]) for i in range(2)]
    world.replicated()
    doomed_objects = {image.digest for image in doomed} | {d for image in doomed for d in _blobs_of(image)}
    for region in (a, b):
        assert {layout.blob_key(d) for d in doomed_objects} <= region.object_keys()
    with http_client(a.url) as http:
        for image in doomed:
            assert http.delete(f"/v2/{REPO}/manifests/{image.digest}").status_code == 202

    pushed: list[tuple[str, Image]] = []
    failures: list[str] = []
    stop = threading.Event()

    def push_loop() -> None:
        deadline = time.monotonic() + PUSH_LOOP_SECONDS
        shared = os.urandom(15_000)  # a base layer every loop image shares
        for i in range(PUSH_LOOP_MAX):
            if stop.is_set() or time.monotonic() > deadline:
                return
            region = (a, b)[i % 2]
            tag = f"loop{i}"
            try:
                pushed.append((tag, _push(region, tag, [shared, os.urandom(8_000)], repo=f"{REPO}-loop")))
            except Exception as exc:  # noqa: BLE001 - recorded, then failed on below
                failures.append(f"{tag} in {region.name}: {exc!r}")

    loop = threading.Thread(target=push_loop)
    loop.start()
    try:
        wait_until(lambda: len(pushed) >= 2, timeout=60, interval=0.2, what="the push loop to start")
        for _ in range(2):
            done = subprocess.run(
                [sys.executable, "-m", "node.cli", "gc", str(a.nodes[0].config_path)],
                capture_output=True,
                text=True,
                timeout=180,
                cwd=str(Path(__file__).resolve().parent.parent),
                env={k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")},
            )
            assert done.returncode == 0, done.stdout + done.stderr
    finally:
        stop.set()
        loop.join(PUSH_LOOP_SECONDS + 60)
    assert not failures, failures
    world.replicated()
    for region in (a, b):
        stored = region.object_keys()
        assert not {layout.blob_key(d) for d in doomed_objects} & stored, region.name
    for digest in doomed_objects:
        assert world.copy_regions(digest) == []
    for region in (a, b):
        for image in kept:
            manifest, _ = _pull(region, REPO, image.digest)
            assert manifest == image.body
        for tag, image in pushed:
            manifest, _ = _pull(region, f"{REPO}-loop", tag)
            assert manifest == image.body, (region.name, tag)


def test_the_maintenance_page_shows_each_regions_replication_lag(world):
    a, b = world.a, world.b

    def rows() -> dict[str, list[str]]:
        with http_client(a.url) as http:
            page = http.get("/ui/maintenance")
        assert page.status_code == 200, page.text[:300]
        table = re.search(r'data-testid="regions">(.*?)</table>', page.text, re.S)
        assert table is not None, page.text[:2000]
        found = {}
        for row in re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S):
            cells = [re.sub(r"<[^>]+>|\s+", " ", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            if cells:
                found[cells[0].split()[0]] = cells
        return found

    b.inbound.hold()
    try:
        _push(a, "ui-lag", [os.urandom(10_000)])
        wait_until(lambda: int(rows()["b"][1]) >= 1, timeout=30, interval=0.3, what="b's lag on the page")
        assert rows()["a"][1] == "0" and "(this node)" in " ".join(rows()["a"])
    finally:
        b.inbound.release()
    world.replicated()
    wait_until(lambda: rows()["b"][1] == "0", timeout=30, interval=0.3, what="b's lag back to 0 on the page")
