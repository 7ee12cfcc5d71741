"""Webhook notifications: Distribution's events, queued durably in the coordinator, delivered by the cluster.

A receiver on loopback records every envelope. Debian's docker-registry (Distribution 2.8.2) sends its
events for the same pushes, pulls, mounts and deletes, and Wharf's must have the same shape. Beyond
Distribution: an event outlives the node that recorded it (SIGKILL right after a push), and a
receiver that was down for 30 s gets everything afterwards, in order per repository.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from oci_client import OCI_MANIFEST, OCIClient, digest_of
from registry2 import DockerRegistry, Registry2Client
from secure_registry import make_users
from services import EtcdCluster, free_port, wait_until
from test_cluster_nodes import LEASE_TTL, _leading, _nodes
from wharf_process import WharfProcess

from node.config import ConfigError, load

EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
_ACCEPT = {"Accept": OCI_MANIFEST}
_ROOT = Path(__file__).resolve().parent.parent


class Receiver:
    """A webhook endpoint on loopback that keeps every envelope; it can go down and come back."""

    def __init__(self) -> None:
        self.port = free_port()
        self.envelopes: list[tuple[dict[str, str], dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.envelopes.append((dict(self.headers), json.loads(body)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return [event for _, envelope in self.envelopes for event in envelope["events"]]

    def first_seen(self) -> list[dict[str, Any]]:
        """Every event once (delivery is at least once: duplicates keep their id), in arrival order."""
        seen: set[str] = set()
        found = []
        for event in self.events():
            if event["id"] not in seen:
                seen.add(event["id"])
                found.append(event)
        return found


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    try:
        yield r
    finally:
        r.stop()


def _endpoint(receiver: Receiver, **settings: Any) -> dict[str, Any]:
    return {
        "endpoints": [
            {
                "name": "loopback",
                "url": receiver.url,
                "headers": {"X-Registry-Token": ["s3cret"]},
                "timeout": "2s",
                "threshold": 3,
                "backoff": "1s",
                **settings,
            }
        ]
    }


def _shape(event: dict[str, Any]) -> tuple[Any, ...]:
    """What must match Distribution's event for the same request."""
    target = event["target"]
    return (
        event["action"],
        event["request"]["method"],
        target.get("repository"),
        target.get("mediaType"),
        target.get("tag"),
        target.get("fromRepository"),
        tuple(sorted(target)),
        tuple(sorted(event)),
        tuple(sorted(event["request"])),
        tuple(sorted(event["source"])),
    )


def _workload(http: httpx.Client) -> dict[str, str]:
    """A push, pulls, a mount and a delete by digest, as Distribution 2.8 clients do them."""
    client = Registry2Client(http)
    layer = b"layer of the notifications test"
    image = client.push_image("team/app", "v1", layers=[layer])
    assert http.get("/v2/team/app/manifests/v1", headers=_ACCEPT).status_code == 200
    assert http.head(f"/v2/team/app/manifests/{image.digest}", headers=_ACCEPT).status_code == 200
    assert http.get(f"/v2/team/app/blobs/{digest_of(layer)}").content == layer
    mounted = http.post(f"/v2/team/copy/blobs/uploads/?mount={digest_of(layer)}&from=team/app")
    assert mounted.status_code == 201
    assert http.delete(f"/v2/team/app/manifests/{image.digest}").status_code == 202
    return {"manifest": image.digest, "layer": digest_of(layer)}


def _events_from_distribution(tmp_path: Path) -> list[dict[str, Any]]:
    receiver = Receiver().start()
    try:
        extra = {"notifications": _endpoint(receiver)}
        with DockerRegistry.on_filesystem(tmp_path, tmp_path / "root", extra=extra) as registry:
            with registry.http() as http:
                _workload(http)
            wait_until(lambda: len(receiver.events()) >= 9, timeout=20, what="Distribution's events")
            time.sleep(0.5)  # anything it still sends
        return receiver.first_seen()
    finally:
        receiver.stop()


