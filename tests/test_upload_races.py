"""Whatever clients do to one upload session at once, a committed blob is exactly what its digest says."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from wharf_process import WharfProcess

ROUNDS = {"filesystem": 12, "s3-moto": 6, "s3-rgw": 6}
S3_SERVERS = {"s3-moto": "s3_server", "s3-rgw": "rgw_server"}
RACERS = 8


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(params=["filesystem", *S3_SERVERS])
def node(request, tmp_path) -> Iterator[tuple[str, WharfProcess]]:
    sections: dict[str, Any] = {}
    root = None
    server = None
    if request.param in S3_SERVERS:
        server = request.getfixturevalue(S3_SERVERS[request.param])
        s3 = server.storage_config(chunksize=5 * 1024 * 1024)
        root = s3.rootdirectory
        sections["storage"] = {"s3": dataclasses.asdict(s3), "delete": {"enabled": True}}
    try:
        with WharfProcess(tmp_path / "node", **sections) as process:
            yield request.param, process
    finally:
        if server is not None and root is not None:
            server.remove_prefix(root.strip("/") + "/")


Call = Callable[[httpx.Client, str], httpx.Response]


def _race(url: str, location: str, calls: list[Call]) -> list[httpx.Response]:
    """Run every call on the upload at `location` at the same moment, each on its own connection."""
    barrier = threading.Barrier(len(calls))

    def run(call: Call) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=60) as client:
            client.get("/v2/")  # the connection is up before the start line
            barrier.wait(10)
            return call(client, location)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


def _check_no_5xx(responses: list[httpx.Response]) -> None:
    for r in responses:
        assert r.status_code < 500, r.text
        if r.status_code >= 400:
            codes = ("BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "RANGE_INVALID", "DIGEST_INVALID")
            assert r.json()["errors"][0]["code"] in codes, r.text


def _pulled(http: httpx.Client, digest: str) -> bytes:
    response = http.get(f"/v2/team/race/blobs/{digest}", follow_redirects=True)
    assert response.status_code == 200, response.text
    return response.content


def test_racing_patches_and_closing_puts_commit_only_what_the_digest_says(node):
    kind, process = node
    size = 300_000 if kind == "filesystem" else 6 * 1024 * 1024 + 7  # S3: a multipart part and a tail
    with httpx.Client(base_url=process.url, timeout=60) as http:
        for _ in range(ROUNDS[kind]):
            location = http.post("/v2/team/race/blobs/uploads/").headers["location"]
            bodies = [os.urandom(size) for _ in range(RACERS)]
            patches = _race(
                process.url,
                location,
                [
                    lambda c, at, body=body: c.patch(at, content=body, headers={"Content-Range": f"0-{size - 1}"})
                    for body in bodies
                ],
            )
            _check_no_5xx(patches)
            winners = [body for body, r in zip(bodies, patches, strict=True) if r.status_code == 202]
            assert len(winners) == 1, [r.status_code for r in patches]
            status = http.get(location)
            assert status.headers["range"] == f"0-{size - 1}"
            # Closing PUTs racing: some with the right digest, some with a wrong one.
            good = _digest(winners[0])
            digests = [good if n % 2 == 0 else _digest(bodies[n]) for n in range(RACERS // 2)]
            puts = _race(process.url, location, [lambda c, at, d=d: c.put(at, params={"digest": d}) for d in digests])
            _check_no_5xx(puts)
            committed = [d for d, r in zip(digests, puts, strict=True) if r.status_code == 201]
            assert committed == [good] or committed == [], [r.status_code for r in puts]
            if committed:
                assert _pulled(http, good) == winners[0]
            assert http.get(location).status_code == 404, "the session ended either way"


def test_racing_closing_puts_with_bodies_each_commit_their_own_digest(node):
    kind, process = node
    with httpx.Client(base_url=process.url, timeout=60) as http:
        for _ in range(ROUNDS[kind]):
            location = http.post("/v2/team/race/blobs/uploads/").headers["location"]
            bodies = [os.urandom(50_000 + n) for n in range(RACERS)]
            puts = _race(
                process.url,
                location,
                [lambda c, at, body=body: c.put(at, params={"digest": _digest(body)}, content=body) for body in bodies],
            )
            _check_no_5xx(puts)
            won = [body for body, r in zip(bodies, puts, strict=True) if r.status_code == 201]
            assert len(won) == 1, [r.status_code for r in puts]
            assert _pulled(http, _digest(won[0])) == won[0]
            for body, r in zip(bodies, puts, strict=True):
                if r.status_code != 201:
                    assert http.head(f"/v2/team/race/blobs/{_digest(body)}").status_code == 404


def test_patch_racing_a_cancel_leaves_a_whole_session_or_none(node):
    kind, process = node
    with httpx.Client(base_url=process.url, timeout=60) as http:
        for _ in range(ROUNDS[kind]):
            location = http.post("/v2/team/race/blobs/uploads/").headers["location"]
            body = os.urandom(200_000)
            patch, cancel = _race(
                process.url,
                location,
                [
                    lambda c, at, body=body: c.patch(at, content=body, headers={"Content-Range": f"0-{len(body) - 1}"}),
                    lambda c, at: c.delete(at),
                ],
            )
            for r in (patch, cancel):
                assert r.status_code < 500, r.text
            status = http.get(location)
            if status.status_code == 404:
                continue  # the cancel won: gone, and stays gone
            assert cancel.status_code >= 400 and patch.status_code == 202
            assert status.headers["range"] == f"0-{len(body) - 1}"
            done = http.put(location, params={"digest": _digest(body)})
            assert done.status_code == 201, done.text
            assert _pulled(http, _digest(body)) == body


def test_a_chunk_after_the_store_ended_the_nodes_lease_unnoticed_is_taken(tmp_path):
    """A node starved past its lease TTL finds its lease gone from the store before its refresh does:
    the next chunk's claim names the ended lease. The node takes a new lease and the chunk, no 500."""
    with WharfProcess(tmp_path / "node", cluster={"leasettl": 600}) as node:  # no refresh in the test
        first, second = os.urandom(70_000), os.urandom(30_000)
        with httpx.Client(base_url=node.url, timeout=30) as client:
            started = client.post("/v2/lease/race/blobs/uploads/")
            assert started.status_code == 202
            patched = client.patch(
                started.headers["Location"], content=first, headers={"Content-Type": "application/octet-stream"}
            )
            assert patched.status_code == 202, patched.text
            root = Path(node.config["storage"]["filesystem"]["rootdirectory"])
            with sqlite3.connect(root / "wharf" / "coordinator.db") as db:  # what expiry does
                ended = db.execute("SELECT count(*) FROM leases").fetchone()[0]
                db.execute("DELETE FROM leases")
            assert ended >= 1
            patched = client.patch(
                patched.headers["Location"],
                content=second,
                headers={"Content-Type": "application/octet-stream", "Content-Range": f"{len(first)}-{99_999}"},
            )
            assert patched.status_code == 202, patched.text
            digest = _digest(first + second)
            done = client.put(patched.headers["Location"], params={"digest": digest})
            assert done.status_code == 201, done.text
            assert client.get(f"/v2/lease/race/blobs/{digest}").content == first + second
    assert "Traceback" not in node.log_tail()


