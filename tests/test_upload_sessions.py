"""Upload sessions are bounded: per user (or address) at once, and in how long they may sit idle."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import httpx
import pytest
from oci_client import OCIClient, assert_error
from secure_registry import SecureWharf, make_users
from services import wait_until

from coordinator import keys
from coordinator.uploads import TooManySessions, UploadSessions

USERS = {"alice": "alice-secret", "bob": "bob-secret"}


def _upload_dirs(root: Path) -> list[Path]:
    return [p for p in root.rglob("_uploads/*") if p.is_dir()]


def test_one_user_cannot_hold_more_than_the_bound_while_another_pushes(tmp_path):
    users = make_users(tmp_path / "htpasswd", USERS)
    node = SecureWharf(
        tmp_path / "node",
        auth={"htpasswd": {"realm": "wharf", "path": str(users)}},
        http={"insecure": True, "debug": {"addr": ""}, "uploads": {"maxsessions": 100, "idletimeout": "10s"}},
        storage={"maintenance": {"uploadpurging": {"interval": "1s"}}},
        audit={"path": str(tmp_path / "audit.log")},
    )
    with node:
        root = Path(node.config["storage"]["filesystem"]["rootdirectory"])
        alice = httpx.Client(base_url=node.url, auth=("alice", USERS["alice"]), timeout=30)
        bob = httpx.Client(base_url=node.url, auth=("bob", USERS["bob"]), timeout=30)
        statuses = []
        refused = None
        for n in range(1000):
            r = alice.post("/v2/alice/app/blobs/uploads/")
            statuses.append(r.status_code)
            if r.status_code == 202 and n % 10 == 0:
                # Some bytes in some of them, so the idle purge has storage to reclaim.
                assert alice.patch(r.headers["location"], content=os.urandom(1000)).status_code == 202
            if r.status_code == 429:
                refused = r
        assert statuses.count(202) == 100 and statuses.count(429) == 900
        assert refused is not None and refused.headers["retry-after"]
        assert_error(refused, 429, "TOOMANYREQUESTS")
        # Another user is not held up by alice's sessions.
        image = OCIClient(bob).push_image("bob/app", "v1", layers=[os.urandom(2000)])
        assert bob.get("/v2/bob/app/manifests/v1", headers={"Accept": "*/*"}).content == image.body
        assert len(_upload_dirs(root)) == 10
        # Idle for longer than http.uploads.idletimeout: gone, with their bytes.
        wait_until(lambda: not _upload_dirs(root), timeout=60, interval=0.5, what="idle sessions purged")
        assert alice.post("/v2/alice/app/blobs/uploads/").status_code == 202, "the bound counts open sessions only"
        lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
        refusals = [line for line in lines if line.get("rule") == "http.uploads.maxsessions"]
        assert len(refusals) == 900 and {r["refused_by"] for r in refusals} == {"ratelimit"}
        assert {r["user"] for r in refusals} == {"alice"}


def test_anonymous_pushes_are_bounded_per_address_and_finished_sessions_never_count(tmp_path):
    node = SecureWharf(tmp_path / "node", http={"debug": {"addr": ""}, "uploads": {"maxsessions": 5}})
    with node:
        client = httpx.Client(base_url=node.url, timeout=30)
        oci = OCIClient(client)
        for n in range(20):  # finished uploads free their place at once
            oci.push_blob("team/app", os.urandom(100 + n))
        open_ones = [client.post("/v2/team/app/blobs/uploads/") for _ in range(6)]
        assert [r.status_code for r in open_ones] == [202] * 5 + [429]
        for r in open_ones[:5]:
            assert client.delete(r.headers["location"]).status_code == 204
        assert client.post("/v2/team/app/blobs/uploads/").status_code == 202


@pytest.fixture
def kv(either_kv):
    return either_kv


async def test_sessions_opened_at_once_never_exceed_the_bound_and_a_refused_one_leaves_nothing(kv):
    """The owner's sessions are counted in the transaction that opens one, so racing opens each count
    the others: exactly the bound gets through, and a refused session's records are gone again."""
    sessions = UploadSessions(kv)

    async def open_one() -> str | None:
        upload_id = sessions.new_id()
        try:
            await sessions.create(upload_id, "team/app", {}, owner="address 127.0.0.9", limit=10)
        except TooManySessions:
            return None
        return upload_id

    opened = await asyncio.gather(*(open_one() for _ in range(40)))
    kept = [upload_id for upload_id in opened if upload_id is not None]
    assert len(kept) == 10
    assert sorted(r.key for r in await kv.range(keys.UPLOADS)) == sorted(keys.upload(u) for u in kept)
    assert await kv.count(keys.uploads_of("address 127.0.0.9")) == 10
    # Another owner is not held up; without a bound nothing is counted.
    await sessions.create(sessions.new_id(), "team/app", {}, owner="bob", limit=10)
    await sessions.create(sessions.new_id(), "team/app", {}, owner="address 127.0.0.9")
