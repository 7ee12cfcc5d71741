"""Draining one node: `CONFIG.drain` makes `/debug/ready` answer 503 while the node goes on serving.

A load balancer that health-checks readiness (HAProxy on `GET /debug/ready`, as in deploy/) then
stops sending the node new requests, and the requests it already has run to their end; this is how
ansible/rolling-upgrade.yml takes a node out before stopping it. `/debug/health` stays 200 and names
the version the node runs.
"""

from __future__ import annotations

import importlib.metadata
import threading
import uuid
from pathlib import Path

import httpx
from haproxy import HAProxy
from oci_client import digest_of
from services import EtcdCluster, wait_until
from wharf_process import WharfProcess


def _ready(node: WharfProcess) -> httpx.Response:
    return httpx.get(node.url + "/debug/ready", timeout=10)


def _version_checks(node: WharfProcess) -> int:
    """How many `GET /v2/` the node has logged (HAProxy's readiness checks are not among them)."""
    return sum(1 for line in node.access_log() if line["route"] == "/v2/")


def test_drain_file_fails_readiness_while_the_node_serves(tmp_path):
    with WharfProcess(tmp_path / "node") as node:
        drain = Path(str(node.config_path) + ".drain")
        assert _ready(node).status_code == 200
        drain.write_text("rolling upgrade\n")
        response = _ready(node)
        assert response.status_code == 503
        body = response.json()
        assert body.pop("coordinator_space").endswith("in use"), "the coordinator's room is reported beside"
        assert body == {
            "coordinator": "ok",
            "storage": "ok",
            "drain": f"draining: {drain} exists",
            "readonly": "writable",
        }
        # Still serving everything, liveness included.
        with httpx.Client(base_url=node.url, timeout=30) as client:
            blob = b"pushed while draining"
            start = client.post("/v2/team/drain/blobs/uploads/")
            assert start.status_code == 202
            put = client.put(start.headers["Location"], params={"digest": digest_of(blob)}, content=blob)
            assert put.status_code == 201
            assert client.get(f"/v2/team/drain/blobs/{digest_of(blob)}").content == blob
        assert httpx.get(node.url + "/debug/health", timeout=10).status_code == 200
        drain.unlink()
        assert _ready(node).status_code == 200


def test_health_names_the_running_version(tmp_path):
    with WharfProcess(tmp_path / "node") as node:
        response = httpx.get(node.url + "/debug/health", timeout=10)
    assert response.status_code == 200
    assert response.json() == {"version": importlib.metadata.version("wharf")}


def test_draining_node_leaves_haproxy_and_finishes_its_request(tmp_path, etcd: EtcdCluster):
    """An upload streaming into the node when it is drained completes; new requests go to the other."""
    prefix = f"/wharf-test-{uuid.uuid4().hex[:8]}/"
    storage = {"filesystem": {"rootdirectory": str(tmp_path / "shared")}, "delete": {"enabled": True}}
    nodes = [
        WharfProcess(
            tmp_path / f"node{i}",
            storage=storage,
            coordinator={"etcd": {"endpoints": etcd.endpoints, "prefix": prefix}},
            cluster={"node": f"node{i}"},
        )
        for i in range(2)
    ]
    try:
        for node in nodes:
            node.start()
        draining, other = nodes
        with HAProxy([("127.0.0.1", n.port) for n in nodes]) as lb:
            log = lb.dir / "haproxy.log"
            # An upload in flight on the node about to drain: its body waits for `finish`.
            first, second = b"a" * 65536, b"b" * 65536
            sent_first, finish = threading.Event(), threading.Event()

            def body():
                yield first
                sent_first.set()
                finish.wait(60)
                yield second

            start = httpx.post(draining.url + "/v2/team/inflight/blobs/uploads/", timeout=30)
            result: dict[str, httpx.Response | BaseException] = {}

            def upload() -> None:
                try:
                    result["patch"] = httpx.patch(draining.url + start.headers["Location"], content=body(), timeout=60)
                except BaseException as exc:  # reported by the assertion below
                    result["patch"] = exc

            uploader = threading.Thread(target=upload)
            uploader.start()
            try:
                assert sent_first.wait(30), "the upload did not start"
                Path(str(draining.config_path) + ".drain").write_text("")
                wait_until(
                    lambda: "Server wharf/node0 is DOWN" in log.read_text(),
                    timeout=20,
                    what="HAProxy to take the draining node out",
                )
                before = (_version_checks(draining), _version_checks(other))
                for _ in range(6):
                    assert httpx.get(lb.url + "/v2/", timeout=10).status_code == 200
                wait_until(
                    lambda: _version_checks(other) == before[1] + 6, timeout=10, what="6 lines on the other node"
                )
                assert _version_checks(draining) == before[0], "a new request reached the draining node"
            finally:
                finish.set()
                uploader.join(60)
            patch = result["patch"]
            assert isinstance(patch, httpx.Response), patch
            assert patch.status_code == 202, patch.text
            assert patch.headers["Range"] == f"0-{len(first) + len(second) - 1}"
            # Undrained, it comes back.
            Path(str(draining.config_path) + ".drain").unlink()
            wait_until(
                lambda: "Server wharf/node0 is UP" in log.read_text(), timeout=20, what="HAProxy to take it back"
            )
    finally:
        for node in nodes:
            node.stop()
