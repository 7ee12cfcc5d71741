"""GET /v2/: the API version check."""

from __future__ import annotations

import httpx


def test_version_check_answers_200_with_api_version_header(http: httpx.Client) -> None:
    response = http.get("/v2/")
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert http.head("/v2/").status_code == 200
