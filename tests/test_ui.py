"""The web pages over real HTTP: what they show, to whom, and that they never show more than the API.

A registry with htpasswd and access rules (admin: everything; teamdev: pull on team/**; anonymous:
pull on public/**), seeded through the API. Pages are read with a plain HTTP client that keeps the
sign-in cookie, as a browser does (tests/test_ui_browser.py drives Chromium through the same pages).
"""

from __future__ import annotations

import contextlib
import html
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cosign_writer import write_signature
from oci_client import OCIClient, digest_of, raw_request
from secure_registry import SecureWharf, bearer, fetch_token, make_cert, make_users, token_section
from services import wait_until

from node import cosign
from node.auth import htpasswd
from node.config import ConfigError, load
from node.storage import layout

USERS = {"admin": "admin-Pass-1", "teamdev": "team-Pass-2"}
ACCESS = {
    "rules": [
        {"repositories": ["**"], "users": ["admin"], "actions": ["*"]},
        {"repositories": ["team/**"], "users": ["teamdev"], "actions": ["pull"]},
        {"repositories": ["public/**"], "anonymous": True, "actions": ["pull"]},
    ]
}
TEAM = ["team/app", "team/tools/builder"]
PUBLIC = "public/base"  # anyone may pull it, signed in or not
OTHERS = ["secret/payroll", "infra/db"]
PAGES = ["/ui/", "/ui/?q=app", "/ui/usage", "/ui/maintenance", "/ui/r/team/app", "/ui/r/team/app/-/manifest/v1"]


def _text(page: httpx.Response) -> str:
    """A page's visible text, tags dropped and entities decoded."""
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.text)))


def _sign_in(process: SecureWharf, user: str, password: str, **headers: str) -> httpx.Response:
    with process.client() as http:
        return http.post(
            "/ui/sign-in",
            data={"username": user, "password": password, "next": "/ui/"},
            headers={"Origin": process.url, **headers},
        )


@contextlib.contextmanager
def _browser(process: SecureWharf, user: str) -> Iterator[httpx.Client]:
    """A client holding `user`'s session cookie."""
    with process.client() as client:
        signed = client.post(
            "/ui/sign-in",
            data={"username": user, "password": USERS[user], "next": "/ui/"},
            headers={"Origin": process.url},
        )
        assert signed.status_code == 303, signed.text
        assert "wharf_ui" in client.cookies
        yield client


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureWharf]:
    root = tmp_path_factory.mktemp("ui")
    users = make_users(root / "htpasswd", USERS)
    process = SecureWharf(
        root / "node",
        http={"insecure": True},
        auth={"htpasswd": {"realm": "ui", "path": str(users)}},
        access=ACCESS,
        ratelimit={"authfailures": {"peraddress": 0, "peruser": 0}},
        audit={"path": str(root / "node" / "audit.log")},
        quotas=[{"namespace": "team/", "limit": "1GiB"}, {"repository": "secret/payroll", "limit": "10MiB"}],
    )
    process.users_path = users  # type: ignore[attr-defined]
    process.start()
    with process.client(auth=("admin", USERS["admin"])) as http:
        oci = OCIClient(http)
        images = {name: oci.push_image(name, "v1", layers=[name.encode() * 1000]) for name in [*TEAM, PUBLIC, *OTHERS]}
        child = oci.push_image("team/app", None, layers=[b"arm layer" * 500])
        oci.push_index("team/app", "multi", [images["team/app"], child])
        process.images = images  # type: ignore[attr-defined]
    try:
        yield process
    finally:
        process.stop()


# -- who may see what -----------------------------------------------------------------------------


def test_every_page_without_a_session_redirects_to_sign_in(registry: SecureWharf) -> None:
    with registry.client() as http:
        for path in [*PAGES, "/ui/r/secret/payroll", "/ui/no-such-page", "/ui/r/team/app?sort=name&last=x"]:
            page = http.get(path)
            assert page.status_code == 303, (path, page.status_code)
            assert page.headers["location"].startswith("/ui/sign-in?next="), path
            assert "team/app" not in page.text and "payroll" not in page.text
        # The sign-in page and its stylesheet need no session.
        assert http.get("/ui/sign-in").status_code == 200
        assert http.get("/ui/static/wharf.css").status_code == 200


