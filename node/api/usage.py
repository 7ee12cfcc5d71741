"""GET /wharf/v1/.../usage: storage figures of a repository, a namespace, or the registry."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from coordinator.usage import TOTAL

from ..auth.access import PULL, Access, format_scopes
from ..errors import Denied, NameUnknown, RegistryError
from ..reference import validate_name
from ..routing import HOLDS_KEY
from .request import repository, services


def namespace_of(request: Request) -> str:
    """The URL's namespace, as its figures are kept: 'team/' (the grammar of a repository name, then '/')."""
    raw = str(request.path_params["namespace"]).strip("/")
    return validate_name(raw) + "/"


def _answer(data: dict[str, Any]) -> Response:
    return Response(json.dumps(data).encode(), media_type="application/json")


async def repository_usage(request: Request) -> Response:
    svc = services(request)
    name = repository(request)
    figures = await svc.usage.scope(name)
    if not figures and not await svc.metadata.repository_exists(name):
        raise NameUnknown({"name": name})
    return _answer({"repository": name, **figures.report(), "current": await svc.usage.current()})


async def refusal_in(request: Request, namespace: str, refused: list[Access]) -> RegistryError:
    """The answer to a caller refused on some repositories of `namespace` ('': the registry), which
    tells it nothing it may not see: the names it may not pull are left out of the detail (the audit
    line's rule has them all), and where it may pull no repository there at all, it gets what a
    namespace that does not exist answers."""
    holds = request.scope.get("state", {}).get(HOLDS_KEY)
    rule = format_scopes(refused[:10])
    if holds is None:
        return Denied([a.detail() for a in refused[:10]], refused_by="access", rule=rule)
    svc = services(request)
    every = await svc.catalog.get("", svc.metadata.repository_list)
    visible = [repo for repo in every if repo.startswith(namespace) and holds(Access("repository", repo, PULL))]
    if namespace and not visible:
        return NameUnknown({"namespace": namespace})
    seen = set(visible)
    shown = [a.detail() for a in refused if a.name in seen][:10]
    hidden = len({a.name for a in refused if a.name not in seen})
    detail: list[dict[str, Any]] = shown
    if hidden:
        detail = [*shown, {"repositories you may not pull": hidden}]
    return Denied(detail, refused_by="access", rule=rule)


async def _check_pull_on_every_repository(request: Request, namespace: str) -> None:
    """Figures of a namespace (or, with '', the registry) tell about every repository in it: with
    authentication on, the caller must be able to pull them all (see `refusal_in` for the answer)."""
    holds = request.scope.get("state", {}).get(HOLDS_KEY)
    if holds is None:
        return
    svc = services(request)
    every = await svc.catalog.get("", svc.metadata.repository_list)
    refused = [
        Access("repository", repo, PULL)
        for repo in every
        if repo.startswith(namespace) and not holds(Access("repository", repo, PULL))
    ]
    if refused:
        raise await refusal_in(request, namespace, refused)


async def namespace_usage(request: Request) -> Response:
    svc = services(request)
    namespace = namespace_of(request)
    await _check_pull_on_every_repository(request, namespace)
    figures = await svc.usage.scope(namespace)
    if not figures:
        raise NameUnknown({"namespace": namespace})
    return _answer({"namespace": namespace, **figures.report(), "current": await svc.usage.current()})


async def registry_usage(request: Request) -> Response:
    svc = services(request)
    await _check_pull_on_every_repository(request, "")
    figures = await svc.usage.scope(TOTAL)
    return _answer({**figures.report(), "current": await svc.usage.current()})
