"""The key that signs the web pages' sign-in cookies, shared by every node through the coordinator."""

from __future__ import annotations

import secrets

from . import keys
from .kv import KV, Compare, Get, Put

KEY_BYTES = 32


async def session_key(kv: KV) -> bytes:
    """The cluster's cookie-signing key: read it, or make it (the first node to ask wins a race)."""
    found = await kv.get(keys.UI_SESSION_KEY)
    if found is not None and len(found.value) >= KEY_BYTES:
        return found.value
    made = secrets.token_bytes(KEY_BYTES)
    result = await kv.txn(
        [Compare.absent(keys.UI_SESSION_KEY)],
        [Put(keys.UI_SESSION_KEY, made)],
        [Get(keys.UI_SESSION_KEY)],
    )
    if result.succeeded:
        return made
    winner = result.gets[0] if result.gets else None
    if winner is None:
        raise RuntimeError("the web pages' session key was neither written nor found")
    return winner.value
