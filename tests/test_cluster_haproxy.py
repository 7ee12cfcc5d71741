"""The cluster as users run it: three Wharf nodes on S3 and a 3-member etcd, HAProxy round robin in front.

Everything is a real process on loopback: `etcd` x3, the session's S3 server, three `wharf serve`
started from the same settings (S3 under a root directory of this module, etcd under a key prefix of
this module) and Debian's `haproxy` checking `/debug/ready`. Clients are Debian's `skopeo` and httpx.

The module runs on moto and again on a real Ceph RADOS Gateway; tests whose subject is not S3 (node
and etcd faults, per-node secrets) run on moto only. Blob GETs are redirected to presigned S3 URLs
(`storage.redirect.disable` is false), so every skopeo pull below also fetches its layers from the
S3 server, and on RGW each of those URLs' signatures is checked (moto checks none). Images are
small; the one 1 GiB test runs on RGW only (~4x faster than moto here, which would also keep the
GiB in its memory), under a root directory of its own that it removes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.client import HTTPConnection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from haproxy import HAProxy
from images import assert_same_image, make_image, make_index, read_layout
from oci_client import OCIClient, digest_of
from s3_server import S3Endpoint
from services import EtcdCluster, wait_until
from skopeo import SkopeoResult, pull, push, retry_args, try_push
from wharf_process import WharfProcess

LEASE_TTL = 3
NODES = 3
SKOPEO_TIMEOUT = 120.0
KIB = 1024
MIB = 1024 * KIB
BIG_BLOB = 1 << 30  # 1 GiB
# Issue 13: a node's resident memory, all its processes together, idle and while taking 1 GiB.
IDLE_LIMIT_MIB = 100
UPLOAD_LIMIT_MIB = 150
# The fault test pushes until this many pushes or this many seconds, whichever comes first.
FAULT_MAX_PUSHES = 30
FAULT_MAX_SECONDS = 90.0
_ANY = {"Accept": "*/*"}
# The S3 servers the module runs on, by parameter id.
S3_SERVERS = {"moto": "s3_server", "rgw": "rgw_server"}
# For tests whose subject is not S3: they run once, on moto.
ON_MOTO_ONLY = pytest.mark.parametrize("cluster", ["moto"], indirect=True)
# For the test that stores a GiB: RGW takes it ~4x faster than moto, and out of moto's memory.
ON_RGW_ONLY = pytest.mark.parametrize("cluster", ["rgw"], indirect=True)


# -- the cluster -----------------------------------------------------------------------------------


@dataclass
class Cluster:
    etcd: EtcdCluster
    s3: S3Endpoint
    root: str  # storage.s3.rootdirectory of the nodes
    prefix: str  # coordinator.etcd.prefix of the nodes
    dir: Path
    nodes: list[WharfProcess] = field(default_factory=list)
    haproxy: HAProxy | None = None

    @property
    def lb(self) -> HAProxy:
        assert self.haproxy is not None
        return self.haproxy

    def settings(
        self, name: str, *, root: str | None = None, prefix: str | None = None, redirect_disable: bool = False
    ) -> dict[str, Any]:
        """WharfProcess keyword arguments: the settings every node of this cluster is started from."""
        s3 = dataclasses.asdict(self.s3.storage_config(root or self.root))
        return {
            "storage": {"s3": s3, "delete": {"enabled": True}, "redirect": {"disable": redirect_disable}},
            "coordinator": {"etcd": {"endpoints": self.etcd.endpoints, "prefix": prefix or self.prefix}},
            "cluster": {"node": name, "leasettl": LEASE_TTL},
        }

    def new_node(self, name: str, **kwargs: Any) -> WharfProcess:
        """A node (not started) on this cluster's storage and etcd, in a data dir of its own."""
        return WharfProcess(self.dir / name, **self.settings(name, **kwargs))


def http_client(url: str, **kwargs: Any) -> httpx.Client:
    # trust_env=False: loopback must never go through a proxy named in the environment.
    return httpx.Client(base_url=url, trust_env=False, timeout=60.0, **kwargs)


