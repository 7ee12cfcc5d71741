"""Chunked uploads on S3 over HTTP: small chunks cost one write each, and any node (or a restarted one) continues."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from services import EtcdCluster, wait_until
from wharf_process import WharfProcess

from node.storage import layout

MiB = 1024 * 1024
PART = 5 * MiB
S3_SERVERS = {"s3-moto": "s3_server", "s3-rgw": "rgw_server"}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _storage(server: Any) -> tuple[dict[str, Any], str]:
    s3 = server.storage_config(chunksize=PART)
    return {"s3": dataclasses.asdict(s3), "delete": {"enabled": True}}, s3.rootdirectory.strip("/") + "/"


def _leftovers(server: Any, root: str) -> tuple[list[str], list[str]]:
    """Segment objects under `root`, and multipart uploads still open there."""
    client = server.client()
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=root)
        tails = [item["Key"] for page in pages for item in page.get("Contents", []) if ".tail-" in item["Key"]]
        uploads = client.list_multipart_uploads(Bucket=server.bucket, Prefix=root).get("Uploads", [])
        return tails, [u["Key"] for u in uploads]
    finally:
        client.close()


def _patch(http: httpx.Client, location: str, data: bytes, first: int) -> str:
    end = first + len(data) - 1
    r = http.patch(location, content=data, headers={"Content-Range": f"{first}-{end}"})
    assert r.status_code == 202, r.text
    assert r.headers["range"] == f"0-{end}"
    return r.headers["location"]


@pytest.fixture(params=list(S3_SERVERS))
def two_nodes(request, tmp_path: Path, etcd: EtcdCluster) -> Iterator[tuple[Any, str, list[WharfProcess]]]:
    server = request.getfixturevalue(S3_SERVERS[request.param])
    storage, root = _storage(server)
    prefix = f"/wharf-test-{uuid.uuid4().hex[:8]}/"
    nodes = [
        WharfProcess(
            tmp_path / f"node{i}",
            storage=storage,
            coordinator={"etcd": {"endpoints": etcd.endpoints, "prefix": prefix}},
            cluster={"node": f"node{i}", "leasettl": 3},
        )
        for i in range(2)
    ]
    try:
        for node in nodes:
            node.start()
        yield server, root, nodes
    finally:
        for node in nodes:
            node.stop()
        server.remove_prefix(root)


def test_one_mib_chunks_alternating_nodes_through_a_restart_and_a_kill_commit_the_exact_blob(two_nodes):
    """Each PATCH on the other node, one node restarted and the other killed between chunks."""
    server, root, (a, b) = two_nodes
    data = os.urandom(13 * MiB + 12_345)
    chunks = [data[i : i + MiB] for i in range(0, len(data), MiB)]
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        location = ca.post("/v2/team/chunked/blobs/uploads/").headers["location"]
        offset = 0
        for n, chunk in enumerate(chunks):
            if n == 4:
                a.restart()  # a's cache of segments is gone; b's is not
            if n == 9:
                b.kill()  # acknowledged chunks survive a node that dies without a word
                b.start()
            location = _patch(cb if n % 2 else ca, location, chunk, offset)
            offset += len(chunk)
        assert cb.get(location).headers["range"] == f"0-{len(data) - 1}"
        done = cb.put(location, params={"digest": _digest(data)})
        assert done.status_code == 201, done.text
        for client in (ca, cb):
            pulled = client.get(f"/v2/team/chunked/blobs/{_digest(data)}", follow_redirects=True)
            assert pulled.status_code == 200 and pulled.content == data
    assert _leftovers(server, root) == ([], [])


@pytest.mark.parametrize("two_nodes", ["s3-moto"], indirect=True)  # the driver's logic: one server is enough
def test_odd_chunks_resumed_on_another_node_after_a_broken_patch_commit_the_exact_blob(two_nodes):
    server, root, (a, b) = two_nodes
    data = os.urandom(8 * MiB + 7)
    size = 1_000_003
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        location = ca.post("/v2/team/odd/blobs/uploads/").headers["location"]
        offset = 0
        for n, first in enumerate(range(0, 5 * size, size)):
            location = _patch(cb if n % 2 else ca, location, data[first : first + size], first)
            offset = first + size
        # A PATCH whose Content-Range does not continue the upload changes nothing.
        wrong = cb.patch(location, content=b"x" * 10, headers={"Content-Range": f"{offset + 1}-{offset + 10}"})
        assert wrong.status_code == 416 and wrong.headers["range"] == f"0-{offset - 1}"
        done = cb.put(location, params={"digest": _digest(data)}, content=data[offset:])
        assert done.status_code == 201, done.text
        pulled = ca.get(f"/v2/team/odd/blobs/{_digest(data)}", follow_redirects=True)
        assert pulled.content == data
    assert _leftovers(server, root) == ([], [])


def _moto_requests(server: Any, since: int) -> list[tuple[str, str]]:
    """(method, path) of each request moto logged after byte `since` of its log."""
    with open(os.path.join(server._log_dir, "moto.log"), "rb") as log:
        log.seek(since)
        text = log.read().decode(errors="replace")
    return re.findall(r'"([A-Z]+) (\S+) HTTP/[\d.]+" \d{3} ', text)


def _moto_log_size(server: Any) -> int:
    return os.path.getsize(os.path.join(server._log_dir, "moto.log"))


def test_one_mib_chunks_write_each_segment_once_and_read_none_back(s3_server, tmp_path):
    """Structural, not timed: a tail object per chunk rewritten and re-read would show in moto's log."""
    storage, root = _storage(s3_server)
    data = os.urandom(12 * MiB + 3)
    try:
        with WharfProcess(tmp_path / "node", storage=storage) as node, httpx.Client(base_url=node.url, timeout=60) as c:
            location = c.post("/v2/team/counted/blobs/uploads/").headers["location"]
            since = _moto_log_size(s3_server)
            patches = 0
            for first in range(0, len(data), MiB):
                location = _patch(c, location, data[first : first + MiB], first)
                patches += 1
            assert c.put(location, params={"digest": _digest(data)}).status_code == 201
            # moto writes its log line once it has answered: wait until the last request is in.
            wait_until(
                lambda: any(m == "DELETE" or "delete" in p for m, p in _moto_requests(s3_server, since)),
                timeout=10,
                what="moto logged the commit's clean-up",
            )
            requests = _moto_requests(s3_server, since)
    finally:
        s3_server.remove_prefix(root)
    # Object requests name the key in the path; listings name a prefix in the query.
    segment_puts = [p for m, p in requests if m == "PUT" and ".tail-" in p.split("?")[0]]
    segment_gets = [p for m, p in requests if m == "GET" and ".tail-" in p.split("?")[0]]
    parts = [p for m, p in requests if m == "PUT" and "partNumber=" in p]
    assert segment_gets == [], "no segment is read back on the node that wrote it"
    assert len(set(segment_puts)) == len(segment_puts), "no segment is written twice"
    # 13 PATCHes: the 5th and 10th complete a part and write no segment; the 11th-13th leave the tail.
    assert len(segment_puts) == patches - 2
    assert len(parts) == 3  # two parts, and the tail as the last one at commit


