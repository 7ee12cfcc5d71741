"""Shared fixtures: real services, started once per session."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
from services import EtcdCluster


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdCluster]:
    """One single-member etcd for the whole session (never skipped: a missing etcd is a failure).

    Tests share it, so each one works under its own random key prefix and removes it afterwards.
    A 50 ms heartbeat makes etcd's minimum lease TTL 1 s (it is 2 s with the default 100 ms),
    so lease tests can use TTL 1.
    """
    with EtcdCluster(1, heartbeat_ms=50, election_ms=500) as cluster:
        yield cluster


@pytest.fixture(params=["embedded", "etcd"])
async def either_kv(request, tmp_path):
    """An empty coordinator of each kind: the embedded one in a file, or the session's etcd under a
    key prefix of its own (removed afterwards)."""
    from coordinator.embedded import EmbeddedKV
    from coordinator.etcd import EtcdKV

    if request.param == "embedded":
        embedded = EmbeddedKV(str(tmp_path / "kv.db"))
        yield embedded
        await embedded.close()
        return
    store = await EtcdKV.open(request.getfixturevalue("etcd").endpoints, prefix=f"/wharf-test/{uuid.uuid4().hex}/")
    try:
        yield store
    finally:
        await store.delete("", prefix=True)
        await store.close()


@pytest.fixture()
def wharf(tmp_path):
    """A real `wharf serve` process on embedded defaults (filesystem + embedded coordinator)."""
    from wharf_process import WharfProcess

    with WharfProcess(tmp_path / "wharf") as process:
        yield process


@pytest.fixture(scope="session")
def s3_server():
    """One `moto_server` with one bucket for the whole session (moto keeps every object in memory).

    Tests share it, so each works under its own `rootdirectory` and removes it afterwards
    (`s3_server.remove_prefix`). Loopback is added to NO_PROXY for the session, so boto3 in this
    process and in the registry processes it starts never sends the server's traffic to a proxy
    (and an AWS profile named in the environment is ignored: tests pass the server's keys).
    """
    from s3_server import S3Server

    with _s3_environment(), S3Server() as server:
        yield server


@pytest.fixture(scope="session")
def rgw_server():
    """One Ceph RADOS Gateway (monitor, in-memory OSD, radosgw) with one bucket for the whole session.

    Used like `s3_server` (each test under its own `rootdirectory`, removed afterwards), and never
    skipped: `make test` installs Debian's ceph packages, and a missing one is a failure.
    """
    from rgw_server import RGWServer

    with _s3_environment(), RGWServer() as server:
        yield server


@contextlib.contextmanager
def _s3_environment() -> Iterator[None]:
    from s3_server import AWS_PROFILE_VARS, no_proxy_for_loopback

    with pytest.MonkeyPatch.context() as patch:
        for name, value in no_proxy_for_loopback().items():
            patch.setenv(name, value)
        for name in AWS_PROFILE_VARS:
            patch.delenv(name, raising=False)
        yield
