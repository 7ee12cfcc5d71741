"""ASGI middleware for cached repositories: writes refused as registry:2 refuses them in proxy mode, the
`Cache-Status` header (RFC 9211) on pulls the cache answered, and an upstream's prefix accepted before
`/v2/` as docker's `registry-mirrors` sends it."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import Unsupported, send_error
from ..routing import resolve, route_path
from .pullthrough import STATE_KEY, Outcome, PullThrough

_READS = ("GET", "HEAD", "OPTIONS")


class MirrorPaths:
    """docker's `registry-mirrors` with a path (`http://wharf:5000/dockerhub`, docker 25 and later) asks
    for `/dockerhub/v2/library/alpine/...`: served as `/v2/dockerhub/library/alpine/...`, so one registry
    mirrors Docker Hub under its prefix beside its hosted repositories. `/dockerhub/v2/` is the base
    endpoint. Only configured prefixes are taken; every other path is left as it is."""

    def __init__(self, app: ASGIApp, *, prefixes: Sequence[str]) -> None:
        self.app = app
        # Longest first, so a prefix inside another's namespace is not shadowed.
        self.prefixes = sorted((p.strip("/") for p in prefixes if p.strip("/")), key=len, reverse=True)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.prefixes:
            route = route_path(scope)
            for prefix in self.prefixes:
                lead = f"/{prefix}/v2/"
                if route.startswith(lead):
                    rest = route[len(lead) :]
                    moved = "/v2/" + (f"{prefix}/{rest}" if rest else "")
                    path = scope.get("root_path", "") + moved
                    scope = {**scope, "path": path, "raw_path": path.encode()}
                    break
        await self.app(scope, receive, send)


class ProxyMiddleware:
    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not route_path(scope).startswith("/v2/"):
            await self.app(scope, receive, send)
            return
        proxy: PullThrough = scope["app"].state.services.proxy
        if scope["method"] not in _READS:
            refusal = self._refusal(proxy, scope)
            if refusal is not None:
                await send_error(refusal, scope, receive, send)
                return
            await self.app(scope, receive, send)
            return

        async def marked(message: Message) -> None:
            if message["type"] == "http.response.start":
                outcome = (scope.get("state") or {}).get(STATE_KEY)
                if isinstance(outcome, Outcome):
                    MutableHeaders(scope=message).append("Cache-Status", outcome.header())
            await send(message)

        await self.app(scope, receive, marked)

    def _refusal(self, proxy: PullThrough, scope: Scope) -> Unsupported | None:
        """As registry:2 answers a write in proxy mode (405 UNSUPPORTED), for a cached repository."""
        target = resolve(self.routes, scope)
        repository = target.repository
        if proxy.mirror:
            upstream = proxy.caches[0].upstream
            what = "this registry is a pull-through cache"
        else:
            found = proxy.cache_of(repository) if repository is not None else None
            if found is None:
                return None
            upstream = found[0].upstream
            what = f"{repository} is in a pull-through cache"
        if target.route is not None:
            # The router never sees a refused request; the access log still names its route.
            scope["route"], scope["path_params"] = target.route, target.params
        return Unsupported(
            {"repository": repository, "upstream": upstream.remoteurl},
            message=f"{what} of {upstream.remoteurl}: pulls only, pushes and deletes are refused",
            headers={"Allow": "GET, HEAD"},
        )
