"""`wharf retention apply`: the retention policies applied once, or a dry run of them."""

from __future__ import annotations

import argparse
import asyncio
import sys

from coordinator.readonly import Halted

from .. import retention
from ..config import Config, ConfigError
from ..services import Services
from .output import print_json, table_lines
from .registry import Commands, store_command, with_services


def add_commands(commands: Commands) -> None:
    cmd = commands.add_parser("retention", help="apply retention policies")
    store_command(
        cmd.add_subparsers(dest="retention_action", required=True),
        "apply",
        run_retention_apply,
        help="delete the tags and untagged manifests the policies say go",
        description="Apply the retention policies once (whether or not retention.enabled schedules them); "
        "garbage collection then reclaims the freed blobs.",
        dry_run="say what would go; change nothing",
    )


def run_retention_apply(args: argparse.Namespace, config: Config) -> int:
    if not config.retention.policies and not args.json:
        print("no retention policies configured")
        return 0

    async def once(services: Services) -> int:
        try:
            run = await retention.apply(services, dry_run=args.dry_run)
        except ConfigError as exc:
            print(f"wharf retention: {exc}", file=sys.stderr)
            return 2
        except retention.RunInProgress as exc:
            print(f"wharf retention: a run is already in progress on {exc}", file=sys.stderr)
            return 1
        except Halted:
            print(
                f"wharf retention: the registry is {services.readonly.describe()}; nothing more was deleted",
                file=sys.stderr,
            )
            return 1
        done = run.plan if run.result is None else run.result  # what a dry run would do, or what was done
        skipped = () if run.result is None else run.result.skipped
        if args.json:
            print_json(
                {
                    "dry_run": run.result is None,
                    "delete": done.each_row(),
                    "skipped": (s.__dict__ for s in skipped),
                    "kept": (k.__dict__ for k in run.plan.kept),
                    "summary": None if run.result is None else run.result.summary(),
                }
            )
            return 0
        columns = [
            ("repository", "REPOSITORY"),
            ("reference", "TAG/DIGEST"),
            ("action", "ACTION"),
            ("pushed", "PUSHED"),
            ("reason", "REASON"),
        ]
        tags, manifests = (
            (len(run.plan.tags), len(run.plan.manifests))
            if run.result is None
            else (len(run.result.tags_deleted), len(run.result.manifests_deleted))
        )
        if tags or manifests:
            for line in table_lines(done.each_row, columns):
                print(line)
        verb = "would delete" if run.result is None else "deleted"
        print(f"{verb}: {tags} tags, {manifests} manifests; kept {len(run.plan.kept)} tags by policy")
        if skipped:
            print(f"left alone because they changed meanwhile: {len(skipped)}")
            for s in skipped:
                print(f"  {s.repository} {s.reference}: {s.why}")
        if run.result is None:
            print("dry run: nothing was changed")
        elif tags or manifests:
            print("run `wharf gc` (or wait for the scheduled cycle) to reclaim the freed blobs")
        return 0

    return asyncio.run(with_services(config, once, readonly=args.dry_run))
