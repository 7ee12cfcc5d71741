"""Shared fixtures: real services, started once per session."""

from __future__ import annotations

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
