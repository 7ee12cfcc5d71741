"""Access control: every route closed without credentials, the rules in both auth modes, `_catalog` filtered."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
import yaml
from oci_client import OCIClient, digest_of
from secure_registry import (
    TEAM_ACCESS,
    TEAM_USERS,
    SecureWharf,
    assert_refused,
    bearer,
    fetch_token,
    make_cert,
    make_users,
    token_section,
)
from services import wait_until
from starlette.responses import Response
from starlette.routing import Route

from node.app import ROUTES, create_app
from node.auth.access import CATALOG, Access, AccessControl, format_scopes, parse_scopes
from node.config import AccessConfig, AccessRule, ConfigError, load
from node.routing import Endpoint, resolve

ADMIN = ("admin", TEAM_USERS["admin"])
DEV = ("dev", TEAM_USERS["dev"])
ROBOT = ("robot", TEAM_USERS["robot"])
# An example value for each path parameter of the route table.
# Routes that, like `_catalog`, answer anyone and filter (or refuse) by what the caller may pull.
CATALOG_LIKE = ("/v2/_catalog", "/wharf/v1/usage", "/wharf/v1/namespaces/team/usage")
EXAMPLES = {"namespace": "team", "reference": "v1", "uuid": str(uuid.UUID(int=7)), "digest": "sha256:" + "a" * 64}


def _requests(name: str) -> list[tuple[str, str]]:
    """(method, path) for every route and method of node.app.ROUTES, with `name` as the repository."""
    requests = []
    for route in ROUTES:
        assert isinstance(route, Route)
        unknown = set(route.param_convertors) - set(EXAMPLES) - {"name"}
        assert not unknown, f"route {route.path} has parameters this test has no example for: {unknown}"
        path = route.path_format.format(name=name, **EXAMPLES)
        for method in sorted(route.methods or ()):
            requests.append((method, path))
    return requests


def _process(root, keys, users, access: dict[str, Any] | None, mode: str) -> SecureWharf:
    sections: dict[str, Any] = {
        "http": {"insecure": True},
        "ratelimit": {"authfailures": {"peraddress": 0, "peruser": 0}},
    }
    if access is not None:
        sections["access"] = access
    if mode == "basic":
        auth = {"htpasswd": {"realm": "Team", "path": str(users)}}
    else:
        auth = token_section(keys[1], users)
    process = SecureWharf(root / mode, auth=auth, **sections)
    process.mode = mode
    return process


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("access")
    keys = make_cert(root / "keys", "127.0.0.1")
    users = make_users(root / "htpasswd", TEAM_USERS)
    return root, keys, users


@pytest.fixture(scope="module", params=["basic", "token"])
def closed(request, setup):
    """A registry with auth on and no rules: signed-in users may do anything, anonymous callers nothing."""
    root, keys, users = setup
    with _process(root / "closed", keys, users, None, request.param) as process:
        yield process


@pytest.fixture(scope="module", params=["basic", "token"])
def team(request, setup):
    """A registry with the team's rules, seeded by the admin with team/app, ci/base and public/base."""
    root, keys, users = setup
    with _process(root / "team", keys, users, TEAM_ACCESS, request.param) as process:
        with _client(process, ADMIN, ["team/app", "ci/base", "public/base"], push=True, delete=True) as http:
            oci = OCIClient(http)
            process.images = {
                name: oci.push_image(name, "v1", layers=[name.encode()])
                for name in ("team/app", "ci/base", "public/base")
            }
        yield process


def _client(
    process: SecureWharf,
    user: tuple[str, str] | None,
    repositories: list[str],
    *,
    push=False,
    delete=False,
    catalog=False,
):
    """A client for `user`: Basic credentials, or a token asking for what the test will do."""
    if getattr(process, "mode", "basic") == "basic":
        return process.client(auth=user)
    actions = ",".join(["pull"] + (["push"] if push else []) + (["delete"] if delete else []))
    scopes = [f"repository:{name}:{actions}" for name in repositories] + (["registry:catalog:*"] if catalog else [])
    return process.client(headers=bearer(fetch_token(process, scopes, user)))


# -- every route, without credentials -----------------------------------------------------------