def fetch_blob(url: str, repo: str, digest: str) -> bytes:
    """A blob as a client gets it from the registry at `url`: following its redirect to S3."""
    with http_client(url, follow_redirects=True) as http:
        response = http.get(f"/v2/{repo}/blobs/{digest}")
    assert response.status_code == 200, (url, repo, digest, response.status_code, response.text[:300])
    return response.content


def access_entry(node: WharfProcess, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
    """The access line of one request (written just after its response: wait for it a little)."""

    def find() -> dict[str, Any] | None:
        for line in node.log_text().splitlines():
            if f'"request_id": "{request_id}"' in line:
                return dict(json.loads(line))
        return None

    return dict(wait_until(find, timeout=timeout, what=f"the access line of {request_id} in {node.url}'s log"))


def served_by(nodes: list[WharfProcess], request_id: str, timeout: float = 5.0) -> list[int]:
    """Indexes of the nodes whose access log has a line with `request_id` (waits for one to have it)."""

    def where() -> list[int]:
        return [i for i, node in enumerate(nodes) if f'"request_id": "{request_id}"' in node.log_text()]

    return list(wait_until(where, timeout=timeout, what=f"an access line for {request_id}"))


def wait_routed_to(cluster: Cluster, node: WharfProcess, timeout: float = 20.0) -> None:
    """Send GET /v2/ through HAProxy until one of them reaches `node` (its health checks saw it up)."""
    marker = f"route-{uuid.uuid4().hex}"
    with http_client(cluster.lb.url) as lb:

        def reached() -> bool:
            try:
                lb.get("/v2/", headers={"X-Request-Id": marker})
            except httpx.HTTPError:
                return False
            return marker in node.log_text()

        wait_until(reached, timeout=timeout, interval=0.2, what=f"HAProxy to route to {node.url}")


@pytest.fixture(scope="module", params=list(S3_SERVERS))
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    s3_server: S3Endpoint = request.getfixturevalue(S3_SERVERS[request.param])
    token = uuid.uuid4().hex[:10]
    base = tmp_path_factory.mktemp("cluster")
    with contextlib.ExitStack() as stack:
        # Unwound in reverse: HAProxy, nodes, etcd, then the bucket prefix and the data dirs.
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        root = f"/cluster-{token}"
        stack.callback(s3_server.remove_prefix, root.strip("/") + "/")
        etcd = stack.enter_context(EtcdCluster(3, heartbeat_ms=50, election_ms=500))
        cluster = Cluster(etcd=etcd, s3=s3_server, root=root, prefix=f"/wharf-cluster-{token}/", dir=base)
        for i in range(NODES):
            node = cluster.new_node(f"node{i}")
            stack.callback(node.stop)
            cluster.nodes.append(node.start())
        cluster.haproxy = stack.enter_context(HAProxy(backends=[("127.0.0.1", n.port) for n in cluster.nodes]))
        for node in cluster.nodes:
            wait_routed_to(cluster, node)
        yield cluster


@pytest.fixture()
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A test's scratch directory (OCI layouts), removed when the test is done."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


# -- images ----------------------------------------------------------------------------------------


def build_images(layout: Path, count: int, *, bases: int = 4, first_seed: int = 0) -> list[tuple[str, str]]:
    """`count` distinct images in one OCI layout: (tag, repository) pairs.

    Images built from the same seed share their first layers (`make_image` draws layers from one
    seeded stream), so image k of a base holds the base's first layers and more on top: base
    layers are pushed by several images, and some pushes find them already there.
    """
    built = []
    for i in range(count):
        seed = first_seed + i % bases
        layers = 2 + i // bases
        tag = f"s{seed}-l{layers}"
        make_image(layout, tag, layers=layers, layer_size=32 * KIB, seed=seed)
        built.append((tag, f"cluster/base{seed}"))
    return built


def layer_sharing(layout: Path, tags: list[str]) -> int:
    """How many layer digests appear in more than one of the tagged images."""
    seen: dict[str, int] = {}
    source = read_layout(layout)
    for tag in tags:
        manifest = source.blob(source.resolve(tag)["digest"])
        for layer in json.loads(manifest)["layers"]:
            seen[layer["digest"]] = seen.get(layer["digest"], 0) + 1
    return sum(1 for n in seen.values() if n > 1)


# -- pushing and pulling through HAProxy -----------------------------------------------------------


def test_twenty_images_pushed_through_haproxy_pull_back_byte_identical(cluster: Cluster, workdir: Path) -> None:
    layout = workdir / "src"
    images = build_images(layout, 20, first_seed=100)
    assert layer_sharing(layout, [tag for tag, _ in images]) >= 4, "the images should share base layers"
    host = cluster.lb.host

    def push_one(item: tuple[str, str]) -> None:
        tag, repo = item
        push(layout, tag, f"{host}/{repo}:{tag}", "--preserve-digests", timeout=SKOPEO_TIMEOUT)

    def pull_one(item: tuple[str, str]) -> str:
        tag, repo = item
        out = workdir / "out" / tag  # a layout per image: parallel pulls never share an index.json
        pull(f"{host}/{repo}:{tag}", out, tag, "--preserve-digests", timeout=SKOPEO_TIMEOUT)
        return assert_same_image(layout, tag, out, tag)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(push_one, images))
        marks = [len(node.log_text()) for node in cluster.nodes]
        digests = list(pool.map(pull_one, images))

    source = read_layout(layout)
    assert digests == [source.resolve(tag)["digest"] for tag, _ in images]
    # skopeo fetched the blobs from S3: every blob GET was answered with a redirect, by every node.
    expected = sum(len(json.loads(source.blob(d))["layers"]) + 1 for d in digests)

    def blob_gets() -> list[list[dict[str, Any]]]:
        return [
            [e for e in node.access_log(mark) if e["method"] == "GET" and e["route"].endswith("/blobs/{digest}")]
            for node, mark in zip(cluster.nodes, marks, strict=True)
        ]

    # Access lines are written just after each response: wait a little for the last ones.
    wait_until(lambda: sum(map(len, blob_gets())) >= expected, timeout=5, what=f"{expected} blob GETs logged")
    gets = blob_gets()
    assert all(gets), f"HAProxy did not spread blob GETs over the nodes: {[len(g) for g in gets]}"
    statuses = {e["status"] for per_node in gets for e in per_node}
    assert statuses == {307}, f"blob GET statuses while pulling: {statuses}"
    # Every node answers for every image: tags went to the coordinator, not to one node's memory.
    for node in cluster.nodes:
        with http_client(node.url) as http:
            for tag, repo in images:
                head = http.head(f"/v2/{repo}/manifests/{tag}", headers=_ANY)
                assert head.status_code == 200, (node.url, repo, tag, head.status_code)
                assert head.headers["docker-content-digest"] == source.resolve(tag)["digest"]


