"""What the configuration adds around every response: `http.headers`, and serving under `http.prefix`."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ConfiguredHeaders:
    """ASGI middleware: `http.headers` on every response, as Distribution sends them.

    Distribution sets them before the handler runs, so a header the handler sets itself wins; here
    a configured header is added unless the response already carries one of that name.
    """

    def __init__(self, app: ASGIApp, headers: dict[str, list[str]]) -> None:
        self.app = app
        self.extra = [(name.lower().encode("latin-1"), v.encode("latin-1")) for name, vs in headers.items() for v in vs]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.extra:
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {bytes(name).lower() for name, _ in headers}
                headers += [(name, value) for name, value in self.extra if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class PathPrefix:
    """ASGI middleware: `http.prefix`, as in Distribution: the registry answers at /PREFIX/v2/...

    The prefix becomes the request's `root_path`, so routes match as usual and the URLs Wharf
    builds carry it. Requests without it are served too (probes, a proxy that strips it).
    """

    def __init__(self, app: ASGIApp, prefix: str) -> None:
        self.app = app
        self.base = prefix.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.base and scope["path"].startswith(self.base + "/"):
            scope = {**scope, "root_path": scope.get("root_path", "") + self.base}
        await self.app(scope, receive, send)
