"""GET /v2/_catalog: every repository, paginated with n, last and Link headers."""

from __future__ import annotations

import uuid
from urllib.parse import parse_qs, urlsplit

import httpx
from api_suite import next_link
from oci_client import OCIClient


def test_catalog_lists_repositories_with_n_last_and_link(http: httpx.Client, oci: OCIClient) -> None:
    prefix = f"catalog-{uuid.uuid4().hex[:8]}"
    names = sorted(f"{prefix}/r{i}" for i in (3, 0, 4, 1, 2))
    for name in names:
        oci.push_blob(name, name.encode())

    full = http.get("/v2/_catalog").json()["repositories"]
    assert full == sorted(full)
    assert [r for r in full if r.startswith(prefix + "/")] == names

    seen: list[str] = []
    url: str | None = f"/v2/_catalog?n=2&last={prefix}"
    while url is not None and len(seen) < len(names):
        response = http.get(url)
        assert response.status_code == 200
        page = response.json()["repositories"]
        assert len(page) <= 2
        seen += page
        url = next_link(response)
        if url is not None:
            assert urlsplit(url).path == "/v2/_catalog"
            assert parse_qs(urlsplit(url).query) == {"n": ["2"], "last": [page[-1]]}
    assert seen[: len(names)] == names

    assert http.get("/v2/_catalog", params={"n": 1, "last": names[1]}).json()["repositories"] == [names[2]]
    zero = http.get("/v2/_catalog", params={"n": 0})
    assert zero.status_code == 200
    assert zero.json()["repositories"] in ([], None)
    assert "link" not in zero.headers