def test_every_route_and_method_refuses_requests_without_credentials(closed):
    requests = _requests("team/app")
    assert len(requests) >= len(ROUTES)
    with closed.client() as http:
        for method, path in requests:
            response = http.request(method, path, content=b"{}" if method in ("PUT", "PATCH", "POST") else None)
            assert_refused(response, 401, "UNAUTHORIZED")
            scheme = "Basic" if closed.mode == "basic" else "Bearer"
            assert response.headers["www-authenticate"].startswith(scheme + " "), (method, path)


def test_every_route_and_method_works_for_a_signed_in_user(closed):
    """The other half: nothing above was refused for a reason other than missing credentials."""
    with _client(closed, ADMIN, ["team/app"], push=True, delete=True, catalog=True) as http:
        for method, path in _requests("team/app"):
            response = http.request(method, path)
            assert response.status_code not in (401, 403), (method, path, response.text)


def test_unknown_paths_and_methods_also_need_credentials(closed):
    with closed.client() as http:
        for method, path in [("GET", "/x"), ("GET", "/v2/team/app/unknown"), ("OPTIONS", "/v2/"), ("POST", "/v2/")]:
            assert http.request(method, path).status_code == 401, (method, path)
        assert http.get("/debug/health").status_code == 200
        # `/` answers 200 and nothing more, as registry:2's does for the probes written for it.
        root = http.get("/")
        assert root.status_code == 200 and root.content == b"", root.text
        assert http.post("/").status_code in (401, 405)


def test_anonymous_pull_rules_open_only_pull_routes_of_their_repositories(team):
    with team.client() as http:
        # The version check still challenges, so that clients learn to send credentials elsewhere.
        assert http.get("/v2/").status_code == 401
        assert http.get("/v2/_catalog").json()["repositories"] == ["public/base"]
        for method, path in _requests("public/base"):
            if path in ("/v2/", *CATALOG_LIKE):
                continue
            status = http.request(method, path).status_code
            pull_route = method in ("GET", "HEAD") and "/blobs/uploads/" not in path
            if pull_route:
                assert status != 401, (method, path)
            else:
                assert status == 401, (method, path, status)
        image = team.images["public/base"]
        response = http.get("/v2/public/base/manifests/v1", headers={"Accept": image.media_type})
        assert response.status_code == 200 and response.content == image.body
        for method, path in _requests("team/app"):
            if path not in CATALOG_LIKE:
                assert http.request(method, path).status_code == 401, (method, path)
        # Figures that tell about many repositories, as `_catalog` does: only for who may pull them all,
        # and a refusal names no repository the caller may not pull, nor says that a namespace exists.
        whole = http.get("/wharf/v1/usage")
        assert_refused(whole, 403, "DENIED")
        assert "team/" not in whole.text and "ci/" not in whole.text, whole.text
        hidden = http.get("/wharf/v1/namespaces/team/usage")
        unknown = http.get("/wharf/v1/namespaces/no-such-team/usage")
        assert_refused(hidden, 404, "NAME_UNKNOWN")
        assert_refused(unknown, 404, "NAME_UNKNOWN")
        assert hidden.json()["errors"][0]["detail"] == {"namespace": "team/"}
        assert "team/app" not in hidden.text
        wait_until(  # once the leader has counted the seeded images
            lambda: http.get("/wharf/v1/namespaces/public/usage").status_code == 200,
            timeout=20,
            what="public/ figures for an anonymous caller",
        )


# -- the rules ---------------------------------------------------------------------------------


def test_a_pull_only_user_cannot_push_or_delete(team):
    image = team.images["team/app"]
    blob = digest_of(b"team/app")
    with _client(team, DEV, ["team/app"], push=True, delete=True) as http:
        assert http.get("/v2/team/app/manifests/v1", headers={"Accept": image.media_type}).status_code == 200
        refused = 403 if team.mode == "basic" else 401
        code = "DENIED" if team.mode == "basic" else "UNAUTHORIZED"
        for response in (
            http.post("/v2/team/app/blobs/uploads/"),
            http.post("/v2/team/app/blobs/uploads/", params={"digest": digest_of(b"x")}, content=b"x"),
            http.put("/v2/team/app/manifests/v2", content=image.body, headers={"Content-Type": image.media_type}),
            http.patch(f"/v2/team/app/blobs/uploads/{EXAMPLES['uuid']}", content=b"x"),
            http.delete("/v2/team/app/manifests/v1"),
            http.delete(f"/v2/team/app/manifests/{image.digest}"),
            http.delete(f"/v2/team/app/blobs/{blob}"),
        ):
            assert_refused(response, refused, code)
    with _client(team, ADMIN, ["team/app"]) as http:
        assert http.get("/v2/team/app/tags/list").json()["tags"] == ["v1"]
        assert http.head(f"/v2/team/app/blobs/{blob}").status_code == 200