def test_a_forged_tampered_or_foreign_cookie_is_no_session(registry: SecureWharf) -> None:
    with _browser(registry, "teamdev") as good:
        cookie = good.cookies["wharf_ui"]
    for forged in [cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB"), "x", cookie + "x", "a" * 5000]:
        with registry.client(cookies={"wharf_ui": forged}) as http:
            assert http.get("/ui/").status_code == 303
    with registry.client(cookies={"wharf_ui": cookie}) as http:
        assert http.get("/ui/").status_code == 200


def test_a_user_limited_to_team_never_sees_another_repository(registry: SecureWharf) -> None:
    with _browser(registry, "teamdev") as http:
        pages = {path: http.get(path) for path in PAGES}
        for path in ["/ui/?q=e", "/ui/?q=secret", "/ui/?after=a", "/ui/usage", "/ui/r/team/app?sort=name"]:
            pages[path] = http.get(path)
        for path, page in pages.items():
            assert page.status_code in (200, 403), (path, page.status_code)
            for other in OTHERS:
                assert other not in page.text, (path, other)
        listed = _text(pages["/ui/"])
        assert all(name in listed for name in [*TEAM, PUBLIC]) and "3 repositories" in listed
        # Another repository's pages are the same 404 as a repository that does not exist.
        for path in ["/ui/r/secret/payroll", "/ui/r/secret/payroll/-/manifest/v1", "/ui/r/does/not/exist"]:
            page = http.get(path)
            assert page.status_code == 404 and "payroll" not in page.text.replace(path, ""), path
        digest = registry.images["secret/payroll"].digest  # type: ignore[attr-defined]
        assert http.get(f"/ui/r/secret/payroll/-/manifest/{digest}").status_code == 404
        # Figures about every repository are for those who may pull them all.
        assert pages["/ui/maintenance"].status_code == 403
        usage = _text(pages["/ui/usage"])
        assert "team/" in usage and "10 MiB" not in usage  # the team quota, not the payroll one


def test_the_admin_sees_every_repository_quota_and_maintenance(registry: SecureWharf) -> None:
    with _browser(registry, "admin") as http:
        listed = _text(http.get("/ui/"))
        assert all(name in listed for name in TEAM + OTHERS)
        usage = _text(http.get("/ui/usage"))
        assert "secret/payroll" in usage and "10 MiB" in usage and "1 GiB" in usage
        maintenance = http.get("/ui/maintenance")
        assert maintenance.status_code == 200
        assert "Garbage collection" in maintenance.text and "every 1 h" in _text(maintenance)


def test_a_guest_session_sees_what_anonymous_callers_may_pull(registry: SecureWharf) -> None:
    with registry.client() as http:
        assert "Browse as a guest" in http.get("/ui/sign-in").text
        made = http.post("/ui/guest", data={"next": "/ui/"}, headers={"Origin": registry.url})
        assert made.status_code == 303 and "wharf_ui" in http.cookies
        listed = _text(http.get("/ui/"))
        assert PUBLIC in listed and "1 repository" in listed
        assert all(name not in listed for name in TEAM + OTHERS)
        assert http.get("/ui/r/team/app").status_code == 404


def test_wrong_passwords_are_refused_and_audited_without_a_session(registry: SecureWharf) -> None:
    refused = _sign_in(registry, "teamdev", "not-the-password")
    assert refused.status_code == 401 and "wharf_ui" not in refused.cookies
    assert "Wrong user name or password" in refused.text
    assert _sign_in(registry, "nobody", "whatever").status_code == 401
    assert _sign_in(registry, "", "").status_code == 400
    # A form posted from another site changes no session.
    assert _sign_in(registry, "teamdev", USERS["teamdev"], Origin="http://evil.example").status_code == 403
    signed = _sign_in(registry, "teamdev", USERS["teamdev"])
    assert signed.status_code == 303 and "wharf_ui" in signed.cookies
    cookie = signed.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "path=/ui/" in cookie
    log = registry.data_dir / "audit.log"

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log.read_text().splitlines() if '"login"' in line]

    wait_until(lambda: len(lines()) >= 3, timeout=10, what="sign-in audit lines")
    found = lines()
    denied = [line for line in found if line["result"] == "denied" and line.get("refused_by") == "signin"]
    assert {line["user"] for line in denied} >= {"teamdev", "nobody"}
    assert any(line["result"] == "success" and line["user"] == "teamdev" for line in found)
    assert USERS["teamdev"] not in log.read_text() and "not-the-password" not in log.read_text()


