"""The signed state an upload's Location URL carries: the offset it was handed out at (Distribution's `_state`).

A PATCH or closing PUT through a URL whose offset is no longer the upload's (a client re-sending
an older URL) is refused with 416 before a byte is written, instead of appending at whatever
offset the upload reached meanwhile. The coordinator stays the truth: the offset is compared with
the session read in the same transaction that claims it, and nothing else is taken from the URL.
A URL without the state (handed out by an earlier Wharf) works as before; one whose state does not
verify is refused. The key is `http.secret` when set, otherwise the key the coordinator keeps for
every node (coordinator/sessionkey.py), each derived for this use alone.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from coordinator.kv import KV
from coordinator.sessionkey import session_key
from coordinator.uploads import UploadSession

# The query parameter, as Distribution names it.
PARAM = "_state"
_PURPOSE = b"wharf upload state v1"
_MAC_BYTES = 16


class BadUploadState(Exception):
    """A state that this cluster did not sign for this upload."""


class UploadStates:
    def __init__(self, kv: KV, secret: str = "") -> None:
        self._kv = kv
        self._secret = secret
        self._key: bytes | None = None

    async def ready(self) -> None:
        """Load the signing key (once per process; the coordinator is asked only without `http.secret`)."""
        if self._key is None:
            base = self._secret.encode() if self._secret else await session_key(self._kv)
            self._key = hmac.new(base, _PURPOSE, hashlib.sha256).digest()

    def _mac(self, upload_id: str, repository: str, offset: int) -> str:
        assert self._key is not None, "UploadStates.ready() first"
        message = f"{upload_id}\n{repository}\n{offset}".encode()
        mac = hmac.new(self._key, message, hashlib.sha256).digest()[:_MAC_BYTES]
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def sign(self, session: UploadSession) -> str:
        """The state for a URL that continues `session` from its offset now."""
        return f"{session.offset}.{self._mac(session.id, session.repository, session.offset)}"

    def offset(self, state: str, upload_id: str, repository: str) -> int:
        """The offset a state was signed at, for this upload only; BadUploadState otherwise."""
        offset, dot, mac = state.partition(".")
        if not dot or not offset.isdigit() or len(offset) > 20 or len(mac) > 64 or not mac.isascii():
            raise BadUploadState(state[:100])
        if not hmac.compare_digest(mac, self._mac(upload_id, repository, int(offset))):
            raise BadUploadState(state[:100])
        return int(offset)
