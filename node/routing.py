"""Routes that carry their rules, and what a request is for.

Each entry of the route table (node/app.py) is an `Endpoint`: a path, one method, its handler, the
access a caller needs (a `Rule`, by Distribution's rules) and, for a decision endpoint, what its
audit line decides on. An endpoint is added in that one place. Authentication and the audit log
read a request's `Target` (the entry the router will pick, with its parameters and needs) from
here; a route that is not an `Endpoint` needs an access nobody is granted, so it is closed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette._utils import get_route_path
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.routing import PARAM_REGEX, BaseRoute, Match, Mount, Route, Router
from starlette.types import Receive, Scope, Send

from .auth.access import CATALOG, DELETE, PULL, PUSH, Access

# Where a request's Target is kept in scope["state"], so later middleware need not resolve it again.
STATE_KEY = "wharf.target"
# Where authentication leaves what the caller may do (Access -> bool), for handlers whose needs depend
# on the registry's contents (every repository of a namespace); absent when authentication is off.
HOLDS_KEY = "wharf.holds"


def route_path(scope: Scope) -> str:
    """The path the route table matches: without the `root_path` that `http.prefix` sets."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


# The access a request needs, from its scope and path parameters.
Rule = Callable[[Scope, dict[str, Any]], tuple[Access, ...]]


def _closed(scope: Scope, params: dict[str, Any]) -> tuple[Access, ...]:
    return (Access("registry", scope.get("path", "unknown"), "*"),)


def signed_in(scope: Scope, params: dict[str, Any]) -> tuple[Access, ...]:
    """Being signed in is enough (the base endpoint `docker login` calls)."""
    return ()


def catalog(scope: Scope, params: dict[str, Any]) -> tuple[Access, ...]:
    return (CATALOG,)


def _on_repository(*actions: str) -> Rule:
    def rule(scope: Scope, params: dict[str, Any]) -> tuple[Access, ...]:
        name = params.get("name")
        if not isinstance(name, str):
            return _closed(scope, params)
        return tuple(Access("repository", name, action) for action in actions)

    return rule


pull = _on_repository(PULL)
# Writes need pull too, as in Distribution; every step of a blob upload (cancelling one included)
# needs push: it only touches the caller's own upload session.
push = _on_repository(PULL, PUSH)
delete = _on_repository(DELETE)
# A whole repository goes only for who may both push to it and delete from it.
push_and_delete = _on_repository(PUSH, DELETE)


def push_or_mount(scope: Scope, params: dict[str, Any]) -> tuple[Access, ...]:
    """An upload's start: push, and for a cross-repository mount pull on every `from` given (parsed as
    the handler parses it, whichever one it reads)."""
    needs = push(scope, params)
    query = QueryParams(scope.get("query_string", b""))
    if query.get("mount") is not None:
        needs += tuple(Access("repository", source, PULL) for source in query.getlist("from") if source)
    return needs