def test_after_sign_in_the_user_lands_only_on_these_pages(registry: SecureWharf) -> None:
    for target, expected in [
        ("/ui/r/team/app", "/ui/r/team/app"),
        ("//evil.example/ui/", "/ui/"),
        ("https://evil.example/ui/", "/ui/"),
        ("/v2/_catalog", "/ui/"),
        ("/ui/\\evil", "/ui/"),
    ]:
        with registry.client() as http:
            signed = http.post(
                "/ui/sign-in",
                data={"username": "admin", "password": USERS["admin"], "next": target},
                headers={"Origin": registry.url},
            )
            assert signed.status_code == 303 and signed.headers["location"] == expected, target


def test_a_changed_password_or_removed_user_ends_the_session(registry: SecureWharf, tmp_path: Path) -> None:
    users = registry.users_path  # type: ignore[attr-defined]
    htpasswd.set_password(str(users), "leaver", "leaver-Pass-9", 4)
    USERS["leaver"] = "leaver-Pass-9"
    try:
        with _browser(registry, "admin") as admin:
            pass
        session = registry.client()
        wait_until(
            lambda: (
                session.post(
                    "/ui/sign-in",
                    data={"username": "leaver", "password": USERS["leaver"], "next": "/ui/"},
                    headers={"Origin": registry.url},
                ).status_code
                == 303
            ),
            timeout=15,
            what="the new user signs in once the file is re-read",
        )
        assert session.get("/ui/").status_code == 200
        htpasswd.set_password(str(users), "leaver", "another-Pass-0", 4)
        wait_until(lambda: session.get("/ui/").status_code == 303, timeout=15, what="the old session ends")
        assert admin.cookies  # another user's session is untouched
        with registry.client(cookies=dict(admin.cookies)) as still:
            assert still.get("/ui/").status_code == 200
        session.close()
    finally:
        htpasswd.remove_user(str(users), "leaver")
        USERS.pop("leaver", None)


def test_sign_out_clears_the_session(registry: SecureWharf) -> None:
    with _browser(registry, "teamdev") as http:
        assert http.get("/ui/").status_code == 200
        out = http.post("/ui/sign-out", headers={"Origin": registry.url})
        assert out.status_code == 303
        assert http.get("/ui/").status_code == 303


def test_the_pages_carry_a_strict_content_security_policy(registry: SecureWharf) -> None:
    with _browser(registry, "admin") as http:
        page = http.get("/ui/r/team/app")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert " style=" not in page.text and "<script>" not in page.text  # nothing inline


# -- what the pages show ----------------------------------------------------------------------------


def test_a_repository_page_shows_tags_sizes_platforms_and_pull_commands(registry: SecureWharf) -> None:
    with _browser(registry, "admin") as http:
        page = http.get("/ui/r/team/app?sort=name")
        assert page.status_code == 200
        text = _text(page)
        image = registry.images["team/app"]  # type: ignore[attr-defined]
        assert "multi" in text and "v1" in text and "2 tags" in text
        assert cosign_short(image.digest) in text
        assert "linux/arch0" in text and "linux/arch1" in text  # the index's platforms
        assert "linux/amd64" in text  # the image's, from its config
        # The size is what a pull downloads: the manifest, its config and layers, each once.
        with registry.client(auth=("admin", USERS["admin"])) as api:
            details = api.get("/wharf/v1/repositories/team/app/tags").json()["tags"]
        sizes = {row["tag"]: row["size"] for row in details}
        assert f'title="{sizes["v1"]} bytes"' in page.text and f'title="{sizes["multi"]} bytes"' in page.text
        assert f"docker pull 127.0.0.1:{registry.port}/team/app:" in text
        assert f"podman pull --tls-verify=false 127.0.0.1:{registry.port}/team/app:" in text
        assert f"skopeo inspect --tls-verify=false docker://127.0.0.1:{registry.port}/team/app:" in text