def test_a_chunk_whose_nodes_lease_lapses_mid_stream_is_refused_503_and_the_upload_resumes(tmp_path):
    """The node finds its lease ended while a PATCH body streams in: another node may claim the
    session now, so it stops writing and answers 503 with Retry-After (a fault of the server's, not
    the client's 400). The upload keeps a consistent offset, and resuming from it commits the blob."""
    data = os.urandom(300_000)
    first, second = data[:200_000], data[200_000:250_000]
    with WharfProcess(tmp_path / "node", cluster={"leasettl": 3}) as node:
        db_path = Path(node.config["storage"]["filesystem"]["rootdirectory"]) / "wharf" / "coordinator.db"

        def body() -> Iterator[bytes]:
            yield first
            with sqlite3.connect(db_path) as db:
                for _ in range(300):  # the request has claimed the session (with the node's lease)
                    if db.execute("SELECT count(*) FROM kv WHERE key LIKE '%upload-claim/%'").fetchone()[0]:
                        break
                    threading.Event().wait(0.05)
                else:
                    raise AssertionError("the PATCH never claimed its upload")
                # What expiry does to a starved node's leases:
                ended = db.execute("SELECT count(*) FROM leases").fetchone()[0]
                db.execute("DELETE FROM leases")
            assert ended >= 1
            for _ in range(300):  # each lease's refresh (every TTL/3) finds it gone
                if node.log_text().count("ended in the store before its refresh") >= ended:
                    break
                threading.Event().wait(0.1)
            else:
                raise AssertionError("the node never noticed its lease was gone")
            yield second

        with httpx.Client(base_url=node.url, timeout=60) as client:
            started = client.post("/v2/lease/lapse/blobs/uploads/")
            assert started.status_code == 202
            refused = client.patch(
                started.headers["Location"], content=body(), headers={"Content-Type": "application/octet-stream"}
            )
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert refused.json()["errors"][0]["code"] == "UNAVAILABLE"
            status = client.get(started.headers["Location"])
            assert status.status_code == 204, status.text
            kept = {"0-0": 0, f"0-{len(first) - 1}": len(first)}[status.headers["Range"]]
            resumed = client.patch(
                status.headers["Location"],
                content=data[kept:],
                headers={"Content-Type": "application/octet-stream", "Content-Range": f"{kept}-{len(data) - 1}"},
            )
            assert resumed.status_code == 202, resumed.text
            done = client.put(resumed.headers["Location"], params={"digest": _digest(data)})
            assert done.status_code == 201, done.text
            assert client.get(f"/v2/lease/lapse/blobs/{_digest(data)}").content == data
    assert "Traceback" not in node.log_tail()
