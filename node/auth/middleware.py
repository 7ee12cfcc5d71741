"""ASGI middleware: sign the caller in (Basic or Bearer), check the access its route needs, or refuse.

The route and its needs come from the route table (see node/routing.py), so this module holds no
second copy of it. Refusals are OCI error bodies: 401 with a `WWW-Authenticate` challenge, 403
`DENIED` for a signed-in user the rules do not allow, 429 while a caller is backing off.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import Denied, RegistryError, Unauthorized, send_error
from ..reference import validate_name
from ..routing import STATE_KEY, Target, resolve
from .access import CATALOG, Access, format_scopes, held, valid_name
from .basic import authorization, parse_basic
from .services import AuthServices
from .token import TOKEN_PATH, InvalidToken, TokenClaims

_HOST = re.compile(r"[A-Za-z0-9.\-]+(?::\d{1,5})?|\[[0-9A-Fa-f:.]+\](?::\d{1,5})?")


@dataclass(frozen=True)
class Caller:
    user: str | None = None
    token: TokenClaims | None = None

    @property
    def signed_in(self) -> bool:
        return self.user is not None or self.token is not None


_ANONYMOUS = Caller()


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class AuthMiddleware:
    def __init__(
        self, app: ASGIApp, *, auth: AuthServices, routes: Sequence[BaseRoute], public: Sequence[BaseRoute]
    ) -> None:
        self.app = app
        self.auth = auth
        self.routes = routes  # the app's route list (read at request time, so every route counts)
        self.public = public  # routes that need no credentials: probes and the token service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        target = resolve(self.routes, scope)
        if target.route is not None and any(target.route is route for route in self.public):
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state[STATE_KEY] = target
        try:
            caller = await self._authenticate(scope, target)
            if caller.user is not None:
                state["user"] = caller.user
            for access in target.needs:
                if access.type == "repository":
                    validate_name(access.name)
            self._authorize(scope, caller, target)
        except RegistryError as exc:
            if target.route is not None:
                # The router never sees a refused request; the access log still names its route.
                scope["route"], scope["path_params"] = target.route, target.params
            await send_error(exc, scope, receive, send)
            return
        if CATALOG in target.needs:
            # `_catalog` lists only what the caller may pull (the handler applies the filter).
            state["catalog_filter"] = self.auth.access.may_pull(caller.user)
        await self.app(scope, receive, send)

    async def _authenticate(self, scope: Scope, target: Target) -> Caller:
        header = authorization(scope["headers"])
        if header is None:
            return _ANONYMOUS
        scheme, param = header
        client = scope.get("client")
        remote = client[0] if client else None
        sign_in = self.auth.sign_in
        if self.auth.mode == "htpasswd":
            if scheme != "basic":
                return _ANONYMOUS
            try:
                credentials = parse_basic(param)
            except ValueError:
                sign_in.check_not_blocked(remote)
                raise sign_in.refuse(
                    remote,
                    None,
                    "malformed Basic credentials",
                    message="malformed credentials",
                    headers=self._challenge(scope, target),
                ) from None
            if credentials is None:
                return _ANONYMOUS
            user = await sign_in.sign_in(credentials, remote=remote, challenge=self._challenge(scope, target))
            return Caller(user)
        if scheme != "bearer":
            return _ANONYMOUS
        assert self.auth.verifier is not None
        sign_in.check_not_blocked(remote)
        try:
            claims = self.auth.verifier.verify(param.decode("latin-1"))
        except InvalidToken as exc:
            raise sign_in.refuse(
                remote,
                None,
                exc.reason,
                message=exc.reason,
                headers=self._challenge(scope, target, error="invalid_token"),
            ) from None
        return Caller(claims.subject, claims)

    def _holds(self, caller: Caller, access: Access) -> bool:
        if caller.token is not None:
            return held(caller.token.access, access)
        return self.auth.access.allows(caller.user, access)

    def _authorize(self, scope: Scope, caller: Caller, target: Target) -> None:
        missing = [access for access in target.needs if not self._holds(caller, access)]
        if not missing and (target.needs or caller.signed_in):
            return
        details = [access.detail() for access in (missing or target.needs)]
        if not caller.signed_in:
            # A challenge, not a refusal: the client is asked to sign in (no audit line).
            raise Unauthorized(details or None, headers=self._challenge(scope, target))
        rule = format_scopes(missing)  # every action lacking, not only the first
        if caller.token is not None:
            # The client may ask the token service for a token with more scope, as Distribution says.
            raise Unauthorized(
                details,
                message="insufficient scope",
                headers=self._challenge(scope, target, error="insufficient_scope"),
                refused_by="access",
                rule=rule,
            )
        raise Denied(details, refused_by="access", rule=rule)

    def _challenge(self, scope: Scope, target: Target, *, error: str | None = None) -> dict[str, str]:
        if self.auth.mode == "htpasswd":
            return {"WWW-Authenticate": "Basic realm=" + _quoted(self.auth.basic_realm)}
        parts = [
            "realm=" + _quoted(self.auth.token_realm or self._own_realm(scope)),
            "service=" + _quoted(self.auth.service),
        ]
        # Only names that pass the grammar: a path is client input and must not shape a header.
        scopes = [a for a in target.needs if a == CATALOG or (a.type == "repository" and valid_name(a.name))]
        if scopes:
            parts.append("scope=" + _quoted(format_scopes(scopes)))
        if error:
            parts.append("error=" + _quoted(error))
        return {"WWW-Authenticate": "Bearer " + ",".join(parts)}

    def _own_realm(self, scope: Scope) -> str:
        """This node's token service, at the scheme and host the client used."""
        host = ""
        for name, value in scope["headers"]:
            if name == b"host":
                host = bytes(value).decode("latin-1").strip()
                break
        if not _HOST.fullmatch(host):
            server = scope.get("server") or ("localhost", None)
            host = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
        scheme = "https" if scope.get("scheme") == "https" else "http"
        return f"{scheme}://{host}{TOKEN_PATH}"