class Endpoint(Route):
    """One method on one path, with its access rule and (for a decision) its audit object."""

    def __init__(
        self, path: str, endpoint: Callable[..., Any], method: str, *, access: Rule, audit: str | None = None
    ) -> None:
        super().__init__(path, endpoint, methods=[method])
        self._direct = inspect.iscoroutinefunction(endpoint)  # else Starlette runs it in a thread
        self.access = access
        # What a decision endpoint decides on (its audit line's `object`: "manifest", "upload",
        # "blob"); None: audited only when a check refuses it.
        self.audit = audit

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The handler's response, as Starlette's own Route gives it, with one wrapper less: an
        exception goes to the application's handlers (node/errors.py HandledErrors), which are
        the same ones the route-level wrapper would ask."""
        if not self._direct or (self.methods is not None and scope["method"] not in self.methods):
            await super().handle(scope, receive, send)  # a plain function, or 405
            return
        response = await self.endpoint(Request(scope, receive, send))
        await response(scope, receive, send)


@dataclass(frozen=True)
class Target:
    route: BaseRoute | None  # None: no route takes this path and method (the router answers 404/405)
    params: dict[str, Any] = field(default_factory=dict)
    needs: tuple[Access, ...] = ()  # empty: being signed in is enough

    @property
    def endpoint(self) -> Callable[..., Any] | None:
        return getattr(self.route, "endpoint", None)

    @property
    def audit(self) -> str | None:
        return getattr(self.route, "audit", None)

    @property
    def repository(self) -> str | None:
        name = self.params.get("name")
        return name if isinstance(name, str) else None


# Single-segment path parameters; any other convertor (`path`, or one registered) may span segments.
_SEGMENT_CONVERTORS = {"str", "int", "float", "uuid"}
_ANY = object()  # a route's segment that takes any text; a request's that no route names literally


def _route_template(route: BaseRoute) -> str | None:
    """The path template `route` matches against (a Mount's takes anything below it); None: unknown."""
    if isinstance(route, Route):
        return route.path
    if isinstance(route, Mount):
        return route.path + "/{path:path}"
    return None


def _spans_segments(segment: str) -> bool:
    return any((kind or ":str")[1:] not in _SEGMENT_CONVERTORS for _, kind in PARAM_REGEX.findall(segment))


def _shape(template: str) -> tuple[Any, Any, Any]:
    """What a path must have to match `template`: its first, second-to-last and last segments, each a
    literal or _ANY. Segments after the last parameter that may span segments (`{name:path}`) keep
    their place from the end, those before the first one their place from the start."""
    segments = template.split("/")
    spanning = [i for i, segment in enumerate(segments) if _spans_segments(segment)]
    first_free = spanning[0] if spanning else len(segments)
    tail = segments[spanning[-1] + 1 :] if spanning else segments

    def literal(segment: str) -> Any:
        return _ANY if "{" in segment else segment

    first = literal(segments[1]) if first_free > 1 and len(segments) > 1 else _ANY
    last = literal(tail[-1]) if tail else _ANY
    before_last = literal(tail[-2]) if len(tail) >= 2 else _ANY
    return first, before_last, last


class RouteIndex:
    """The routes that may match a request, in table order, found from its method and a few of its path
    segments instead of trying every route's pattern: a superset of the routes that match, so the
    first that matches fully among them is the first in the table."""

    def __init__(self, routes: Sequence[BaseRoute]) -> None:
        self.routes = routes
        self._build()

    def _build(self) -> None:
        self._size = len(self.routes)
        self._shapes: list[tuple[BaseRoute, set[str] | None, tuple[Any, Any, Any]]] = []
        for route in self.routes:
            template = _route_template(route)
            shape = _shape(template) if template is not None else (_ANY, _ANY, _ANY)
            methods = route.methods if isinstance(route, Route) else None
            self._shapes.append((route, methods, shape))
        # What the cache is keyed by: a method or segment no route names is _ANY, so it stays small.
        self._methods = {method for _, methods, _ in self._shapes for method in methods or ()}
        self._named = [{shape[i] for _, _, shape in self._shapes} - {_ANY} for i in range(3)]
        self._candidates: dict[tuple[Any, ...], list[BaseRoute]] = {}

    def candidates(self, scope: Scope) -> Sequence[BaseRoute]:
        if len(self.routes) != self._size:  # routes were added since
            self._build()
        segments = get_route_path(scope).split("/")
        if len(segments) < 2:
            return self.routes
        method = scope.get("method")
        first, before_last, last = self._named
        key = (
            method if method in self._methods else _ANY,
            segments[1] if segments[1] in first else _ANY,
            segments[-2] if segments[-2] in before_last else _ANY,
            segments[-1] if segments[-1] in last else _ANY,
        )
        found = self._candidates.get(key)
        if found is None:
            found = self._candidates[key] = [
                route
                for route, methods, shape in self._shapes
                if (methods is None or key[0] in methods)
                and all(want is _ANY or want == have for want, have in zip(shape, key[1:], strict=True))
            ]
        return found


class RouteTable(list[BaseRoute]):
    """A route list that carries its RouteIndex, so whoever resolves a request on it (authentication,
    the audit log, the pull-through cache) uses the index as the router does."""

    def __init__(self, routes: Sequence[BaseRoute] = ()) -> None:
        super().__init__(routes)
        self._index = RouteIndex(self)

    def candidates(self, scope: Scope) -> Sequence[BaseRoute]:
        """The routes that may match `scope`, in table order (see RouteIndex)."""
        return self._index.candidates(scope)


class IndexedRouter(Router):
    """Starlette's router, finding a request's route through a RouteIndex. Whatever it does not
    match fully (404, 405, a redirect to the path with or without its slash) goes to Starlette's own
    scan of every route, so answers are the same."""

    def __init__(self, routes: Sequence[BaseRoute], **options: Any) -> None:
        super().__init__(routes, **options)
        self.routes: RouteTable = RouteTable(self.routes)

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self.routes.candidates(scope):
                match, child_scope = route.matches(scope)
                if match is Match.FULL:
                    scope.setdefault("router", self)
                    scope["route"] = route
                    scope.update(child_scope)
                    await route.handle(scope, receive, send)
                    return
        await super().app(scope, receive, send)


def _target(route: BaseRoute, scope: Scope, params: dict[str, Any]) -> Target:
    rule: Rule = getattr(route, "access", None) or _closed
    return Target(route, params, rule(scope, params))


def resolve(routes: Sequence[BaseRoute], scope: Scope) -> Target:
    """The route Starlette's router will pick for `scope` (the first full match) and what it needs."""
    state = scope.get("state") or {}
    cached = state.get(STATE_KEY)
    if isinstance(cached, Target):
        return cached
    candidates = routes.candidates(scope) if isinstance(routes, RouteTable) else routes
    for route in candidates:
        match, child = route.matches(scope)
        if match is Match.FULL:
            return _target(route, scope, dict(child.get("path_params", {})))
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
        return _target(route, scope, dict(scope.get("path_params") or {}))
    return resolve(routes, scope)
