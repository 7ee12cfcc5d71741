"""Signing people in to the web pages: a signed cookie naming the user, checked on every page.

The cookie holds the user name and a fingerprint of the user's stored password hash, signed with
`http.secret` when it is set, otherwise with a key the coordinator keeps for every node
(coordinator/sessionkey.py). A cookie is good for `ui.session`; a changed password or a removed
user ends it at the next page. A guest session (user None) is made only on request, when the access
rules let anonymous callers pull something.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from itsdangerous import BadSignature, URLSafeTimedSerializer

from coordinator.kv import KV
from coordinator.sessionkey import session_key

from ..auth.services import AuthServices

COOKIE = "wharf_ui"
_SALT = "wharf-ui-session"
_GUEST = ""


@dataclass(frozen=True)
class Person:
    """Who is looking at a page: a user name, or None for a guest (or anyone, with auth off)."""

    user: str | None


class Sessions:
    def __init__(self, auth: AuthServices, kv: KV, *, secret: str, lifetime: float) -> None:
        self._auth = auth
        self._kv = kv
        self._secret = secret
        self.lifetime = lifetime
        self._serializer: URLSafeTimedSerializer | None = None

    @property
    def passwords(self) -> bool:
        """Whether people can sign in with a user name and password here."""
        return self._auth.sign_in.users is not None

    @property
    def guests(self) -> bool:
        return self._auth.access.has_anonymous

    async def _signer(self) -> URLSafeTimedSerializer:
        if self._serializer is None:
            key = self._secret.encode() if self._secret else await session_key(self._kv)
            self._serializer = URLSafeTimedSerializer(key, salt=_SALT)
        return self._serializer

    async def _fingerprint(self, user: str) -> str | None:
        users = self._auth.sign_in.users
        if users is None:
            return None
        hashed = await users.stored_hash(user)
        return hashlib.sha256(hashed).hexdigest()[:32] if hashed is not None else None

    async def issue(self, user: str | None) -> str:
        """The cookie value for a user who just signed in (None: a guest)."""
        fingerprint = await self._fingerprint(user) if user is not None else _GUEST
        return str((await self._signer()).dumps({"u": user, "f": fingerprint}))

    async def person(self, cookie: str | None) -> Person | None:
        """Who a cookie names, if it is valid, current, and its user still signs in the same way."""
        if not cookie or len(cookie) > 4096:
            return None
        try:
            data = (await self._signer()).loads(cookie, max_age=int(self.lifetime))
        except BadSignature:
            return None
        if not isinstance(data, dict):
            return None
        user, fingerprint = data.get("u"), data.get("f")
        if user is None:
            return Person(None) if self.guests and fingerprint == _GUEST else None
        if not isinstance(user, str) or not isinstance(fingerprint, str):
            return None
        current = await self._fingerprint(user)
        return Person(user) if current is not None and current == fingerprint else None