def cosign_short(digest: str) -> str:
    return digest[: len("sha256:") + 12]


def test_an_image_page_shows_manifest_config_layers_and_referrers(registry: SecureWharf) -> None:
    with registry.client(auth=("admin", USERS["admin"])) as api:
        oci = OCIClient(api)
        subject = registry.images["team/app"]  # type: ignore[attr-defined]
        sbom = oci.push_image(
            "team/app",
            None,
            layers=[b'{"spdxVersion": "SPDX-2.3"}'],
            config=b"{}",
            config_type="application/vnd.oci.empty.v1+json",
            artifactType="application/spdx+json",
            subject={"mediaType": subject.media_type, "digest": subject.digest, "size": len(subject.body)},
        )
    with _browser(registry, "teamdev") as http:
        page = http.get(f"/ui/r/team/app/-/manifest/{subject.digest}")
        assert page.status_code == 200
        text = _text(page)
        assert subject.digest in text and "linux/amd64" in text
        assert "application/spdx+json" in text and cosign_short(sbom.digest) in text
        assert "Layers" in text and "application/vnd.oci.image.layer.v1.tar" in text
        assert '"schemaVersion": 2' in html.unescape(page.text)
        index = http.get("/ui/r/team/app/-/manifest/multi")
        assert "linux/arch0" in _text(index) and "Platforms" in _text(index)
        assert http.get("/ui/r/team/app/-/manifest/nope").status_code == 404
        assert http.get("/ui/r/team/app/-/manifest/sha256:" + "0" * 64).status_code == 404
        assert http.get("/ui/r/team/app/-/manifest/sha256:zz").status_code == 404


def test_signature_state_shows_a_stored_cosign_signature(registry: SecureWharf) -> None:
    with registry.client(auth=("admin", USERS["admin"])) as api:
        image = OCIClient(api).push_image("team/tools/builder", "signed", layers=[b"signed layer"])
        written = write_signature(api, "team/tools/builder", image.digest, cosign.generate_key("ecdsa-p256"))
        assert written.status_code == 201, written.text
    with _browser(registry, "teamdev") as http:
        page = http.get("/ui/r/team/tools/builder?sort=name")
        rows = dict(re.findall(r'<tr data-tag="([^"]+)".*?data-testid="signature">(.*?)</td>', page.text, re.S))
        assert 'data-state="signed"' in rows["signed"]
        assert 'data-state="none"' in rows["v1"]
        assert "signature" in _text(page)  # the .sig tag is named for what it is
        image_page = http.get("/ui/r/team/tools/builder/-/manifest/signed")
        assert 'data-state="signed"' in image_page.text


def test_search_and_pagination_over_many_repositories(tmp_path: Path) -> None:
    process = SecureWharf(tmp_path / "open")
    with process:
        with process.client() as http:
            empty = http.get("/ui/")
            assert empty.status_code == 200 and "No repositories yet" in empty.text
            oci = OCIClient(http)
            first = oci.push_image("bulk/r000", "v1", layers=[b"shared layer"])
            for i in range(1, 120):
                oci.push_manifest(f"bulk/r{i:03d}", "v1", _mounted(http, "bulk/r000", f"bulk/r{i:03d}", first))
            for t in range(60):
                oci.push_manifest("bulk/r000", f"t{t:02d}", json.loads(first.body))
            seen: list[str] = []
            path = "/ui/"
            for _ in range(5):
                page = http.get(path)
                seen += re.findall(r'class="repo" href="/ui/r/([^"]+)"', page.text)
                nxt = re.search(r'rel="next" data-testid="next" href="([^"]+)"', page.text)
                if not nxt:
                    break
                path = html.unescape(nxt.group(1))
            assert seen == [f"bulk/r{i:03d}" for i in range(120)]
            found = _text(http.get("/ui/?q=R11"))
            assert "10 repositories" in found and "bulk/r119" in found and "bulk/r100" not in found
            assert "No repository matches" in http.get("/ui/?q=zzz").text
            tags = http.get("/ui/r/bulk/r000?sort=name")
            assert len(re.findall(r"<tr data-tag=", tags.text)) == 50 and 'rel="next"' in tags.text
            nxt = html.unescape(re.search(r'rel="next" data-testid="next" href="([^"]+)"', tags.text).group(1))
            assert len(re.findall(r"<tr data-tag=", http.get(nxt).text)) == 11
            assert "t00" in _text(http.get("/ui/r/bulk/r000?filter=t0*"))
            assert "No tag matches" in http.get("/ui/r/bulk/r000?filter=nothing*").text


