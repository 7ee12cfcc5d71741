"""`wharf maintenance readonly on|off|status`: the cluster-wide read-only switch."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import socket
import sys

from coordinator.readonly import set_switch

from ..config import Config
from ..readonly import ReadOnly
from ..services import Services
from .registry import Commands, with_config, with_services


def add_commands(commands: Commands) -> None:
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
    cmd.set_defaults(run=with_config(run_readonly))


def run_readonly(args: argparse.Namespace, config: Config) -> int:
    async def switch(services: Services) -> int:
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
