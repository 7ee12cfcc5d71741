"""Last-pulled times: noted per pull, written in batches, never moved back."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import pytest
from inprocess import InProcessRegistry
from oci_client import OCI_CONFIG, OCI_LAYER, OCI_MANIFEST, descriptor

from coordinator.embedded import EmbeddedKV
from coordinator.kv import Compare, Delete, Op, Put, TxnResult
from coordinator.pulls import Pulls


class CountingKV:
    """Passes every call through and counts the requests that write."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes = 0
        self.fail_next_txn = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self.writes += 1
        return await self.inner.put(key, value, lease=lease)

    async def delete(self, key: str, *, prefix: bool = False) -> int:
        self.writes += 1
        return await self.inner.delete(key, prefix=prefix)

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        if any(isinstance(op, (Put, Delete)) for op in [*success, *failure]):
            if self.fail_next_txn:
                self.fail_next_txn = False
                raise ConnectionError("coordinator unreachable")
            self.writes += 1
        return await self.inner.txn(compares, success, failure)


@pytest.fixture()
async def registry(tmp_path):
    reg = InProcessRegistry(tmp_path, inventory={"pullinterval": "1h"})
    counting = CountingKV(reg.services.kv.inner)
    reg.services.kv.inner = counting
    reg.counting = counting  # type: ignore[attr-defined]
    yield reg
    await reg.close()


async def _image(registry: InProcessRegistry, repo: str, tag: str) -> str:
    config = json.dumps({"tag": tag}).encode()
    layer = f"layer of {tag}".encode()
    await registry.blob(repo, config)
    await registry.blob(repo, layer)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, layer)],
    }
    digest, _ = await registry.put_manifest(repo, tag, doc)
    return digest


async def test_thousand_pulls_cost_a_handful_of_coordinator_writes(registry):
    digests = {tag: await _image(registry, "team/app", tag) for tag in ("a", "b", "c")}
    counting = registry.counting
    before = time.time()
    counting.writes = 0
    for n in range(1000):
        tag = "abc"[n % 3]
        reference = tag if n % 2 else digests[tag]
        response = await registry.http.get(f"/v2/team/app/manifests/{reference}", headers={"Accept": OCI_MANIFEST})
        assert response.status_code == 200
    assert counting.writes == 0, "a pull writes nothing to the coordinator by itself"
    await registry.services.pulls.flush()
    assert counting.writes <= 2
    pulled = await Pulls(registry.kv).last_pulled("team/app", digests.values())
    assert set(pulled) == set(digests.values())
    assert all(before <= at <= time.time() for at in pulled.values())


async def test_conditional_get_is_a_pull_and_head_is_not(registry):
    digest = await _image(registry, "team/app", "v1")
    head = await registry.http.head("/v2/team/app/manifests/v1")
    assert head.status_code == 200
    await registry.services.pulls.flush()
    assert await Pulls(registry.kv).last_pulled("team/app", [digest]) == {}
    cached = await registry.http.get("/v2/team/app/manifests/v1", headers={"If-None-Match": f'"{digest}"'})
    assert cached.status_code == 304
    await registry.services.pulls.flush()
    assert digest in await Pulls(registry.kv).last_pulled("team/app", [digest])


async def test_last_pulled_never_moves_back_when_nodes_write_out_of_order(tmp_path):
    kv = EmbeddedKV(str(tmp_path / "kv.db"))
    try:
        first, second = Pulls(kv), Pulls(kv)
        pull = ("team/app", "sha256:" + "a" * 64)
        assert await first.write({pull: 200.0}) == {}
        version = await first.version("team/app")
        assert version > 0
        # A node that saw an older pull writes later: the newer time stands, nothing is written.
        assert await second.write({pull: 100.0}) == {}
        assert await first.last_pulled(*pull[:1], [pull[1]]) == {pull[1]: 200.0}
        assert await first.version("team/app") == version
        assert await second.write({pull: 300.0}) == {}
        assert await first.of_repository("team/app") == {pull[1]: 300.0}
        assert [item async for item in first.every()] == [(pull[0], pull[1], 300.0)]
    finally:
        await kv.close()


async def test_pulls_noted_during_a_failed_write_go_out_with_the_next_batch(registry):
    digest = await _image(registry, "team/app", "v1")
    assert (await registry.http.get("/v2/team/app/manifests/v1")).status_code == 200
    registry.counting.fail_next_txn = True
    with pytest.raises(ConnectionError):
        await registry.services.pulls.flush()
    assert registry.services.pulls.noted == 1
    await registry.services.pulls.flush()
    assert registry.services.pulls.noted == 0
    assert digest in await Pulls(registry.kv).last_pulled("team/app", [digest])


async def test_batches_of_many_manifests_stay_within_a_transaction(tmp_path):
    kv = EmbeddedKV(str(tmp_path / "kv.db"))
    try:
        pulls = Pulls(kv)
        seen = {(f"team/app{n % 7}", f"sha256:{n:064x}"): 1000.0 + n for n in range(500)}
        assert await pulls.write(seen) == {}
        found = await pulls.of_repository("team/app3")
        assert found == {digest: at for (repo, digest), at in seen.items() if repo == "team/app3"}
    finally:
        await kv.close()