def test_whole_repository_and_namespace_deletes_need_push_and_delete_on_every_repository(team):
    refused = 403 if team.mode == "basic" else 401
    code = "DENIED" if team.mode == "basic" else "UNAUTHORIZED"
    with _client(team, ROBOT, ["ci/base"], push=True, delete=True) as http:
        assert http.get("/wharf/v1/repositories/ci/base/tags").status_code == 200, "tag details need pull"
        assert_refused(http.delete("/wharf/v1/repositories/ci/base"), refused, code)
        # A namespace's rights are checked on every repository in it, by its handler.
        assert_refused(http.delete("/wharf/v1/namespaces/ci/"), 403, "DENIED")
        # The robot may pull nothing under team/: to it, team/ answers as a namespace that does not exist.
        hidden = http.delete("/wharf/v1/namespaces/team/")
        assert_refused(hidden, 404, "NAME_UNKNOWN")
        assert "team/app" not in hidden.text
    with _client(team, DEV, ["team/app"]) as http:
        assert http.get("/wharf/v1/repositories/team/app/usage").status_code == 200
        assert_refused(http.delete("/wharf/v1/namespaces/team/"), 403, "DENIED")
    with _client(team, ADMIN, ["ci/base", "team/app"]) as http:
        assert http.get("/v2/ci/base/tags/list").json()["tags"] == ["v1"]
        assert http.get("/v2/team/app/tags/list").json()["tags"] == ["v1"]


def test_the_ci_robot_pushes_to_ci_only(team):
    with _client(team, ROBOT, ["ci/build", "team/app"], push=True) as http:
        oci = OCIClient(http)
        oci.push_image("ci/build", "1.0", layers=[b"ci build layer"])
        refused = 403 if team.mode == "basic" else 401
        assert http.post("/v2/team/app/blobs/uploads/").status_code == refused
        assert http.get("/v2/team/app/tags/list").status_code == refused


def test_no_mount_from_a_repository_the_caller_cannot_pull(team):
    secret = digest_of(b"team/app")
    shared = digest_of(b"ci/base")
    with _client(team, ROBOT, ["ci/build", "team/app", "ci/base"], push=True) as http:
        response = http.post("/v2/ci/build/blobs/uploads/", params={"mount": secret, "from": "team/app"})
        assert_refused(
            response, 403 if team.mode == "basic" else 401, "DENIED" if team.mode == "basic" else "UNAUTHORIZED"
        )
        # A second `from` cannot smuggle the secret one past the check.
        response = http.post("/v2/ci/build/blobs/uploads/?mount=" + secret + "&from=ci/base&from=team/app")
        assert response.status_code in (401, 403)
        assert http.head(f"/v2/ci/build/blobs/{secret}").status_code == 404
        mounted = http.post("/v2/ci/build/blobs/uploads/", params={"mount": shared, "from": "ci/base"})
        assert mounted.status_code == 201, mounted.text


def test_catalog_lists_only_what_the_caller_may_pull(team):
    expected = {
        ROBOT: ["ci/base", "ci/build", "public/base"],  # what anonymous callers may pull, anyone may
        DEV: ["ci/base", "ci/build", "public/base", "team/app"],
        None: ["public/base"],
    }
    with _client(team, ROBOT, ["ci/build"], push=True) as http:
        OCIClient(http).push_image("ci/build", "seed", layers=[b"seed"])
    for user, names in expected.items():
        client = team.client() if user is None else _client(team, user, [], catalog=True)
        with client as http:
            response = http.get("/v2/_catalog")
            assert response.status_code == 200, response.text
            assert response.json()["repositories"] == names, user
            first = http.get("/v2/_catalog", params={"n": 1}).json()["repositories"]
            assert first == names[:1]