@contextlib.contextmanager
def _purging_node(server: Any, tmp_path: Path) -> Iterator[tuple[httpx.Client, str]]:
    """A node on `server` that purges sessions idle for 10 s (checked every second), a client to it,
    and its storage root, removed afterwards."""
    storage, root = _storage(server)
    storage["maintenance"] = {"uploadpurging": {"interval": "1s"}}
    try:
        with WharfProcess(tmp_path / "node", storage=storage, http={"uploads": {"idletimeout": "10s"}}) as node:
            with httpx.Client(base_url=node.url, timeout=60) as client:
                yield client, root
    finally:
        server.remove_prefix(root)


def test_abandoned_chunked_upload_is_purged_with_its_parts_and_segments(s3_server, tmp_path):
    with _purging_node(s3_server, tmp_path) as (c, root):
        location = c.post("/v2/team/abandoned/blobs/uploads/").headers["location"]
        for first in range(0, 7 * MiB, MiB):
            location = _patch(c, location, os.urandom(MiB), first)
        tails, uploads = _leftovers(s3_server, root)
        assert len(tails) == 2 and len(uploads) == 1  # one part open, two chunks as segments
        wait_until(lambda: _leftovers(s3_server, root) == ([], []), timeout=30, interval=0.5, what="upload purged")
        assert c.get(location).status_code == 404


def test_a_multipart_upload_its_state_never_named_is_aborted_with_the_session(s3_server, tmp_path):
    # A PATCH killed after it began a multipart upload and before its state was recorded leaves one
    # that the session's state does not name, at the session's own key: the purge aborts it too.
    with _purging_node(s3_server, tmp_path) as (c, root):
        location = c.post("/v2/team/killed/blobs/uploads/").headers["location"]
        location = _patch(c, location, os.urandom(MiB), 0)
        upload_id = location.split("/blobs/uploads/", 1)[1].split("?", 1)[0]
        key = root + layout.upload_key("team/killed", upload_id)
        client = s3_server.client()
        try:
            client.create_multipart_upload(Bucket=s3_server.bucket, Key=key)
        finally:
            client.close()
        assert _leftovers(s3_server, root)[1] == [key]
        wait_until(lambda: _leftovers(s3_server, root) == ([], []), timeout=30, interval=0.5, what="upload purged")
        assert c.get(location).status_code == 404
