"""Routes that carry their rules, and what a request is for.

Each entry of the route table (node/app.py) is an `Endpoint`: a path, one method, its handler, the
access a caller needs (a `Rule`, by Distribution's rules) and, for a decision endpoint, what its
audit line decides on. An endpoint is added in that one place. Authentication and the audit log
read a request's `Target` (the entry the router will pick, with its parameters and needs) from
here; a route that is not an `Endpoint` needs an access nobody is granted, so it is closed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.datastructures import QueryParams
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Scope

from .auth.access import CATALOG, DELETE, PULL, PUSH, Access

# Where a request's Target is kept in scope["state"], so later middleware need not resolve it again.
STATE_KEY = "wharf.target"

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
        self.access = access
        # What a decision endpoint decides on (its audit line's `object`: "manifest", "upload",
        # "blob"); None: audited only when a check refuses it.
        self.audit = audit


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


def _target(route: BaseRoute, scope: Scope, params: dict[str, Any]) -> Target:
    rule: Rule = getattr(route, "access", None) or _closed
    return Target(route, params, rule(scope, params))


def resolve(routes: Sequence[BaseRoute], scope: Scope) -> Target:
    """The route Starlette's router will pick for `scope` (the first full match) and what it needs."""
    state = scope.get("state") or {}
    cached = state.get(STATE_KEY)
    if isinstance(cached, Target):
        return cached
    for route in routes:
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
