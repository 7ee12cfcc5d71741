"""What a request is for: its route (matched with the app's own route table) and the access it needs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import QueryParams
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from .access import CATALOG, DELETE, PULL, PUSH, Access

# Where a request's Target is kept in scope["state"], so later middleware need not resolve it again.
STATE_KEY = "wharf.target"
# Where authentication leaves what the caller may do (Access -> bool), for handlers whose needs depend
# on the registry's contents (every repository of a namespace); absent when authentication is off.
HOLDS_KEY = "wharf.holds"

# Wharf's own API beside the OCI one (node/api/tagdetails.py, usage.py, repositories.py).
EXTENSION = "/wharf/v1/"


@dataclass(frozen=True)
class Target:
    route: BaseRoute | None  # None: no route takes this path and method (the router answers 404/405)
    params: dict[str, Any] = field(default_factory=dict)
    needs: tuple[Access, ...] = ()  # empty: being signed in is enough

    @property
    def endpoint(self) -> Callable[..., Any] | None:
        return getattr(self.route, "endpoint", None)

    @property
    def repository(self) -> str | None:
        name = self.params.get("name")
        return name if isinstance(name, str) else None


def resolve(routes: Sequence[BaseRoute], scope: Scope) -> Target:
    """The route Starlette's router will pick for `scope` (the first full match) and what it needs."""
    state = scope.get("state") or {}
    cached = state.get(STATE_KEY)
    if isinstance(cached, Target):
        return cached
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.FULL:
            params = dict(child.get("path_params", {}))
            return Target(route, params, _needs(route, scope, params))
    return Target(None)


def routed(routes: Sequence[BaseRoute], scope: Scope) -> Target:
    """A request's Target once it has been routed (by the router, or by whoever refused it): no matching
    again; `resolve` for one that was not (no route takes its path)."""
    state = scope.get("state") or {}
    cached = state.get(STATE_KEY)
    if isinstance(cached, Target):
        return cached
    route = scope.get("route")
    if isinstance(route, BaseRoute):
        params = dict(scope.get("path_params") or {})
        return Target(route, params, _needs(route, scope, params))
    return resolve(routes, scope)


def _needs(route: BaseRoute, scope: Scope, params: dict[str, Any]) -> tuple[Access, ...]:
    """The access a request needs, by Distribution's rules: GET/HEAD pull; POST/PUT/PATCH pull and
    push; DELETE delete; a cross-repository mount also pull on `from`.

    Every step of a blob upload (including cancelling one) needs push: it only touches the caller's
    own upload session. A route this function does not know needs an access nobody is granted, so a
    new endpoint is closed until it is given a rule here.
    """
    path = route.path if isinstance(route, Route) else ""
    method = scope["method"]
    if path == "/v2/":
        return ()
    if path == "/v2/_catalog":
        return (CATALOG,)
    if path.startswith(EXTENSION):
        return _extension_needs(path, method, params)
    name = params.get("name")
    if not isinstance(name, str):
        return (Access("registry", path or "unknown", "*"),)
    if "/blobs/uploads/" in path or method in ("POST", "PUT", "PATCH"):
        actions: tuple[str, ...] = (PULL, PUSH)
    elif method in ("GET", "HEAD"):
        actions = (PULL,)
    elif method == "DELETE":
        actions = (DELETE,)
    else:
        return (Access("repository", name, "*"),)
    needs = [Access("repository", name, action) for action in actions]
    if method == "POST" and path.endswith("/blobs/uploads/"):
        # Parsed as the handler parses it; every `from` given is checked, whichever one it reads.
        query = QueryParams(scope.get("query_string", b""))
        if query.get("mount") is not None:
            needs.extend(Access("repository", source, PULL) for source in query.getlist("from") if source)
    return tuple(needs)


def _extension_needs(path: str, method: str, params: dict[str, Any]) -> tuple[Access, ...]:
    """Wharf's API: a repository's tag details and figures need pull, as its tags do; deleting it
    whole needs push and delete. A namespace needs those on every repository in it, which its
    handler checks (`HOLDS_KEY`) once it knows them; here only signing in. The registry's figures
    need what `_catalog` needs."""
    name = params.get("name")
    if path == EXTENSION + "usage":
        return (CATALOG,)
    if isinstance(name, str) and path.startswith(EXTENSION + "repositories/"):
        if method in ("GET", "HEAD"):
            return (Access("repository", name, PULL),)
        if method == "DELETE":
            return (Access("repository", name, PUSH), Access("repository", name, DELETE))
    if "namespace" in params and path.startswith(EXTENSION + "namespaces/") and method in ("GET", "HEAD", "DELETE"):
        return ()
    return (Access("registry", path, "*"),)