def test_multi_arch_index_through_haproxy_round_trips_byte_identical(cluster: Cluster, workdir: Path) -> None:
    platforms = [("linux", "amd64"), ("linux", "arm64"), ("linux", "ppc64le")]
    index = make_index(workdir / "src", "multi", platforms=platforms, layer_size=32 * KIB, seed=200)
    destination = f"{cluster.lb.host}/cluster/multi:v1"
    push(workdir / "src", "multi", destination, "--all", "--preserve-digests", timeout=SKOPEO_TIMEOUT)

    pull(destination, workdir / "out", "multi", "--all", "--preserve-digests", timeout=SKOPEO_TIMEOUT)
    assert assert_same_image(workdir / "src", "multi", workdir / "out", "multi") == index.digest
    with http_client(cluster.nodes[2].url) as http:
        got = http.get("/v2/cluster/multi/manifests/v1", headers=_ANY)
        assert got.status_code == 200
        assert got.content == read_layout(workdir / "src").blob(index.digest)
        for image in index.images.values():
            child = http.head(f"/v2/cluster/multi/manifests/{image.digest}", headers=_ANY)
            assert child.status_code == 200, image.digest


# -- faults ----------------------------------------------------------------------------------------


@dataclass
class Push:
    number: int
    tag: str
    repo: str
    started: float
    finished: float
    result: SkopeoResult

    @property
    def reference(self) -> str:
        return f"{self.repo}:{self.tag}"


