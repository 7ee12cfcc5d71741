"""GET /v2/<name>/tags/list: lexical order, pagination with n, last and Link headers."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from api_suite import new_repo, next_link
from oci_client import OCIClient, assert_error


def test_tags_list_is_in_lexical_order(http: httpx.Client, repo: str, tagged: list[str]) -> None:
    response = http.get(f"/v2/{repo}/tags/list")
    assert response.status_code == 200
    assert response.json() == {"name": repo, "tags": tagged}
    assert "link" not in response.headers


@pytest.mark.parametrize("n", [1, 3, 4, 10])
def test_tags_pagination_follows_link_headers(http: httpx.Client, repo: str, tagged: list[str], n: int) -> None:
    seen: list[str] = []
    url: str | None = f"/v2/{repo}/tags/list?n={n}"
    pages = 0
    while url is not None:
        response = http.get(url)
        assert response.status_code == 200, response.text
        page = response.json()["tags"] or []
        assert len(page) <= n
        seen += page
        url = next_link(response)
        if url is not None:
            assert len(page) == n, "a page short of n must be the last"
            assert urlsplit(url).path == f"/v2/{repo}/tags/list"
            query = parse_qs(urlsplit(url).query)
            assert query["n"] == [str(n)]
            assert query["last"] == [page[-1]]
        pages += 1
        assert pages <= len(tagged) + 1
    assert seen == tagged


def test_tags_n_and_last_select_a_page(http: httpx.Client, repo: str, tagged: list[str]) -> None:
    after = tagged.index("a")
    response = http.get(f"/v2/{repo}/tags/list", params={"n": 2, "last": "a"})
    assert response.json()["tags"] == tagged[after + 1 : after + 3]
    response = http.get(f"/v2/{repo}/tags/list", params={"last": "a"})
    assert response.json()["tags"] == tagged[after + 1 :]
    response = http.get(f"/v2/{repo}/tags/list", params={"last": "b0"})  # need not be an existing tag
    assert response.json()["tags"] == [t for t in tagged if t > "b0"]
    response = http.get(f"/v2/{repo}/tags/list", params={"n": 100})
    assert response.json()["tags"] == tagged
    assert "link" not in response.headers


def test_tags_n_zero_is_an_empty_list_without_link(http: httpx.Client, repo: str, tagged: list[str]) -> None:
    response = http.get(f"/v2/{repo}/tags/list", params={"n": 0})
    assert response.status_code == 200
    assert response.json()["tags"] in ([], None)
    assert "link" not in response.headers


def test_tags_of_unknown_repository_is_name_unknown(http: httpx.Client) -> None:
    assert_error(http.get(f"/v2/{new_repo()}/tags/list"), 404, "NAME_UNKNOWN")


@pytest.mark.parametrize("n", ["-1", "abc", "1.5", "1e3"])
def test_tags_invalid_n_is_400(http: httpx.Client, repo: str, tagged: list[str], n: str) -> None:
    assert_error(http.get(f"/v2/{repo}/tags/list", params={"n": n}), 400, "PAGINATION_NUMBER_INVALID")


def test_tags_list_is_empty_once_every_tag_is_deleted(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    oci.push_image(repo, "only")
    assert http.delete(f"/v2/{repo}/manifests/only").status_code == 202
    response = http.get(f"/v2/{repo}/tags/list")
    assert response.status_code == 200
    assert response.json()["tags"] in ([], None)


def test_whole_tag_list_follows_each_tag_pushed_and_deleted(http: httpx.Client, oci: OCIClient, repo: str) -> None:
    oci.push_image(repo, "one")
    for _ in range(2):  # the second answer comes from what the first one kept
        assert http.get(f"/v2/{repo}/tags/list").json() == {"name": repo, "tags": ["one"]}
    oci.push_image(repo, "two")
    assert http.get(f"/v2/{repo}/tags/list").content == f'{{"name": "{repo}", "tags": ["one", "two"]}}'.encode()
    assert http.delete(f"/v2/{repo}/manifests/one").status_code == 202
    assert http.get(f"/v2/{repo}/tags/list").json() == {"name": repo, "tags": ["two"]}
