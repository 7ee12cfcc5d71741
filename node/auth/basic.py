"""Signing in with a user name and password (HTTP Basic), under the failure limits."""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

from ..errors import TooManyRequests, Unauthorized
from .htpasswd import HtpasswdFile
from .ratelimit import FailureLimiter


@dataclass(frozen=True)
class Credentials:
    user: str
    password: bytes

    def __repr__(self) -> str:  # never print the password, not even in a traceback
        return f"Credentials(user={self.user!r})"


def authorization(headers: list[tuple[bytes, bytes]]) -> tuple[str, bytes] | None:
    """(scheme in lower case, parameter) of the Authorization header; None without one."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, param = bytes(value).strip().partition(b" ")
            return scheme.decode("latin-1").lower(), param.strip()
    return None


def parse_basic(param: bytes) -> Credentials | None:
    """The credentials of a Basic header; None for empty ones (clients send `:` when they have none).

    Raises ValueError when the header is malformed.
    """
    try:
        raw = base64.b64decode(param, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("malformed Basic credentials") from None
    user, sep, password = raw.partition(b":")
    if not sep:
        raise ValueError("malformed Basic credentials")
    if not user and not password:
        return None
    return Credentials(user.decode("utf-8", "replace"), password)


class PasswordSignIn:
    """Checks a user's password against the htpasswd users; every failure is counted.

    Refusals carry what their audit line needs (`refused_by` "signin" or "ratelimit").
    """

    def __init__(self, users: HtpasswdFile | None, limiter: FailureLimiter) -> None:
        self.users = users
        self.limiter = limiter

    def check_not_blocked(self, remote: str | None, user: str | None = None) -> None:
        wait, by = self.limiter.blocked(remote, user)
        if wait > 0:
            raise TooManyRequests(
                {"reason": "too many failed sign-ins; retry later"},
                headers={"Retry-After": str(math.ceil(wait))},
                refused_by="ratelimit",
                rule=f"authfailures {by}",
                audit={"user": user},
            )

    async def sign_in(self, credentials: Credentials, *, remote: str | None, challenge: dict[str, str]) -> str:
        """The user name, or Unauthorized (with `challenge` headers) / TooManyRequests."""
        self.check_not_blocked(remote, credentials.user)
        if self.users is not None and await self.users.verify(credentials.user, credentials.password):
            return credentials.user
        reason = "unknown user" if self.users is None or credentials.user not in self.users else "wrong password"
        raise self.refuse(remote, credentials.user[:256], reason, message="authentication failed", headers=challenge)

    def refuse(
        self, remote: str | None, user: str | None, reason: str, *, message: str, headers: dict[str, str]
    ) -> Unauthorized:
        """Count a failed sign-in (wrong password, malformed header, invalid token); the error to answer with."""
        blocked = self.limiter.failure(remote, user)
        audit: dict[str, object] = {"user": user}
        if blocked:
            audit["blocked"] = blocked
        return Unauthorized(message=message, headers=headers, refused_by="signin", rule=reason, audit=audit)