class Faults(threading.Thread):
    """SIGKILL a node and restart it, then stop an etcd member and restart it, while pushes go on.

    Each step waits for a time after the start and for a number of pushes to have begun, so faults
    land in the middle of the push loop however fast or slow the pushes are.
    """

    SCHEDULE = ((1.5, 2, "kill node"), (5.0, 6, "start node"), (7.0, 10, "stop member"), (12.0, 15, "start member"))

    def __init__(self, cluster: Cluster, *, node: int, member: int) -> None:
        super().__init__(name="faults", daemon=True)
        self.cluster = cluster
        self.node = cluster.nodes[node]
        self.member = member
        self.t0 = time.monotonic()
        self.pushes_begun = 0  # the push loop counts here
        self.loop_over = threading.Event()
        self.events: list[str] = []
        self.at: dict[str, float] = {}  # step -> time.monotonic() when it was done
        self.error: BaseException | None = None
        self.done = threading.Event()

    def _wait(self, seconds: float, pushes: int) -> None:
        deadline = self.t0 + FAULT_MAX_SECONDS + 30
        while time.monotonic() < deadline and not self.loop_over.is_set():
            if time.monotonic() >= self.t0 + seconds and self.pushes_begun >= pushes:
                return
            time.sleep(0.05)

    def _log(self, what: str) -> None:
        self.events.append(f"{time.monotonic() - self.t0:.1f}s (push {self.pushes_begun}) {what}")

    def run(self) -> None:
        etcd = self.cluster.etcd
        try:
            for seconds, pushes, step in self.SCHEDULE:
                self._wait(seconds, pushes)
                self.at[step] = time.monotonic()
                if step == "kill node":
                    self.node.kill()
                    self._log(f"SIGKILL node {self.node.url}")
                elif step == "start node":
                    self.node.start()
                    self._log(f"node {self.node.url} ready again")
                elif step == "stop member":
                    etcd.stop_member(self.member)
                    self._log(f"stopped etcd member {self.member} ({etcd.endpoint(self.member)})")
                else:
                    etcd.start_member(self.member)
                    self._log(f"etcd member {self.member} healthy again")
                self.at[f"{step} done"] = time.monotonic()
        except BaseException as exc:  # reported by the test
            self.error = exc
            self._log(f"fault schedule failed: {exc!r}")
        finally:
            self.done.set()

    def window(self, first: str, last: str) -> tuple[float, float]:
        """From when step `first` began to when step `last` was done (never, if it was not)."""
        return self.at.get(first, float("inf")), self.at.get(f"{last} done", float("inf"))

    def heal(self) -> None:
        """Whatever happened: the node and the member run again (the module's other tests need them)."""
        self.loop_over.set()
        self.join(60)
        if self.node.proc is None:
            self.node.start()
        if not self.cluster.etcd.running(self.member):
            self.cluster.etcd.start_member(self.member)


