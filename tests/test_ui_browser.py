"""The web pages in a real browser: Debian's Chromium, headless, driven by Playwright.

A person signs in, searches for a pushed repository, opens a tag and reads its size, platforms and
signature state; a user limited to `team/**` never sees another repository, and the pages make no
request but for themselves and their stylesheet and script. Screenshots (laptop and phone widths)
go into test-artifacts/ui/ (or $WHARF_TEST_ARTIFACTS/ui/).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cosign_writer import write_signature
from oci_client import OCIClient
from secure_registry import SecureWharf, make_users

from node import cosign
from node.ui.present import size

CHROMIUM = "/usr/bin/chromium"
# Headless as root, with nothing reaching for the internet (see the machine notes in the README).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
USERS = {"admin": "admin-Pass-1", "teamdev": "team-Pass-2"}
ACCESS = {
    "rules": [
        {"repositories": ["**"], "users": ["admin"], "actions": ["*"]},
        {"repositories": ["team/**"], "users": ["teamdev"], "actions": ["pull"]},
    ]
}
ARTIFACTS = (
    Path(os.environ.get("WHARF_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts")) / "ui"
)

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is installed by `make test`")
if not shutil.which(CHROMIUM):
    pytest.skip("Debian's chromium is installed by `make test`", allow_module_level=True)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureWharf]:
    root = tmp_path_factory.mktemp("ui-browser")
    users = make_users(root / "htpasswd", USERS)
    key = cosign.generate_key("ecdsa-p256")
    public = root / "trusted.pub"
    public.write_bytes(cosign.public_pem(key.public_key()))
    process = SecureWharf(
        root / "node",
        http={"insecure": True},
        auth={"htpasswd": {"realm": "ui", "path": str(users)}},
        access=ACCESS,
        signatures={"policies": [{"name": "team", "repositories": ["team/**"], "keys": [str(public)], "mode": "warn"}]},
    )
    process.start()
    with process.client(auth=("admin", USERS["admin"])) as http:
        oci = OCIClient(http)
        amd64 = oci.push_image("team/webapp", None, layers=[b"amd64 layer" * 4000])
        arm64 = oci.push_image(
            "team/webapp", None, layers=[b"arm64 layer" * 3000], config=b'{"architecture":"arm64","os":"linux"}'
        )
        index = oci.push_index("team/webapp", "v2", [amd64, arm64])
        single = oci.push_image("team/webapp", "v1", layers=[b"single layer" * 2000])
        written = write_signature(http, "team/webapp", single.digest, key)
        assert written.status_code == 201, written.text
        oci.push_image("secret/payroll", "v1", layers=[b"payroll"])
        for i in range(30):
            oci.push_image(f"team/svc{i:02d}", "latest", layers=[f"svc {i}".encode()])
        details = http.get("/wharf/v1/repositories/team/webapp/tags").json()["tags"]
    process.facts = {  # type: ignore[attr-defined]
        "index": index.digest,
        "single": single.digest,
        "sizes": {row["tag"]: row["size"] for row in details},
    }
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


class Visit:
    """One browser context (its own cookies) that records every request its pages make."""

    def __init__(self, browser: Any, registry: SecureWharf, **context: Any) -> None:
        self.context = browser.new_context(**context)
        self.context.set_default_timeout(30_000)
        self.page = self.context.new_page()
        self.requests: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.registry = registry

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def sign_in(self, user: str, start: str = "/ui/") -> None:
        self.page.goto(self.registry.url + start)
        assert "/ui/sign-in" in self.page.url  # no session: the sign-in page, wherever one starts
        self.page.fill("input[name=username]", user)
        self.page.fill("input[name=password]", USERS[user])
        self.page.click("button[type=submit]")
        self.page.wait_for_selector("[data-testid=user]")
        assert self.page.inner_text("[data-testid=user]") == user

    def close(self) -> None:
        self.context.close()


def test_sign_in_search_open_a_tag_and_read_size_platforms_and_signature(browser: Any, registry: SecureWharf) -> None:
    visit = Visit(browser, registry, viewport={"width": 1280, "height": 900})
    try:
        page = visit.page
        visit.page.goto(registry.url + "/ui/")
        visit.shot("01-sign-in")
        visit.sign_in("admin")
        visit.shot("02-repositories")
        page.fill("[data-testid=search]", "webapp")
        page.press("[data-testid=search]", "Enter")
        page.wait_for_url(re.compile(r".*q=webapp.*"))
        links = page.locator("a.repo")
        assert links.count() == 1 and links.first.inner_text() == "team/webapp"
        links.first.click()
        page.wait_for_selector("[data-testid=tags]")
        visit.shot("03-repository")
        facts = registry.facts  # type: ignore[attr-defined]
        v2 = page.locator("tr[data-tag=v2]")
        assert v2.locator("[data-testid=size]").inner_text() == size(facts["sizes"]["v2"])
        assert v2.locator("[data-testid=platforms] .platform").all_inner_texts() == ["linux/arch0", "linux/arch1"]
        v1 = page.locator("tr[data-tag=v1]")
        assert v1.locator("[data-testid=size]").inner_text() == size(facts["sizes"]["v1"])
        assert v1.locator("[data-testid=platforms]").inner_text() == "linux/amd64"
        assert v1.locator("[data-testid=signature] .badge").get_attribute("data-state") == "verified"
        assert v2.locator("[data-testid=signature] .badge").get_attribute("data-state") == "unsigned"
        v1.locator("a.tag").click()
        page.wait_for_selector("[data-testid=image]")
        visit.shot("04-image")
        assert page.inner_text("[data-testid=digest]") == facts["single"]
        assert page.locator("[data-testid=image-signature] .badge").get_attribute("data-state") == "verified"
        assert f"docker pull 127.0.0.1:{registry.port}/team/webapp:v1" in page.inner_text("[data-testid=pull]")
        assert page.locator("[data-testid=layers] tbody tr").count() == 1
        page.goto(registry.url + "/ui/r/team/webapp/-/manifest/v2")
        assert page.locator("[data-testid=children] tbody tr").count() == 2
        page.goto(registry.url + "/ui/usage")
        visit.shot("05-usage")
        page.goto(registry.url + "/ui/maintenance")
        visit.shot("06-maintenance")
        # Nothing but the pages themselves: no API call, no other host.
        assert all(url.startswith(registry.url + "/ui/") for url in visit.requests), visit.requests
    finally:
        visit.close()


def test_a_team_user_sees_only_team_repositories_on_every_page(browser: Any, registry: SecureWharf) -> None:
    visit = Visit(browser, registry, viewport={"width": 1280, "height": 900})
    try:
        page = visit.page
        visit.sign_in("teamdev", start="/ui/r/team/webapp")
        assert page.url.endswith("/ui/r/team/webapp")  # back where the sign-in started
        seen: list[str] = []
        for path in ["/ui/", "/ui/?q=a", "/ui/usage", "/ui/maintenance", "/ui/r/team/webapp", "/ui/r/secret/payroll"]:
            page.goto(registry.url + path)
            seen.append(page.content())
        # Every page of the repository list, through its own links.
        page.goto(registry.url + "/ui/")
        names: list[str] = []
        for _ in range(5):
            names += page.locator("a.repo").all_inner_texts()
            following = page.locator("[data-testid=next]")
            if following.count() == 0:
                break
            following.click()
            page.wait_for_load_state()
            seen.append(page.content())
        assert names == sorted(names) and len(names) == 31 and all(n.startswith("team/") for n in names)
        assert all("payroll" not in html.replace("secret%2Fpayroll", "") for html in seen[:-1])
        assert "payroll" not in page.content()
        page.goto(registry.url + "/ui/r/secret/payroll")
        assert page.inner_text("[data-testid=error]") == "No such repository."
        visit.shot("07-team-user-refused")
        assert all(url.startswith(registry.url + "/ui/") for url in visit.requests)
        assert not any("/v2/" in url or "/wharf/v1/" in url for url in visit.requests)
    finally:
        visit.close()


def test_the_pages_fit_a_phone(browser: Any, registry: SecureWharf) -> None:
    visit = Visit(browser, registry, viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    try:
        page = visit.page
        visit.sign_in("admin")
        for name, path in [("08-phone-repositories", "/ui/"), ("09-phone-repository", "/ui/r/team/webapp")]:
            page.goto(registry.url + path)
            visit.shot(name)
            # The page itself never scrolls sideways; wide tables scroll inside their own box.
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 390, (path, width)
    finally:
        visit.close()