def _mounted(http: httpx.Client, source: str, repo: str, image: Any) -> dict[str, Any]:
    doc = json.loads(image.body)
    for blob in [doc["config"], *doc["layers"]]:
        mounted = http.post(f"/v2/{repo}/blobs/uploads/", params={"mount": blob["digest"], "from": source})
        assert mounted.status_code == 201, mounted.text
    return doc


def test_a_missing_blob_or_manifest_is_shown_not_a_server_error(tmp_path: Path) -> None:
    process = SecureWharf(tmp_path / "broken")
    with process:
        with process.client() as http:
            image = OCIClient(http).push_image("broken/app", "v1", layers=[b"layer that goes missing"])
            doc = json.loads(image.body)
        root = Path(process.config["storage"]["filesystem"]["rootdirectory"])
        (root / layout.blob_key(doc["config"]["digest"])).unlink()
        with process.client() as http:
            page = http.get("/ui/r/broken/app/-/manifest/v1")
            assert page.status_code == 200 and 'data-testid="config-missing"' in page.text
            assert http.get("/ui/r/broken/app").status_code == 200
        (root / layout.blob_key(image.digest)).unlink()
        process.stop()
        process.start()
        with process.client() as http:
            page = http.get("/ui/r/broken/app/-/manifest/v1")
            assert page.status_code == 200 and 'data-testid="missing"' in page.text
            assert http.get("/ui/r/broken/app").status_code == 200


def test_turned_off_the_pages_answer_404_even_with_auth_on(tmp_path: Path) -> None:
    users = make_users(tmp_path / "htpasswd", {"admin": USERS["admin"]})
    process = SecureWharf(
        tmp_path / "off", http={"insecure": True}, auth={"htpasswd": {"path": str(users)}}, ui={"enabled": False}
    )
    with process:
        with process.client(auth=("admin", USERS["admin"])) as http:
            for path in ["/ui/", "/ui", "/ui/r/team/app", "/ui/static/wharf.css", "/ui/sign-in"]:
                assert http.get(path).status_code == 404, path
            assert http.post("/ui/sign-in", data={"username": "admin"}).status_code == 404
            assert http.get("/v2/").status_code == 200


def test_a_tag_moved_is_shown_at_once(tmp_path: Path) -> None:
    process = SecureWharf(tmp_path / "moves")
    with process:
        with process.client() as http:
            oci = OCIClient(http)
            first = oci.push_image("moves/app", "latest", layers=[b"one"])
            assert cosign_short(first.digest) in _text(http.get("/ui/r/moves/app"))
            second = oci.push_image("moves/app", "latest", layers=[b"two"])
            page = _text(http.get("/ui/r/moves/app"))
            assert cosign_short(second.digest) in page and cosign_short(first.digest) not in page
            assert second.digest in _text(http.get("/ui/r/moves/app/-/manifest/latest"))
            http.delete(f"/v2/moves/app/manifests/{second.digest}")
            assert "no tags" in _text(http.get("/ui/r/moves/app"))


def test_hostile_input_gets_a_page_not_an_error(registry: SecureWharf) -> None:
    with _browser(registry, "admin") as http:
        for path in [
            "/ui/?q=" + "%3Cscript%3E" * 50,
            "/ui/?after=" + "z" * 5000,
            "/ui/r/team/app?sort=bogus&last=" + "%00" * 10,
            "/ui/r/team/app?filter=[[[",
            "/ui/r/Team/App",
            "/ui/r/" + "a/" * 200,
            "/ui/r/team/app/-/manifest/" + "x" * 300,
            "/ui/r/team/app/-/manifest/..%2F..%2Fetc",
            "/ui/maintenance?preview=everything",
        ]:
            page = http.get(path)
            assert page.status_code in (200, 404), (path, page.status_code)
            assert "<script>" not in page.text
    for path in ["/ui/static/../../../etc/passwd", "/ui/static/%2e%2e/%2e%2e/pages.py", "/ui/static/../pages.py"]:
        status, _, body = raw_request("127.0.0.1", registry.port, "GET", path)
        assert status in (303, 404) and b"import" not in body and b"root:" not in body, path


