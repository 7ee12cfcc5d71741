"""What authentication needs at run time, built once from the configuration."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from starlette.routing import Route

from ..config import Config, ConfigError
from .access import AccessControl
from .basic import PasswordSignIn
from .htpasswd import HtpasswdError, HtpasswdFile
from .ratelimit import FailureLimiter
from .token import TokenError, TokenService, TokenVerifier, build_issuer, load_trusted_keys

log = logging.getLogger("wharf.auth")


@dataclass
class AuthServices:
    mode: str | None  # "htpasswd", "token", or None: an open registry
    access: AccessControl
    sign_in: PasswordSignIn
    verifier: TokenVerifier | None
    token_service: TokenService | None
    basic_realm: str
    token_realm: str  # empty: this node's own token service, at the URL the client used
    service: str
    executor: ThreadPoolExecutor

    @property
    def enabled(self) -> bool:
        return self.mode is not None

    @classmethod
    def build(cls, config: Config) -> AuthServices:
        # bcrypt takes ~100 ms of CPU: a few threads, never the event loop.
        executor = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="wharf-bcrypt")
        try:
            return cls._build(config, executor)
        except (HtpasswdError, TokenError) as exc:
            executor.shutdown(wait=False)
            raise ConfigError(str(exc)) from None

    @classmethod
    def _build(cls, config: Config, executor: ThreadPoolExecutor) -> AuthServices:
        auth = config.auth
        access = AccessControl(config.access)
        users = None
        verifier = None
        issuer = None
        basic_realm = token_realm = service = ""
        if auth.htpasswd is not None:
            users = HtpasswdFile(auth.htpasswd.path, executor)
            basic_realm = auth.htpasswd.realm
        elif auth.token is not None:
            token = auth.token
            keys = load_trusted_keys(token.rootcertbundle) if token.rootcertbundle else {}
            if token.signingkey:
                issuer = build_issuer(token)
                keys.setdefault(issuer.kid, issuer.public_key)
                users = HtpasswdFile(token.htpasswd, executor, key="auth.token.htpasswd") if token.htpasswd else None
            verifier = TokenVerifier(
                issuer=token.issuer, service=token.service, keys=keys, algorithms=token.signingalgorithms
            )
            # autoredirect: the realm is this registry's /auth/token at the host the client used.
            token_realm, service = ("" if token.autoredirect else token.realm), token.service
        elif config.access.rules:
            log.warning("access rules are configured but auth is not: every request is allowed")
        sign_in = PasswordSignIn(users, limiter=FailureLimiter(config.ratelimit.authfailures))
        token_service = TokenService(issuer, sign_in, access) if issuer is not None else None
        return cls(auth.mode, access, sign_in, verifier, token_service, basic_realm, token_realm, service, executor)

    def routes(self) -> list[Route]:
        """Endpoints that authenticate callers themselves (the token service)."""
        return self.token_service.routes() if self.token_service is not None else []

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
