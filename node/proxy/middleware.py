"""ASGI middleware for cached repositories: writes refused as registry:2 refuses them in proxy mode, and
the `Cache-Status` header (RFC 9211) on pulls the cache answered."""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import Unsupported, send_error
from ..routing import resolve
from .pullthrough import STATE_KEY, Outcome, PullThrough

_READS = ("GET", "HEAD", "OPTIONS")


class ProxyMiddleware:
    def __init__(self, app: ASGIApp, *, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v2/"):
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
