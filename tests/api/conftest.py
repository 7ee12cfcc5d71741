"""The OCI Distribution API over real HTTP, endpoint by endpoint, as the conformance suite sees it.

One test module per resource, as `node/api/` is split. One `wharf serve` process serves every module
of this folder, once per backend: embedded defaults (filesystem storage, embedded coordinator), then
S3 with the session's etcd: on moto, then on Ceph RGW. Every test works in repositories of its own,
named at random, so tests neither see nor disturb each other.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from api_suite import S3_SERVERS, Backend, client_for, new_repo
from oci_client import OCIClient, digest_of
from wharf_process import WharfProcess


@pytest.fixture(scope="package", params=["embedded+filesystem", *S3_SERVERS])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    if request.param in S3_SERVERS:
        s3_server = request.getfixturevalue(S3_SERVERS[request.param])
        chosen = Backend(request.param, s3_server, request.getfixturevalue("etcd"))
    else:
        chosen = Backend(request.param)
    try:
        yield chosen
    finally:
        chosen.cleanup()


@pytest.fixture(scope="package")
def wharf(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[WharfProcess]:
    """Overrides conftest's per-test process: one process for the whole API suite is enough and faster."""
    with WharfProcess(tmp_path_factory.mktemp("wharf"), **backend.settings()) as process:
        yield process


@pytest.fixture(scope="package")
def http(wharf: WharfProcess) -> Iterator[httpx.Client]:
    with client_for(wharf) as client:
        yield client


@pytest.fixture(scope="package")
def oci(http: httpx.Client) -> OCIClient:
    return OCIClient(http)


@pytest.fixture
def repo() -> str:
    return new_repo()


@pytest.fixture
def repo2() -> str:
    return new_repo()


@pytest.fixture
def blob2k(oci: OCIClient, repo: str) -> tuple[str, bytes]:
    """A 2048-byte blob in `repo`, as the conformance suite uses for range requests."""
    data = bytes((i * 7) % 251 for i in range(2048))
    oci.push_blob(repo, data)
    return digest_of(data), data


TAGS = ["latest", "1.0", "b", "a", "Z", "_x", "a-b", "A", "1.0.1", "a.b", "v2"]


@pytest.fixture
def tagged(oci: OCIClient, repo: str) -> list[str]:
    image = oci.push_image(repo, TAGS[0])
    for tag in TAGS[1:]:
        assert oci.put_manifest(repo, tag, image.body, image.media_type).status_code == 201
    return sorted(TAGS)  # ASCIIbetical: Go's sort.Strings