def test_the_gc_and_retention_previews_change_nothing(registry: SecureWharf) -> None:
    with registry.client(auth=("admin", USERS["admin"])) as api:
        before = api.get("/v2/_catalog").json()
        tags_before = api.get("/v2/team/app/tags/list").json()
    with _browser(registry, "admin") as http:
        page = http.get("/ui/maintenance?preview=gc")
        assert page.status_code == 200 and 'data-testid="gc-preview"' in page.text
        assert "A dry run" in _text(page)
    with registry.client(auth=("admin", USERS["admin"])) as api:
        assert api.get("/v2/_catalog").json() == before
        assert api.get("/v2/team/app/tags/list").json() == tags_before
        assert api.get(f"/v2/team/app/manifests/{digest_of(registry.images['team/app'].body)}").status_code == 200  # type: ignore[attr-defined]


def test_the_ui_section_is_checked_at_start_up(tmp_path: Path) -> None:
    for section, expected in [
        ({"session": "10s"}, "ui.session"),
        ({"enabled": "sometimes"}, "ui.enabled"),
        ({"theme": "dark"}, "theme"),
    ]:
        path = tmp_path / "config.yml"
        path.write_text(json.dumps({"version": 0.1, "ui": section}))
        with pytest.raises(ConfigError) as refused:
            load(str(path))
        assert expected in str(refused.value), section
    path = tmp_path / "config.yml"
    path.write_text(json.dumps({"version": 0.1, "ui": {"enabled": False, "session": "2h"}}))
    loaded = load(str(path))
    assert loaded.ui.enabled is False and loaded.ui.session == 7200


def test_with_the_token_service_people_sign_in_with_its_users_under_the_same_rules(tmp_path: Path) -> None:
    users = make_users(tmp_path / "htpasswd", USERS)
    key = make_cert(tmp_path / "keys", "127.0.0.1")[1]
    process = SecureWharf(tmp_path / "token", http={"insecure": True}, auth=token_section(key, users), access=ACCESS)
    with process:
        token = fetch_token(
            process, ["repository:team/app:push,pull", "repository:secret/payroll:push,pull"], ("admin", USERS["admin"])
        )
        with process.client(headers=bearer(token)) as api:
            OCIClient(api).push_image("team/app", "v1")
            OCIClient(api).push_image("secret/payroll", "v1")
        with process.client() as http:
            assert http.get("/ui/").status_code == 303
        with _browser(process, "teamdev") as http:
            listed = _text(http.get("/ui/"))
            assert "team/app" in listed and "payroll" not in listed
            assert http.get("/ui/r/secret/payroll").status_code == 404


def test_under_an_http_prefix_every_link_and_the_cookie_stay_under_it(tmp_path: Path) -> None:
    users = make_users(tmp_path / "htpasswd", USERS)
    process = SecureWharf(
        tmp_path / "prefixed",
        http={"insecure": True, "prefix": "/registry/"},
        auth={"htpasswd": {"path": str(users)}},
        access=ACCESS,
    )
    with process:
        with process.client(auth=("admin", USERS["admin"])) as api:
            pushed = api.post("/registry/v2/team/app/blobs/uploads/")
            assert pushed.status_code == 202, pushed.text
        with process.client() as http:
            page = http.get("/registry/ui/r/team/app")
            assert page.status_code == 303 and page.headers["location"].startswith("/registry/ui/sign-in?next=")
            signed = http.post(
                "/registry/ui/sign-in",
                data={"username": "admin", "password": USERS["admin"], "next": "/registry/ui/"},
                headers={"Origin": process.url},
            )
            assert signed.status_code == 303 and signed.headers["location"] == "/registry/ui/"
            assert "path=/registry/ui/" in signed.headers["set-cookie"].lower()
            home = http.get("/registry/ui/")
            assert home.status_code == 200
            links = re.findall(r'(?:href|src|action)="([^"]+)"', home.text)
            assert links and all(link.startswith("/registry/ui/") for link in links), links
            assert http.get("/registry/ui/static/wharf.css").status_code == 200
