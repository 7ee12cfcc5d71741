"""The signed state an upload's Location URL carries: the offset it was handed out at (Distribution's `_state`).

The coordinator stays the truth; the state only says where the URL's holder believes the upload
stands. A request is refused on it (416, with the upload's real Range and a fresh Location) only
when it says nothing else about where its bytes go: a PATCH or a closing PUT that brings a body
without Content-Range through a URL handed out at another offset (a client re-sending an older
URL would otherwise append its bytes twice). A Content-Range decides by itself, so a client that
sends every chunk to the first Location with the right Content-Range keeps working, and a closing
PUT without a body is judged by its digest alone. A URL without state (handed out by an earlier
Wharf) works as before; one whose state does not verify is refused (400).

The key is derived from the one the coordinator keeps for every node (coordinator/sessionkey.py),
never from `http.secret`: nodes need no shared secret, so a URL signed by one node verifies on every
other, and across restarts, for as long as the coordinator lives.
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
    def __init__(self, kv: KV) -> None:
        self._kv = kv
        self._key: bytes | None = None

    async def ready(self) -> None:
        """Load the signing key (one coordinator read per process, made by the first node that asks)."""
        if self._key is None:
            self._key = hmac.new(await session_key(self._kv), _PURPOSE, hashlib.sha256).digest()

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
        if (
            not dot
            or not (offset.isascii() and offset.isdigit())
            or len(offset) > 20
            or len(mac) > 64
            or not mac.isascii()
        ):
            raise BadUploadState(state[:100])
        if not hmac.compare_digest(mac, self._mac(upload_id, repository, int(offset))):
            raise BadUploadState(state[:100])
        return int(offset)
