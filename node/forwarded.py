"""The client behind a trusted proxy: X-Forwarded-For read from the right, as far as the proxies go.

A load balancer that appends the address it was reached from (HAProxy's `option forwardfor`, nginx's
`$proxy_add_x_forwarded_for`) makes the header's last entry the client it saw. Entries that are
trusted proxies themselves are skipped; the first one that is not is the client. The header is
believed only when the connection comes from a trusted proxy, so a client cannot name itself
someone else by sending one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from .config import IPNetwork


class ForwardedFor:
    def __init__(self, app: ASGIApp, *, proxies: Sequence[IPNetwork]) -> None:
        self.app = app
        self.proxies = tuple(proxies)

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self.proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        if scope["type"] == "http" and client and self._trusted(client[0]):
            forwarded = [value for name, value in scope["headers"] if name == b"x-forwarded-for"]
            if forwarded:
                hops = [h.strip() for h in b",".join(forwarded).decode("latin-1").split(",") if h.strip()]
                found = _client_of(hops, self._trusted)
                if found is not None:
                    scope = {**scope, "client": (found, 0)}
        await self.app(scope, receive, send)


def _client_of(hops: list[str], trusted: Callable[[str], bool]) -> str | None:
    """The rightmost hop that is not a trusted proxy (or the leftmost, if all are); None if one is not an IP."""
    for hop in reversed(hops):
        try:
            address = str(ipaddress.ip_address(hop.strip("[]")))
        except ValueError:
            return None  # not an address (a port, `unknown`, a name): believe none of it
        if not trusted(address):
            return address
    return str(ipaddress.ip_address(hops[0].strip("[]"))) if hops else None
