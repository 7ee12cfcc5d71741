"""Upload URLs' signed state across the nodes of one cluster (etcd): signed by one node, good on every other and
after a restart, whatever each node's `http.secret`; a stale URL is refused on whichever node it lands."""

from __future__ import annotations

import functools
import hashlib
import os
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
from oci_client import assert_error
from services import EtcdCluster
from wharf_process import WharfProcess, running

OCTETS = {"Content-Type": "application/octet-stream"}


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _with_digest(location: str, digest: str) -> str:
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory, etcd: EtcdCluster) -> Iterator[list[WharfProcess]]:
    """Two nodes on one etcd and one storage, each with an `http.secret` of its own."""
    tmp_path = tmp_path_factory.mktemp("state")
    prefix = f"/wharf-test-{uuid.uuid4().hex[:8]}/"
    nodes = [
        WharfProcess(
            tmp_path / f"node{i}",
            storage={"filesystem": {"rootdirectory": str(tmp_path / "shared")}, "delete": {"enabled": True}},
            coordinator={"etcd": {"endpoints": etcd.endpoints, "prefix": prefix}},
            cluster={"node": f"node{i}", "leasettl": 3},
            http={"secret": f"only-node-{i}-{uuid.uuid4().hex}"},
        )
        for i in range(2)
    ]
    with running(nodes):
        yield nodes


def test_state_signed_by_one_node_is_good_on_another_and_after_a_restart_and_stale_is_416_anywhere(two_nodes):
    a, b = two_nodes
    parts = [os.urandom(40_000), os.urandom(30_000), os.urandom(20_000)]
    with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        started = ca.post("/v2/team/state/blobs/uploads/")
        assert started.status_code == 202
        one = cb.patch(started.headers["Location"], content=parts[0], headers=OCTETS)
        assert one.status_code == 202, one.text
        two = ca.patch(one.headers["Location"], content=parts[1], headers=OCTETS)
        assert two.status_code == 202, two.text
        received = f"0-{len(parts[0]) + len(parts[1]) - 1}"
        for client in (ca, cb):
            stale = client.patch(one.headers["Location"], content=parts[1], headers=OCTETS)
            assert_error(stale, 416, "BLOB_UPLOAD_INVALID")
            assert stale.headers["Range"] == received
    a.restart()  # the key lives in the coordinator, not in the process
    with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        status = ca.get(urlsplit(started.headers["Location"]).path)  # its first request: a URL without state
        assert status.status_code == 204, status.text
        assert status.headers["Range"] == received
        assert cb.get(started.headers["Location"]).headers["Range"] == received
        three = ca.patch(two.headers["Location"], content=parts[2], headers=OCTETS)
        assert three.status_code == 202, three.text
        data = b"".join(parts)
        done = cb.put(_with_digest(three.headers["Location"], _digest(data)))
        assert done.status_code == 201, done.text
        for client in (ca, cb):
            assert client.get(f"/v2/team/state/blobs/{_digest(data)}").content == data


def _patch_at_once(
    barrier: threading.Barrier, location: str, with_range: bool, node: WharfProcess, body: bytes
) -> httpx.Response:
    headers = {**OCTETS, "Content-Range": f"0-{len(body) - 1}"} if with_range else OCTETS
    with httpx.Client(base_url=node.url, timeout=30) as client:
        client.get("/v2/")  # the connection is up before the start line
        barrier.wait(10)
        return client.patch(location, content=body, headers=headers)


def test_patches_racing_on_two_nodes_through_one_location_take_one_and_the_blob_is_right(two_nodes):
    with httpx.Client(base_url=two_nodes[0].url, timeout=30) as http:
        for with_range in (False, True, False, True):
            location = http.post("/v2/team/race/blobs/uploads/").headers["Location"]
            bodies = [os.urandom(100_000), os.urandom(100_000)]
            race = functools.partial(_patch_at_once, threading.Barrier(2), location, with_range)
            with ThreadPoolExecutor(2) as pool:
                racing = list(pool.map(race, two_nodes, bodies))
            assert sorted(r.status_code for r in racing) == [202, 416], [r.text for r in racing]
            taken = next(body for body, r in zip(bodies, racing, strict=True) if r.status_code == 202)
            refused = next(r for r in racing if r.status_code == 416)
            assert_error(refused, 416, "RANGE_INVALID" if with_range else "BLOB_UPLOAD_INVALID")
            assert refused.headers["Range"] == f"0-{len(taken) - 1}"
            done = http.put(_with_digest(refused.headers["Location"], _digest(taken)))
            assert done.status_code == 201, done.text
            assert http.get(f"/v2/team/race/blobs/{_digest(taken)}").content == taken
