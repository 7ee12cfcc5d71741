"""Several stateless nodes on one etcd and one storage: any node serves any request."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from oci_client import OCIClient, assert_error
from services import EtcdCluster, wait_until
from wharf_process import WharfProcess, running

LEASE_TTL = 3
_ANY = {"Accept": "*/*"}


def _nodes(tmp_path: Path, etcd: EtcdCluster, count: int, storage: dict | None = None) -> list[WharfProcess]:
    """`count` nodes from the same settings: nothing shared but etcd and the storage."""
    prefix = f"/wharf-test-{uuid.uuid4().hex[:8]}/"
    storage = storage or {
        "filesystem": {"rootdirectory": str(tmp_path / "shared-storage")},
        "delete": {"enabled": True},
    }
    nodes = []
    for i in range(count):
        node = WharfProcess(
            tmp_path / f"node{i}",
            storage=storage,
            coordinator={"etcd": {"endpoints": etcd.endpoints, "prefix": prefix}},
            cluster={"node": f"node{i}", "leasettl": LEASE_TTL},
        )
        nodes.append(node)
    return nodes


@pytest.fixture()
def three_nodes(tmp_path, etcd):
    nodes = _nodes(tmp_path, etcd, 3)
    with running(nodes):
        yield nodes


def _client(node: WharfProcess) -> httpx.Client:
    return httpx.Client(base_url=node.url, timeout=30)


def test_upload_begun_on_one_node_continues_on_others_and_completes(three_nodes):
    a, b, c = three_nodes
    data = os.urandom(3 * 1024 * 1024 + 5)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with _client(a) as ca, _client(b) as cb, _client(c) as cc:
        started = ca.post("/v2/team/app/blobs/uploads/")
        assert started.status_code == 202
        location = started.headers["location"]
        first = cb.patch(location, content=data[:1_000_000], headers={"Content-Range": f"0-{1_000_000 - 1}"})
        assert first.status_code == 202, first.text
        assert first.headers["range"] == f"0-{1_000_000 - 1}"
        second = cc.patch(
            first.headers["location"], content=data[1_000_000:], headers={"Content-Range": f"1000000-{len(data) - 1}"}
        )
        assert second.status_code == 202, second.text
        done = ca.put(second.headers["location"], params={"digest": digest})
        assert done.status_code == 201, done.text
        for client in (ca, cb, cc):
            pulled = client.get(f"/v2/team/app/blobs/{digest}")
            assert pulled.status_code == 200 and pulled.content == data


def _slow_patch(node: WharfProcess, path: str, total: int, sent_before_kill: threading.Event) -> None:
    """PATCH `total` declared bytes but send only part, then hang until the node dies."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=30) as sock:
        head = f"PATCH {path} HTTP/1.1\r\nHost: {node.host}\r\nContent-Length: {total}\r\n\r\n".encode()
        sock.sendall(head + b"y" * (total // 2))
        sent_before_kill.set()
        try:
            sock.recv(1024)
        except OSError:
            pass


def test_node_killed_mid_upload_client_resumes_on_another_node(three_nodes):
    a, b, _ = three_nodes
    first = b"x" * 700_000
    with _client(a) as ca, _client(b) as cb:
        started = ca.post("/v2/team/app/blobs/uploads/")
        location = started.headers["location"]
        assert ca.patch(location, content=first).status_code == 202
        sending = threading.Event()
        sender = threading.Thread(target=_slow_patch, args=(a, location, 2_000_000, sending), daemon=True)
        sender.start()
        assert sending.wait(10)
        time.sleep(0.2)  # let the node take in part of the chunk before it dies
        a.kill()
        sender.join(10)
        status = cb.get(location)
        assert status.status_code == 204
        end = int(status.headers["range"].split("-")[1])
        offset = end + 1
        assert offset == len(first), "only recorded progress counts; the broken chunk is resent"
        rest = b"z" * 123_456
        data = first + rest
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        resumed = cb.patch(location, content=rest, headers={"Content-Range": f"{offset}-{len(data) - 1}"})
        assert resumed.status_code == 202, resumed.text
        assert cb.put(location, params={"digest": digest}).status_code == 201
        assert cb.get(f"/v2/team/app/blobs/{digest}").content == data


def test_concurrent_puts_of_one_tag_through_different_nodes_end_with_one_winner(three_nodes):
    clients = [_client(node) for node in three_nodes]
    try:
        oci = OCIClient(clients[0])
        images = [oci.push_image("team/app", None, layers=[os.urandom(64)]) for _ in range(9)]
        results: list[httpx.Response] = []

        def put(i: int) -> None:
            image = images[i]
            results.append(OCIClient(clients[i % 3]).put_manifest("team/app", "latest", image.body, image.media_type))

        threads = [threading.Thread(target=put, args=(i,)) for i in range(len(images))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert sorted(r.status_code for r in results) == [201] * len(images)
        seen = {c.head("/v2/team/app/manifests/latest", headers=_ANY).headers["docker-content-digest"] for c in clients}
        assert len(seen) == 1, "every node answers the same winner"
        winner = seen.pop()
        assert winner in {image.digest for image in images}
        tags = clients[1].get("/v2/team/app/tags/list").json()["tags"]
        assert tags == ["latest"]
        for c in clients:
            assert c.get(f"/v2/team/app/manifests/{winner}", headers=_ANY).status_code == 200
    finally:
        for client in clients:
            client.close()


def test_tag_moved_through_one_node_is_seen_by_the_next_request_to_another(three_nodes):
    a, b, _ = three_nodes
    with _client(a) as ca, _client(b) as cb:
        oci_a = OCIClient(ca)
        first = oci_a.push_image("team/app", "v1", layers=[b"one"])
        assert cb.head("/v2/team/app/manifests/v1", headers=_ANY).headers["docker-content-digest"] == first.digest
        second = oci_a.push_image("team/app", "v1", layers=[b"two"])
        assert cb.head("/v2/team/app/manifests/v1", headers=_ANY).headers["docker-content-digest"] == second.digest
        assert ca.delete("/v2/team/app/manifests/v1").status_code == 202
        assert_error(cb.get("/v2/team/app/manifests/v1", headers=_ANY), 404, "MANIFEST_UNKNOWN")


def test_after_a_tag_moves_on_one_node_the_next_get_by_tag_on_another_returns_the_new_manifest(three_nodes):
    a, b, _ = three_nodes
    with _client(a) as ca, _client(b) as cb:
        oci_a = OCIClient(ca)
        first = oci_a.push_image("team/moving", "stable", layers=[b"first"])
        for _ in range(5):  # b has answered this tag, by GET and HEAD, several times
            got = cb.get("/v2/team/moving/manifests/stable", headers=_ANY)
            assert got.headers["docker-content-digest"] == first.digest
            assert cb.head("/v2/team/moving/manifests/stable", headers=_ANY).status_code == 200
        etag = got.headers["etag"]
        second = oci_a.push_image("team/moving", "stable", layers=[b"second"])
        moved = cb.get("/v2/team/moving/manifests/stable", headers=_ANY)
        assert moved.status_code == 200
        assert moved.headers["docker-content-digest"] == second.digest
        assert "sha256:" + hashlib.sha256(moved.content).hexdigest() == second.digest
        assert moved.headers["etag"] != etag
        # A conditional GET with the old ETag is answered with the new manifest, not 304.
        again = cb.get("/v2/team/moving/manifests/stable", headers={**_ANY, "If-None-Match": etag})
        assert again.status_code == 200 and again.headers["docker-content-digest"] == second.digest


def test_tag_lists_and_catalog_cached_on_one_node_follow_changes_made_through_another(three_nodes):
    a, b, _ = three_nodes
    with _client(a) as ca, _client(b) as cb:
        oci_a = OCIClient(ca)
        oci_a.push_image("team/app", "v1", layers=[b"one"])
        for _ in range(3):  # warm b's caches
            assert cb.get("/v2/team/app/tags/list").json()["tags"] == ["v1"]
            assert cb.get("/v2/_catalog").json()["repositories"] == ["team/app"]
        oci_a.push_image("team/app", "v2", layers=[b"two"])
        assert cb.get("/v2/team/app/tags/list").json()["tags"] == ["v1", "v2"]
        assert cb.get("/v2/team/app/tags/list", params={"n": 1, "last": "v1"}).json()["tags"] == ["v2"]
        oci_a.push_image("team/other", "x", layers=[b"three"])
        assert cb.get("/v2/_catalog").json()["repositories"] == ["team/app", "team/other"]
        assert ca.delete("/v2/team/app/manifests/v1").status_code == 202
        assert cb.get("/v2/team/app/tags/list").json()["tags"] == ["v2"]
        metrics = httpx.get(b.metrics_url, timeout=5).text
        assert 'wharf_cache_hits_total{cache="tag_list"}' in metrics


def _leading(node: WharfProcess) -> bool:
    try:
        text = httpx.get(node.metrics_url, timeout=2).text
    except httpx.HTTPError:
        return False
    return 'wharf_leader{job="maintenance"} 1.0' in text


def test_killed_leader_is_replaced_within_the_lease_ttl(three_nodes):
    leaders = wait_until(lambda: [n for n in three_nodes if _leading(n)], timeout=LEASE_TTL * 3, what="a leader")
    assert len(leaders) == 1
    leader = leaders[0]
    leader.kill()
    killed_at = time.monotonic()
    others = [n for n in three_nodes if n is not leader]
    successor = wait_until(lambda: [n for n in others if _leading(n)], timeout=LEASE_TTL * 3, what="a new leader")
    took = time.monotonic() - killed_at
    assert len(successor) == 1
    # The lease lapses after its TTL; the successor notices by watch and a refresh period at most.
    assert took <= LEASE_TTL + LEASE_TTL / 3 + 1.5, f"took {took:.1f}s"


def test_metrics_move_after_a_push(three_nodes):
    node = three_nodes[0]
    with _client(node) as client:
        OCIClient(client).push_image("team/metrics", "v1", layers=[b"layer"])
        client.get("/v2/team/metrics/manifests/v1", headers=_ANY)
    text = httpx.get(node.metrics_url, timeout=5).text
    assert (
        'wharf_http_requests_total{method="PUT",route="/v2/{name:path}/manifests/{reference}",status="201"} 1.0' in text
    )
    assert "wharf_http_request_duration_seconds_bucket" in text
    assert 'wharf_coordinator_operation_duration_seconds_count{operation="txn"}' in text
    assert 'wharf_storage_operation_duration_seconds_count{driver="filesystem",operation="write_bytes"}' in text
    assert "wharf_http_request_bytes_total" in text and "wharf_http_response_bytes_total" in text


def test_readiness_fails_when_the_coordinator_is_gone(tmp_path):
    cluster = EtcdCluster(1, heartbeat_ms=50, election_ms=500).start()
    try:
        node = _nodes(tmp_path, cluster, 1)[0].start()
        try:
            assert httpx.get(node.url + "/debug/ready", timeout=5).status_code == 200
            cluster.stop_member(0)
            response = wait_until(
                lambda: (r := httpx.get(node.url + "/debug/ready", timeout=10)).status_code == 503 and r,
                timeout=20,
                what="readiness to fail",
            )
            assert response.json()["storage"] == "ok"
            assert httpx.get(node.url + "/debug/health", timeout=5).status_code == 200
        finally:
            node.stop()
    finally:
        cluster.close()


def test_nodes_need_no_shared_secret(tmp_path, etcd):
    """Nodes are started from one file with nothing else in common; http.secret is accepted, unused."""
    nodes = _nodes(tmp_path, etcd, 2)
    for i, node in enumerate(nodes):
        node.config["http"]["secret"] = f"different-secret-{i}"
        node.config_path.write_text(__import__("yaml").safe_dump(node.config))
        node.start()
    try:
        data = os.urandom(10_000)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with _client(nodes[0]) as c0, _client(nodes[1]) as c1:
            location = c0.post("/v2/team/app/blobs/uploads/").headers["location"]
            assert c1.put(location, params={"digest": digest}, content=data).status_code == 201
    finally:
        for node in nodes:
            node.stop()


def test_requests_while_etcd_cannot_be_reached_are_503_with_retry_after_and_serve_again_after(tmp_path):
    # The coordinator down is a fault to wait out, not a bug: 503 UNAVAILABLE with Retry-After (a
    # write may or may not have been applied, so the client must try again), never a 500.
    with EtcdCluster(1, heartbeat_ms=50, election_ms=500) as etcd:
        (node,) = _nodes(tmp_path, etcd, 1)
        with node, httpx.Client(base_url=node.url, trust_env=False, timeout=30) as http:
            image = OCIClient(http).push_image("team/app", "v1")
            accept = {"Accept": image.media_type}
            etcd.stop_member(0)
            for method, path in [
                ("GET", "/v2/team/app/manifests/v1"),
                ("GET", "/v2/team/app/tags/list"),
                ("GET", "/v2/_catalog"),
                ("POST", "/v2/team/app/blobs/uploads/"),
                ("PUT", "/v2/team/app/manifests/v2"),
            ]:
                content = image.body if method == "PUT" else None
                headers = {**accept, "Content-Type": image.media_type} if method == "PUT" else accept
                response = http.request(method, path, content=content, headers=headers)
                assert_error(response, 503, "UNAVAILABLE")
                assert response.headers.get("Retry-After"), (method, path)
            etcd.start_member(0)

            def served() -> bool:
                return http.get("/v2/team/app/manifests/v1", headers=accept).status_code == 200

            wait_until(served, timeout=30, what="manifest GET once etcd is back")
            assert (
                http.put(
                    "/v2/team/app/manifests/v2", content=image.body, headers={"Content-Type": image.media_type}
                ).status_code
                == 201
            )
