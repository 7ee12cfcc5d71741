"""Read-only mode: from the file (storage.maintenance.readonly) or the cluster-wide switch; writes refused.

Distribution answers a write to a read-only registry 405 with `Allow: GET, HEAD`; Wharf does the same
with an OCI error body. Pulls go on. The leader's jobs that delete (upload purge, GC, retention) and
scheduled snapshots wait while it lasts.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from coordinator.kv import KV
from coordinator.readonly import Halted, SwitchFollower

from .errors import Unsupported, send_error

_READS = ("GET", "HEAD", "OPTIONS")


class ReadOnly:
    """Whether this node refuses writes now: the file says so, or the switch does."""

    def __init__(self, configured: bool, kv: KV) -> None:
        self.configured = configured
        self.switch = SwitchFollower(kv)

    @property
    def active(self) -> bool:
        return self.configured or self.switch.state.enabled

    def check(self) -> None:
        """Halted if a job must not delete anything now."""
        if self.active:
            raise Halted(self.describe())

    def describe(self) -> str:
        if self.configured:
            return "read-only (storage.maintenance.readonly.enabled in the configuration)"
        state = self.switch.state
        if state.enabled:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(state.at))
            why = f": {state.reason}" if state.reason else ""
            return f"read-only (switched on by {state.by or 'someone'} at {when}{why})"
        return "writable"

    def status(self) -> dict[str, Any]:
        state = self.switch.state
        return {
            "readonly": self.active,
            "configured": self.configured,
            "switch": {"enabled": state.enabled, "by": state.by, "at": state.at, "reason": state.reason},
        }

    def refusal(self) -> Unsupported:
        return Unsupported(
            {"readonly": self.describe()},
            message="the registry is in read-only mode: pulls work, pushes and deletes are refused",
            headers={"Allow": "GET, HEAD"},
            refused_by="readonly",
            rule="storage.maintenance.readonly" if self.configured else "wharf maintenance readonly",
        )


class ReadOnlyMiddleware:
    """Refuses every write to the API (uploads, mounts, manifest PUTs, deletes) while read-only.

    Reads cost one comparison: the state is a plain attribute kept current by the switch's watch.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in _READS and scope["path"].startswith("/v2/"):
            readonly: ReadOnly = scope["app"].state.services.readonly
            if readonly.active:
                await send_error(readonly.refusal(), scope, receive, send)
                return
        await self.app(scope, receive, send)
