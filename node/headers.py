"""What the configuration adds around every response: `http.headers`, and serving under `http.prefix`."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class ConfiguredHeaders:
    """`http.headers` on every response, as Distribution sends them (added by node/context.py's
    RequestContext as a response starts).

    Distribution sets them before the handler runs, so a header the handler sets itself wins; here
    a configured header is added unless the response already carries one of that name.
    """

    def __init__(self, headers: dict[str, list[str]]) -> None:
        self.extra = [(name.lower().encode("latin-1"), v.encode("latin-1")) for name, vs in headers.items() for v in vs]

    def add_to(self, headers: list[tuple[bytes, bytes]]) -> None:
        if self.extra:
            present = {bytes(name).lower() for name, _ in headers}
            headers += [(name, value) for name, value in self.extra if name not in present]


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