@ON_MOTO_ONLY
def test_pushes_through_haproxy_survive_a_killed_node_and_a_stopped_etcd_member(
    cluster: Cluster, workdir: Path
) -> None:
    """Every push skopeo reports as successful is pullable byte-identical afterwards."""
    layout = workdir / "src"
    images = build_images(layout, FAULT_MAX_PUSHES, first_seed=300)
    retries = retry_args(3)
    host = cluster.lb.host
    pushes: list[Push] = []
    # Member 0 is the first endpoint every node names, so its clients have to fail over.
    faults = Faults(cluster, node=1, member=0)
    t0 = time.monotonic()
    faults.start()
    healed_at: float | None = None
    try:
        for number, (tag, repo) in enumerate(images):
            now = time.monotonic()
            if now - t0 > FAULT_MAX_SECONDS:
                break
            if healed_at is None and faults.done.is_set():
                healed_at = now
            if healed_at is not None and sum(p.started >= healed_at for p in pushes) >= 3:
                break  # three pushes begun after the last fault was healed are enough
            faults.pushes_begun += 1
            result = try_push(layout, tag, f"{host}/{repo}:{tag}", *retries, "--preserve-digests", timeout=60)
            pushes.append(Push(number, tag, repo, now, time.monotonic(), result))
    finally:
        faults.heal()
    elapsed = time.monotonic() - t0

    # Back to a healthy cluster before pulling: every node up and routed to by HAProxy.
    cluster.etcd.wait_healthy()
    for node in cluster.nodes:
        wait_routed_to(cluster, node)

    failed = [p for p in pushes if not p.result.ok]
    succeeded = [p for p in pushes if p.result.ok]

    def during(first: str, last: str) -> str:
        begin, end = faults.window(first, last)
        hit = [p for p in pushes if p.started <= end and p.finished >= begin]
        return f"{len(hit)} pushes overlapped it, {sum(not p.result.ok for p in hit)} failed"

    summary = (
        f"{len(pushes)} pushes in {elapsed:.0f}s, {len(failed)} failed as the client saw "
        f"(skopeo {' '.join(retries) or 'without --retry-times'}); "
        f"node down: {during('kill node', 'start node')}; "
        f"etcd member down: {during('stop member', 'start member')}; faults: {faults.events}"
    )
    print(f"\nfault test: {summary}")
    for p in failed:
        print(f"  push {p.number} ({p.reference}) at {p.started - t0:.1f}s failed:\n{p.result.describe()[-1500:]}")
    assert faults.error is None, f"{summary}: {faults.error!r}"

    lost: list[str] = []

    def pull_back(p: Push) -> None:
        out = workdir / "out" / p.tag
        try:
            pull(f"{host}/{p.reference}", out, p.tag, "--preserve-digests", timeout=SKOPEO_TIMEOUT)
            assert_same_image(layout, p.tag, out, p.tag)
        except AssertionError as exc:
            lost.append(f"push {p.number} {p.reference}: {str(exc)[-800:]}")

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(pull_back, succeeded))
    assert not lost, f"{summary}; {len(lost)} of {len(succeeded)} successful pushes not pullable:\n" + "\n".join(lost)
    assert succeeded, f"no push succeeded: {summary}"
    # Once every fault is healed, pushes work again (none begun later may fail).
    after = [p for p in pushes if healed_at is not None and p.started >= healed_at]
    assert all(p.result.ok for p in after), f"a push begun after every fault was healed failed: {summary}"


# -- pull redirects --------------------------------------------------------------------------------


def test_blob_get_redirects_to_a_presigned_url_that_serves_the_bytes(cluster: Cluster) -> None:
    data = random.Random(400).randbytes(300 * KIB)
    repo = f"cluster/redirect-{uuid.uuid4().hex[:8]}"
    with http_client(cluster.nodes[0].url) as first:
        image = OCIClient(first).push_image(repo, "v1", layers=[data])
    digest = digest_of(data)
    for url in [cluster.nodes[1].url, cluster.lb.url]:
        with http_client(url) as http:
            answer = http.get(f"/v2/{repo}/blobs/{digest}")
            assert answer.status_code == 307, (url, answer.status_code, answer.text[:300])
            assert answer.headers["docker-content-digest"] == digest
            target = answer.headers["location"]
            parts = urlsplit(target)
            assert f"{parts.scheme}://{parts.netloc}" == cluster.s3.endpoint, target
            assert parts.path.startswith(f"/{cluster.s3.bucket}{cluster.root}/"), target
            assert "Signature=" in parts.query, f"not a presigned URL: {target}"
            # Manifests are always served by the node.
            manifest = http.get(f"/v2/{repo}/manifests/v1", headers=_ANY)
            assert manifest.status_code == 200 and manifest.content == image.body
        with httpx.Client(trust_env=False, timeout=60) as plain:
            fetched = plain.get(target)
        assert fetched.status_code == 200, fetched.text[:300]
        assert fetched.content == data


def test_blob_head_is_answered_by_the_node_without_redirect_or_reading_the_blob(cluster: Cluster) -> None:
    """HEAD says whether a blob exists and its size: the coordinator knows both.

    A redirect would be wrong twice: the URL is presigned for GET, and S3 (v4 signatures include the
    method) refuses a HEAD on it; and Distribution signs HEAD redirects separately for that reason.
    Streaming the blob to answer a HEAD reads it whole from S3 for nothing.
    """
    data = random.Random(402).randbytes(2 * MIB)
    repo = f"cluster/head-{uuid.uuid4().hex[:8]}"
    with http_client(cluster.lb.url) as lb:
        OCIClient(lb).push_image(repo, "v1", layers=[data])
    digest = digest_of(data)
    with cluster.new_node("head-streaming", redirect_disable=True) as streaming:
        for node in (cluster.nodes[0], streaming):
            request_id = f"head-{uuid.uuid4().hex}"
            with http_client(node.url) as http:
                head = http.head(f"/v2/{repo}/blobs/{digest}", headers={"X-Request-Id": request_id})
            assert head.status_code == 200, (node.url, head.status_code, dict(head.headers))
            assert head.headers["content-length"] == str(len(data))
            assert head.headers["docker-content-digest"] == digest
            entry = access_entry(node, request_id)
            assert entry["bytes_out"] == 0, f"{node.url} produced a body for HEAD: {entry}"