def test_webhook_gets_push_pull_mount_and_delete_events_shaped_as_distributions(
    tmp_path: Path, receiver: Receiver
) -> None:
    theirs = _events_from_distribution(tmp_path / "registry2")
    users = make_users(tmp_path / "htpasswd", {"alice": "alice-Secret-1"})
    node = WharfProcess(
        tmp_path / "wharf",
        notifications=_endpoint(receiver),
        http={"insecure": True},
        auth={"htpasswd": {"realm": "wharf", "path": str(users)}},
    )
    with node, httpx.Client(base_url=node.url, trust_env=False, timeout=30, auth=("alice", "alice-Secret-1")) as http:
        pushed = _workload(http)
        wait_until(lambda: len(receiver.first_seen()) >= len(theirs), timeout=30, what="Wharf's events")
        time.sleep(0.5)
    ours = receiver.first_seen()
    # Per repository, the same events in the same order; across repositories order is free.
    for repo in ("team/app", "team/copy"):
        assert [_shape(e) for e in ours if e["target"]["repository"] == repo] == [
            _shape(e) for e in theirs if e["target"]["repository"] == repo
        ], repo
    headers = receiver.envelopes[0][0]
    assert headers["Content-Type"] == EVENTS_MEDIA_TYPE
    assert headers["X-Registry-Token"] == "s3cret"
    by_action: dict[str, list[dict[str, Any]]] = {}
    for event in ours:
        by_action.setdefault(event["action"], []).append(event)
    manifest_push = [e for e in by_action["push"] if e["target"]["mediaType"] == OCI_MANIFEST]
    assert len(manifest_push) == 1
    target = manifest_push[0]["target"]
    assert target["digest"] == pushed["manifest"] and target["tag"] == "v1" and target["repository"] == "team/app"
    assert target["size"] == target["length"] > 0
    assert target["url"] == f"{node.url}/v2/team/app/manifests/{pushed['manifest']}"
    pulls = [(e["target"]["mediaType"], e["request"]["method"], e["target"].get("tag")) for e in by_action["pull"]]
    assert pulls == [
        (OCI_MANIFEST, "GET", "v1"),
        (OCI_MANIFEST, "HEAD", None),
        ("application/octet-stream", "GET", None),
    ]
    assert [e["target"]["fromRepository"] for e in by_action["mount"]] == ["team/app"]
    assert by_action["delete"][0]["target"] == {"digest": pushed["manifest"], "repository": "team/app"}
    assert by_action["delete"][1]["target"] == {"repository": "team/app", "tag": "v1"}
    # One request, one request id; the same id the registry returned in X-Request-Id.
    assert by_action["delete"][0]["request"]["id"] == by_action["delete"][1]["request"]["id"] != ""
    for event in ours:
        assert event["actor"] == {"name": "alice"}
        assert event["request"]["useragent"].startswith("python-httpx")
        assert event["request"]["addr"].startswith("127.0.0.1:")
        assert event["request"]["host"] == node.host
        assert event["source"]["addr"].endswith(f":{node.port}") and event["source"]["instanceID"]
        datetime.datetime.fromisoformat(event["timestamp"])
    assert len({e["id"] for e in ours}) == len(ours)


def test_ignored_actions_and_media_types_are_not_sent(tmp_path: Path, receiver: Receiver) -> None:
    settings = _endpoint(
        receiver, ignoredmediatypes=["application/octet-stream"], ignore={"actions": ["pull"], "mediatypes": []}
    )
    with WharfProcess(tmp_path / "wharf", notifications=settings) as node:
        with httpx.Client(base_url=node.url, trust_env=False, timeout=30) as http:
            image = OCIClient(http).push_image("team/app", "v1", layers=[b"ignored layer"])
            assert http.get("/v2/team/app/manifests/v1", headers=_ACCEPT).status_code == 200
            assert http.delete("/v2/team/app/manifests/v1").status_code == 202
        wait_until(lambda: len(receiver.events()) >= 2, timeout=20, what="events")
        time.sleep(1.0)
    assert [(e["action"], e["target"].get("digest"), e["target"].get("tag")) for e in receiver.first_seen()] == [
        ("push", image.digest, "v1"),
        ("delete", None, "v1"),
    ]


def _with_notifications(nodes: list[WharfProcess], settings: dict[str, Any]) -> None:
    for node in nodes:
        node.config["notifications"] = settings
        node.config_path.write_text(yaml.safe_dump(node.config))


def test_event_of_a_push_arrives_after_its_node_is_killed_right_after_it(tmp_path: Path, etcd: EtcdCluster) -> None:
    receiver = Receiver()  # down while the push happens: only the coordinator holds the event
    nodes = _nodes(tmp_path, etcd, 2)
    _with_notifications(nodes, _endpoint(receiver))
    try:
        for node in nodes:
            node.start()
        leader = wait_until(lambda: [n for n in nodes if _leading(n)], timeout=LEASE_TTL * 3, what="a leader")[0]
        with httpx.Client(base_url=leader.url, trust_env=False, timeout=30) as http:
            image = OCIClient(http).push_image("team/crash", "v1", layers=[os.urandom(1000)])
        leader.kill()
        receiver.start()
        survivor = next(n for n in nodes if n is not leader)

        def delivered() -> list[dict[str, Any]]:
            return [e for e in receiver.first_seen() if e["target"].get("digest") == image.digest]

        arrived = wait_until(delivered, timeout=LEASE_TTL * 4 + 10, what="the push event from the survivor")
        assert arrived[0]["action"] == "push" and arrived[0]["target"]["tag"] == "v1"
        assert arrived[0]["source"]["addr"].endswith(f":{leader.port}"), "recorded by the node that was killed"
        assert _leading(survivor)
    finally:
        receiver.stop()
        for node in nodes:
            node.stop()


