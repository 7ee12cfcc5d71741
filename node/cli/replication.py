"""`wharf replication status`: each region's replication lag, and in which regions an image is whole."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from ..config import Config
from ..errors import RegistryError
from ..replication import ImageUnknown, report
from ..services import Services
from .output import size, table
from .registry import Commands, store_command, with_services


def add_commands(commands: Commands) -> None:
    group = commands.add_parser("replication", help="replication between regions")
    actions = group.add_subparsers(dest="replication_action", required=True)
    status = store_command(
        actions,
        "status",
        run_status,
        help="per region: copies waiting, their bytes and the oldest's age; with REPO:TAG, where the image is whole",
    )
    status.add_argument("image", nargs="?", help="REPOSITORY:TAG or REPOSITORY@DIGEST")


def run_status(args: argparse.Namespace, config: Config) -> int:
    async def status(services: Services) -> int:
        try:
            found = await report(services, args.image)
        except (ImageUnknown, RegistryError) as exc:
            print(f"wharf replication status: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(found, indent=2))
            return 0
        if found["regions"] is None:
            print(found["message"])
            return 0
        print(f"this node's region: {found['region']}; leader: {found['leader'] or 'none right now'}")
        rows = [
            {
                "region": row["region"] + (" (here)" if row["local"] else ""),
                "waiting": str(row["waiting"]),
                "bytes": size(row["waiting_bytes"]),
                "oldest": "-" if row["oldest_seconds"] is None else f"{row['oldest_seconds']:.1f}s",
                "workers": str(row["workers"]),
                "storage": row["storage"],
            }
            for row in found["regions"]  # type: ignore[attr-defined]
        ]
        columns = [("region", "REGION"), ("waiting", "WAITING"), ("bytes", "BYTES"), ("oldest", "OLDEST")]
        columns += [("workers", "WORKERS"), ("storage", "STORAGE")]
        print("\n".join(table(rows, columns)))
        image = found.get("image")
        if isinstance(image, dict):
            print(f"\n{image['reference']} ({image['digest']}): {image['objects']} objects, {size(image['bytes'])}")
            for row in image["regions"]:
                if row["complete"]:
                    print(f"  {row['region']}: complete")
                    continue
                print(
                    f"  {row['region']}: {row['missing']} of {image['objects']} objects missing "
                    f"({size(row['missing_bytes'])}): {row['queued']} queued, {row['copying']} being copied"
                    + (f", {row['unplaced']} not yet placed by the backfill" if row["unplaced"] else "")
                )
        return 0

    try:
        return asyncio.run(with_services(config, status, readonly=True))
    except OSError as exc:
        print(f"wharf replication status: {exc}", file=sys.stderr)
        return 1