def test_node_with_redirects_disabled_streams_blobs_itself(cluster: Cluster) -> None:
    data = random.Random(401).randbytes(700 * KIB)
    repo = f"cluster/stream-{uuid.uuid4().hex[:8]}"
    with http_client(cluster.lb.url) as lb:
        OCIClient(lb).push_image(repo, "v1", layers=[data])
    digest = digest_of(data)
    with cluster.new_node("streaming", redirect_disable=True) as node, http_client(node.url) as http:
        whole = http.get(f"/v2/{repo}/blobs/{digest}")
        assert whole.status_code == 200, (whole.status_code, whole.headers, whole.text[:300])
        assert whole.headers["docker-content-digest"] == digest
        assert whole.content == data
        ranged = http.get(f"/v2/{repo}/blobs/{digest}", headers={"Range": "bytes=1000-199999"})
        assert ranged.status_code == 206
        assert ranged.content == data[1000:200000]
    with http_client(cluster.nodes[0].url) as redirecting:
        assert redirecting.get(f"/v2/{repo}/blobs/{digest}").status_code == 307


# -- no shared secret ------------------------------------------------------------------------------


@ON_MOTO_ONLY
def test_nodes_with_different_secrets_serve_cross_node_uploads_through_haproxy(cluster: Cluster, workdir: Path) -> None:
    """Nodes share nothing but S3 and etcd: `http.secret` differs on each and is accepted, unused."""
    nodes = []
    for i in range(NODES):
        node = cluster.new_node(f"secret{i}")
        node.config["http"]["secret"] = f"a-secret-only-node-{i}-knows-{uuid.uuid4().hex}"
        node.config_path.write_text(yaml.safe_dump(node.config))
        nodes.append(node)
    with contextlib.ExitStack() as stack:
        for node in nodes:
            stack.enter_context(node)
        lb = stack.enter_context(HAProxy(backends=[("127.0.0.1", n.port) for n in nodes]))
        secret_cluster = dataclasses.replace(cluster, nodes=nodes, haproxy=lb)
        for node in nodes:
            wait_routed_to(secret_cluster, node)

        # One chunked upload: POST, PATCH, PATCH, PUT on one kept-alive client connection.
        data = os.urandom(2 * MIB + 11)
        digest = digest_of(data)
        request_ids = [f"secret-{uuid.uuid4().hex}" for _ in range(4)]
        with http_client(lb.url) as http:
            started = http.post("/v2/secret/app/blobs/uploads/", headers={"X-Request-Id": request_ids[0]})
            assert started.status_code == 202, started.text
            location = started.headers["location"]
            half = len(data) // 2
            for i, (first, last) in enumerate([(0, half - 1), (half, len(data) - 1)], start=1):
                patched = http.patch(
                    location,
                    content=data[first : last + 1],
                    headers={"Content-Range": f"{first}-{last}", "X-Request-Id": request_ids[i]},
                )
                assert patched.status_code == 202, patched.text
                location = patched.headers["location"]
            done = http.put(location, params={"digest": digest}, headers={"X-Request-Id": request_ids[3]})
            assert done.status_code == 201, done.text
            for node in nodes:
                assert fetch_blob(node.url, "secret/app", digest) == data
        landed = [served_by(nodes, rid) for rid in request_ids]
        assert all(len(where) == 1 for where in landed), landed
        assert len({where[0] for where in landed}) >= 2, f"HAProxy sent the whole upload to one node: {landed}"

        # And skopeo, whose uploads round robin over the three nodes.
        layout = workdir / "src"
        images = build_images(layout, 6, bases=2, first_seed=600)
        for tag, repo in images:
            push(layout, tag, f"{lb.host}/{repo}:{tag}", timeout=SKOPEO_TIMEOUT)
        for tag, repo in images:
            pull(f"{lb.host}/{repo}:{tag}", workdir / "out" / tag, tag, timeout=SKOPEO_TIMEOUT)
            assert_same_image(layout, tag, workdir / "out" / tag, tag)