def _status(node: WharfProcess) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "notifications", "status", "--json", "-c", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(_ROOT),
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_receiver_down_for_30s_gets_everything_afterwards_in_order_per_repository(
    tmp_path: Path, etcd: EtcdCluster
) -> None:
    receiver = Receiver()  # down from the start
    nodes = _nodes(tmp_path, etcd, 2)
    _with_notifications(nodes, _endpoint(receiver))
    expected: dict[str, list[tuple[str, str | None, str | None]]] = {}
    try:
        for node in nodes:
            node.start()
        clients = [httpx.Client(base_url=n.url, trust_env=False, timeout=30) for n in nodes]
        down_since = time.monotonic()
        round_ = 0
        while time.monotonic() - down_since < 30:
            for i, repo in enumerate(("team/a", "team/b", "team/c")):
                http = clients[(round_ + i) % 2]  # each repository's requests alternate between nodes
                layer = os.urandom(200)
                image = OCIClient(http).push_image(repo, f"r{round_}", layers=[layer])
                assert http.get(f"/v2/{repo}/manifests/r{round_}", headers=_ACCEPT).status_code == 200
                events = expected.setdefault(repo, [])
                events += [("push", None, None), ("push", None, None), ("push", image.digest, f"r{round_}")]
                events.append(("pull", image.digest, f"r{round_}"))
                if round_ % 3 == 2:
                    assert http.delete(f"/v2/{repo}/manifests/r{round_}").status_code == 202
                    events.append(("delete", None, f"r{round_}"))
            round_ += 1
            time.sleep(1.0)
        status = _status(nodes[0])["endpoints"][0]
        assert status["pending"] > 0 and status["consecutive_failures"] >= 3, status
        assert status["last_error"]
        metrics = httpx.get(next(n for n in nodes if _leading(n)).metrics_url, timeout=10).text
        assert 'registry_notifications_events_total{endpoint="loopback",type="Errors"}' in metrics or (
            'registry_notifications_events_total{type="Errors",endpoint="loopback"}' in metrics
        )
        receiver.start()
        total = sum(len(events) for events in expected.values())
        wait_until(lambda: len(receiver.first_seen()) >= total, timeout=60, what=f"{total} events")
        for client in clients:
            client.close()
    finally:
        receiver.stop()
        for node in nodes:
            node.stop()
    received = receiver.first_seen()
    assert len(received) == total
    for repo, events in expected.items():
        got = []
        for event in received:
            target = event["target"]
            if target["repository"] != repo:
                continue
            digest = target.get("digest") if target.get("mediaType") == OCI_MANIFEST else None
            got.append((event["action"], digest, target.get("tag")))
        assert got == events, repo
    assert _status(nodes[0])["endpoints"][0]["pending"] == 0


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ({"url": "http://127.0.0.1:1/"}, "every endpoint needs a name"),
        ({"name": "a", "url": "ftp://example"}, "notifications.endpoints[0].url"),
        ({"name": "a", "url": "http://x/", "timeout": "soon"}, "notifications.endpoints[0].timeout"),
        ({"name": "a", "url": "http://x/", "ignore": {"actions": ["tag"]}}, "ignore.actions"),
        ({"name": "a", "url": "http://x/", "headers": {"X-A": {"b": 1}}}, "headers.X-A"),
    ],
)
def test_bad_endpoint_settings_are_refused_at_load_naming_the_key(
    tmp_path: Path, endpoint: dict[str, Any], message: str
) -> None:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"notifications": {"endpoints": [endpoint]}}))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(str(path), environ={})


def test_endpoint_defaults_are_distributions_and_names_are_unique(tmp_path: Path) -> None:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"notifications": {"endpoints": [{"name": "a", "url": "http://x/"}]}}))
    endpoint = load(str(path), environ={}).notifications.endpoints[0]
    assert (endpoint.timeout_seconds, endpoint.threshold, endpoint.backoff_seconds) == (1.0, 10, 1.0)
    twice = {"endpoints": [{"name": "a", "url": "http://x/"}, {"name": "a", "url": "http://y/"}]}
    path.write_text(yaml.safe_dump({"notifications": twice}))
    with pytest.raises(ConfigError, match="used twice"):
        load(str(path), environ={})