@pytest.mark.parametrize("team", ["token"], indirect=True)
def test_token_mode_catalog_needs_the_catalog_scope(team):
    with _client(team, DEV, ["team/app"]) as http:
        response = http.get("/v2/_catalog")
    assert_refused(response, 401, "UNAUTHORIZED")
    assert 'scope="registry:catalog:*"' in response.headers["www-authenticate"]


# -- units -------------------------------------------------------------------------------------


def test_scopes_parse_and_format_like_docker():
    accesses = parse_scopes(
        ["repository:team/app:pull,push registry:catalog:*", "repository(plugin):x/y:pull", "bad", ":x:"]
    )
    assert accesses == [
        Access("repository", "team/app", "pull"),
        Access("repository", "team/app", "push"),
        CATALOG,
        Access("repository", "x/y", "pull"),
    ]
    assert format_scopes(accesses) == "repository:team/app:pull,push registry:catalog:* repository:x/y:pull"
    assert parse_scopes(["repository:localhost:5000/app:pull"]) == [Access("repository", "localhost:5000/app", "pull")]


def test_repository_patterns_glob_within_and_across_path_components():
    rules = AccessControl(
        AccessConfig(
            rules=[
                AccessRule(repositories=["ci/*"], users=["a"], actions=["push"]),
                AccessRule(repositories=["team/**"], users=["a"], actions=["pull"]),
                AccessRule(repositories=["**"], users=["*"], actions=["delete"]),
            ]
        )
    )
    assert rules.actions("a", "ci/x") == {"push", "delete"}
    assert rules.actions("a", "ci/x/y") == {"delete"}
    assert rules.actions("a", "team/x/y") == {"pull", "delete"}
    assert rules.actions("b", "team/x") == {"delete"}
    assert rules.actions(None, "team/x") == frozenset()


def test_every_route_has_an_access_rule():
    """A new route needs a deliberate rule in the route table (node/app.py); until then nobody may call it."""
    for route in ROUTES:
        assert isinstance(route, Endpoint), route
        for method in route.methods or ():
            path = route.path_format.format(name="team/app", **EXAMPLES)
            scope = {
                "type": "http",
                "method": method,
                "path": path,
                "root_path": "",
                "query_string": b"",
                "headers": [],
            }
            target = resolve(ROUTES, scope)
            assert target.route is not None, (method, path)
            assert all(a.type == "repository" or a == CATALOG for a in target.needs), (method, path, target.needs)


@pytest.mark.parametrize(
    "rule, message",
    [
        (
            {"repositories": ["public/**"], "anonymous": True, "actions": ["push"]},
            r"access.rules\[0\].actions: expected only pull for anonymous callers, got \['push'\]",
        ),
        (
            {"groups": ["nobody"], "actions": ["pull"]},
            r"access.rules\[0\].groups: expected a group defined in access.groups, got 'nobody'",
        ),
        ({"users": ["a"], "actions": ["write"]}, "actions"),
    ],
)
def test_access_rules_that_would_surprise_are_configuration_errors(tmp_path, rule, message):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"access": {"rules": [rule]}}))
    with pytest.raises(ConfigError, match=message):
        load(str(path), environ={})


def test_a_route_added_outside_the_table_is_closed_until_given_a_rule(tmp_path):
    users = make_users(tmp_path / "htpasswd", {"admin": "pw"})
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump({"http": {"insecure": True}, "auth": {"htpasswd": {"path": str(users)}}}))
    app = create_app(load(str(path), environ={}))

    async def reindex(request: Any) -> Response:
        return Response(b"done")

    app.router.routes.append(Route("/v2/_admin/reindex", reindex, methods=["POST"]))

    async def statuses() -> list[int]:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://wharf") as http:
            anonymous = await http.post("/v2/_admin/reindex")
            admin = await http.post("/v2/_admin/reindex", auth=("admin", "pw"))
            return [anonymous.status_code, admin.status_code]

    assert asyncio.run(statuses()) == [401, 403]