# -- memory on a 1 GiB blob ------------------------------------------------------------------------


def big_chunks(total: int = BIG_BLOB, chunk: int = MIB, seed: int = 7) -> Iterator[bytes]:
    """`total` bytes of deterministic content, made one chunk at a time (never all in memory)."""
    block = random.Random(seed).randbytes(chunk)
    for i in range(total // chunk):
        yield i.to_bytes(8, "big") + block[8:]  # every chunk differs from every other


@ON_RGW_ONLY
@pytest.mark.timeout(900)
def test_node_on_s3_stays_within_100_mib_idle_and_150_mib_taking_a_1gib_blob(cluster: Cluster) -> None:
    """Issue 13's goals for a node on S3 and etcd, all its processes together (PSS). One worker, this
    machine's `auto` (2 cores): each further worker is a process of its own (loadtests/bench_hotpaths.py)."""
    token = uuid.uuid4().hex[:10]
    root = f"/cluster-big-{token}"  # of its own: removed (and the server's memory freed) whatever happens
    hasher = hashlib.sha256()
    for chunk in big_chunks():
        hasher.update(chunk)
    digest = "sha256:" + hasher.hexdigest()
    try:
        settings = cluster.settings("big", root=root, prefix=f"/wharf-big-{token}/")
        with WharfProcess(cluster.dir / "big", http={"workers": 1}, **settings) as node:
            idle = node.memory_mib()
            with http_client(node.url) as http:
                started = http.post("/v2/cluster/big/blobs/uploads/")
                assert started.status_code == 202, started.text
                location = started.headers["location"]
            path = location if location.startswith("/") else urlsplit(location).path + "?" + urlsplit(location).query
            path += ("&" if "?" in path else "?") + "digest=" + digest

            def put() -> float:
                began = time.monotonic()
                connection = HTTPConnection("127.0.0.1", node.port, timeout=600)
                try:
                    connection.putrequest("PUT", path)
                    connection.putheader("Content-Type", "application/octet-stream")
                    connection.putheader("Content-Length", str(BIG_BLOB))
                    connection.endheaders()
                    for chunk in big_chunks():
                        connection.send(chunk)
                    response = connection.getresponse()
                    body = response.read()
                    assert response.status == 201, (response.status, body[:500])
                    assert response.getheader("Docker-Content-Digest") == digest
                finally:
                    connection.close()
                return time.monotonic() - began

            took, peak = node.memory_peak_mib(put)
            print(
                f"\n1 GiB monolithic PUT on S3: node memory (PSS) idle {idle:.1f} MiB, at most {peak:.1f} MiB "
                f"while taking it, {took:.0f}s ({BIG_BLOB / MIB / took:.0f} MiB/s)"
            )
            with http_client(node.url) as http:
                found = http.get(f"/v2/cluster/big/blobs/{digest}")
            assert found.status_code == 307 and found.headers["docker-content-digest"] == digest, found.text
            # The object the redirect names holds all of it (asked of S3 itself, not downloaded).
            key = urlsplit(found.headers["location"]).path.removeprefix(f"/{cluster.s3.bucket}/")
            client = cluster.s3.client()
            try:
                assert client.head_object(Bucket=cluster.s3.bucket, Key=key)["ContentLength"] == BIG_BLOB
            finally:
                client.close()
            assert idle <= IDLE_LIMIT_MIB, f"idle node memory {idle:.1f} MiB > {IDLE_LIMIT_MIB} MiB"
            assert peak <= UPLOAD_LIMIT_MIB, f"node memory {peak:.1f} MiB (idle {idle:.1f}) > {UPLOAD_LIMIT_MIB} MiB"
    finally:
        cluster.s3.remove_prefix(root.strip("/") + "/")
