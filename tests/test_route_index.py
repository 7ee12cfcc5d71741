"""The route index picks the route Starlette's scan of the whole table would pick, for any path."""

from __future__ import annotations

import itertools

from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import Scope

from node import app
from node.routing import RouteIndex, RouteTable, resolve

METHODS = ("GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "BREW")
PATHS = (
    "",
    "/",
    "/v2",
    "/v2/",
    "/v2/_catalog",
    "/v2/_catalog/",
    "/v2/library/alpine/tags/list",
    "/v2/tags/list",
    "/v2//tags/list",
    "/v2/a/manifests/tags/list",
    "/v2/a/tags/list/manifests/latest",
    "/v2/a/manifests/latest",
    "/v2/a/b/c/manifests/sha256:" + "0" * 64,
    "/v2/a/manifests/",
    "/v2/a/manifests",
    "/v2/manifests/x",
    "/v2/a/blobs/uploads/",
    "/v2/a/blobs/uploads",
    "/v2/a/blobs/uploads/0b1c",
    "/v2/a/blobs/uploads/0b1c/",
    "/v2/a/blobs/sha256:" + "1" * 64,
    "/v2/a/blobs/uploads/manifests/x",
    "/v2/a/referrers/sha256:" + "2" * 64,
    "/wharf/v1/repositories/a/b/tags",
    "/wharf/v1/repositories/a/tags/usage",
    "/wharf/v1/repositories/a",
    "/wharf/v1/namespaces/team/usage",
    "/wharf/v1/namespaces/team",
    "/wharf/v1/usage",
    "/debug/health",
    "/debug/ready",
    "/ui",
    "/ui/",
    "/ui/static/app.css",
    "/ui/r/a/-/manifest/latest",
    "/token",
    "/elsewhere/v2/a/manifests/latest",
)


def _scope(method: str, path: str, root_path: str = "") -> Scope:
    return {"type": "http", "method": method, "path": root_path + path, "root_path": root_path, "headers": []}


def _first_full(routes: list[BaseRoute] | tuple[BaseRoute, ...], scope: Scope) -> BaseRoute | None:
    return next((route for route in routes if route.matches(scope)[0] is Match.FULL), None)


async def _noop(request: object) -> None:
    return None


def _tables() -> list[list[BaseRoute]]:
    others: list[BaseRoute] = [
        Route("/token", _noop, methods=["GET", "POST"]),
        Route("/ui", _noop),
        Route("/ui/r/{name:path}/-/manifest/{reference}", _noop),
        Mount("/ui/static", app=_noop),
        Route("/ui/{rest:path}", _noop, methods=["GET", "HEAD", "POST"]),
        Route("/{anything:path}.json", _noop),
        Route("/v2/{name}/{kind}/{id:int}", _noop, methods=["PUT"]),
    ]
    return [app.ROUTES + app.PROBE_ROUTES, app.ROUTES + app.PROBE_ROUTES + others, others + app.ROUTES]


def test_the_index_finds_the_route_a_scan_of_every_route_finds() -> None:
    for routes in _tables():
        index = RouteIndex(routes)
        for method, path, root in itertools.product(METHODS, PATHS, ("", "/prefix")):
            scope = _scope(method, path, root)
            assert _first_full(index.candidates(scope), scope) is _first_full(routes, scope), (method, root + path)


def test_a_route_table_resolves_a_request_to_the_route_a_scan_of_every_route_finds() -> None:
    for routes in _tables():
        table = RouteTable(routes)
        for method, path in itertools.product(METHODS, PATHS):
            scope = _scope(method, path)
            assert resolve(table, scope) == resolve(list(routes), scope), (method, path)


def test_the_index_tries_only_the_routes_of_the_path_and_method() -> None:
    index = RouteIndex(app.ROUTES + app.PROBE_ROUTES)
    candidates = index.candidates(_scope("GET", "/v2/library/alpine/manifests/latest"))
    assert [(route.path, route.methods) for route in candidates if isinstance(route, Route)] == [
        ("/v2/{name:path}/manifests/{reference}", {"GET", "HEAD"})
    ]


def test_methods_and_segments_no_route_names_share_one_entry() -> None:
    index = RouteIndex(app.ROUTES)
    for n in range(50):
        index.candidates(_scope(f"X{n}", f"/v2/repo{n}/manifests/tag{n}"))
        index.candidates(_scope("GET", f"/v2/repo{n}/things{n}/tag{n}"))
    assert len(index._candidates) == 2
