"""`wharf notifications status`: each webhook endpoint's queue."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from ..config import Config
from ..delivery import endpoint_report
from ..services import Services
from .registry import Commands, with_config, with_services


def add_commands(commands: Commands) -> None:
    group = commands.add_parser("notifications", help="webhook notification queues")
    actions = group.add_subparsers(dest="notifications_action", required=True)
    status = actions.add_parser(
        "status",
        help="each endpoint's queue: pending events, the oldest one's age, the last delivery and failure",
    )
    status.add_argument("--config", "-c", help="configuration file")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=with_config(run_status))


def _ago(ts: float | None) -> str:
    if not ts:
        return "never"
    seconds = max(time.time() - ts, 0)
    return f"{seconds:.0f}s ago" if seconds < 120 else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def run_status(args: argparse.Namespace, config: Config) -> int:
    async def report(services: Services) -> int:
        found = await endpoint_report(services.kv, config)
        if args.json:
            print(json.dumps(found, indent=2))
            return 0
        if not found["endpoints"]:
            print("no notification endpoints configured")
            return 0
        print(f"delivered by: {found['leader'] or 'no leader right now'}; not yet queued: {found['unsequenced']}")
        for row in found["endpoints"]:
            oldest = row["oldest_pending_seconds"]
            print(
                f"{row['endpoint']} ({row['url'] or '-'}, {row['state']}): {row['pending']} pending"
                + (f", oldest {oldest:.1f}s old" if oldest is not None else "")
                + f"; {row['delivered']} delivered, last {_ago(row['last_success'])}"
            )
            if row["consecutive_failures"]:
                print(f"  failing: {row['consecutive_failures']} tries in a row, last {_ago(row['last_failure'])}")
                print(f"  last error: {row['last_error']}")
        return 0

    try:
        return asyncio.run(with_services(config, report, readonly=True))
    except OSError as exc:
        print(f"wharf notifications status: {exc}", file=sys.stderr)
        return 1
