"""Read-only mode: from the file (storage.maintenance.readonly) or the cluster-wide switch; writes refused.

Distribution answers a write to a read-only registry 405 with `Allow: GET, HEAD`; Wharf does the same
with an OCI error body. Pulls go on. The leader's jobs that delete (upload purge, GC, retention) and
scheduled snapshots wait while it lasts.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import socket
import sys
import time
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from coordinator.kv import KV
from coordinator.readonly import Halted, SwitchFollower, set_switch

from .config import Config
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


# -- wharf maintenance readonly on|off|status ------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    group = commands.add_parser("maintenance", help="cluster-wide maintenance switches")
    switches = group.add_subparsers(dest="maintenance_switch", required=True)
    cmd = switches.add_parser(
        "readonly",
        help="make every node refuse pushes and deletes (pulls go on), or writable again",
        description="Switch the whole cluster read-only or back, without a restart; every node obeys "
        "within two seconds. storage.maintenance.readonly in a node's file keeps that node read-only "
        "whatever the switch says.",
    )
    cmd.add_argument("state", choices=["on", "off", "status"])
    cmd.add_argument("--config", "-c", help="configuration file")
    cmd.add_argument("--reason", default="", help="shown in readiness, logs and refusals")
    cmd.add_argument("--json", action="store_true", help="print the state as JSON")
    cmd.set_defaults(run=run_readonly)


def run_readonly(args: argparse.Namespace, config: Config) -> int:
    from .admin import with_services

    async def switch(services: Any) -> int:
        readonly: ReadOnly = services.readonly
        if args.state != "status":
            by = f"{getpass.getuser()}@{socket.gethostname()}"
            await set_switch(services.kv, args.state == "on", by=by, reason=args.reason)
        await readonly.switch.refresh()
        if args.json:
            print(json.dumps(readonly.status(), indent=2))
        else:
            print(
                f"switch: {'on' if readonly.switch.state.enabled else 'off'}; this configuration: {readonly.describe()}"
            )
            if args.state == "on":
                print("every node refuses pushes and deletes within 2 s; `wharf maintenance readonly off` ends it")
        return 0

    try:
        return asyncio.run(with_services(config, switch, readonly=args.state == "status"))
    except OSError as exc:
        print(f"wharf maintenance readonly: {exc}", file=sys.stderr)
        return 1
