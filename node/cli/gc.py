"""`wharf gc` (alias `garbage-collect`): one online garbage collection cycle, or why something is kept."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from coordinator.gc import Collector, Summary
from coordinator.readonly import Halted

from .. import gc
from ..config import Config
from ..errors import RegistryError
from ..reference import parse_digest, validate_name
from ..services import Services
from .output import progress, size
from .registry import Commands, store_command, with_services

CYCLE_WAIT = 300.0  # seconds `wharf gc` waits for a cycle another process is running
CYCLE_POLL = 0.5


def add_commands(commands: Commands) -> None:
    for name in ("gc", "garbage-collect"):
        cmd = store_command(
            commands,
            name,
            run_gc,
            help="run one garbage collection cycle" + (" (alias of gc)" if name != "gc" else ""),
            description="Run one online garbage collection cycle; pushes and pulls go on meanwhile.",
            dry_run="say what would go; change nothing",
        )
        cmd.add_argument(
            "--delete-untagged", "-m", action="store_true", help="also delete manifests that no tag reaches"
        )
        cmd.add_argument("--explain", metavar="REPO@DIGEST|DIGEST", help="say why something is kept, then exit")
        cmd.add_argument(
            "--reclaim-imported",
            action="store_true",
            help="also delete blobs adopted from registry:2 that no manifest ever used",
        )
        cmd.add_argument(
            "--delete-unaccounted",
            action="store_true",
            help="also delete storage objects that no Wharf record names (Wharf cannot prove it wrote them)",
        )
        cmd.add_argument(
            "--wait",
            type=float,
            default=CYCLE_WAIT,
            metavar="SECONDS",
            help=f"when a cycle is already running (a node's online GC), wait this long for it to end "
            f"(default {CYCLE_WAIT:g}; 0: give up at once)",
        )


def _gc_lines(summary: Summary) -> list[str]:
    """The human summary of a cycle: what went, and what was held back, why and until when."""
    verb = "would delete" if summary.dry_run else "deleted"
    lines = [
        f"manifests seen: {summary.manifests_seen}   blobs seen: {summary.blobs_seen}",
        f"{verb}: {summary.manifests_deleted} manifests, {summary.blobs_deleted} blobs, "
        f"{summary.orphans_deleted} unaccounted objects, {size(summary.bytes_freed)}",
    ]
    if summary.held_back:
        lines.append("held back:")
        for held in summary.held_back.values():
            until = ""
            if held.until is not None:
                until = f", until {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(held.until))}"
            lines.append(f"  {held.count} ({size(held.bytes)}): {held.reason}{until}")
    else:
        lines.append("held back: nothing")
    lines.append(f"duration: {summary.duration:.2f}s")
    if summary.dry_run:
        lines.append("dry run: nothing was changed")
    return lines


def run_gc(args: argparse.Namespace, config: Config) -> int:
    if args.explain:
        return asyncio.run(with_services(config, lambda svc: _explain(svc, args), readonly=True))

    async def collect(services: Services) -> Summary:
        """One cycle; while another process runs one, wait (bounded by --wait) for it to end."""
        deadline = time.monotonic() + max(args.wait, 0.0)
        told = False
        while True:
            try:
                return await gc.collect(
                    services,
                    dry_run=args.dry_run,
                    delete_untagged=args.delete_untagged or None,
                    progress=progress,
                    reclaim_imported=args.reclaim_imported,
                    delete_unaccounted=args.delete_unaccounted,
                )
            except gc.CycleRunning as exc:
                if time.monotonic() >= deadline:
                    raise
                if not told:
                    print(f"wharf gc: a cycle is running on {exc}; waiting for it to end", file=sys.stderr)
                    told = True
                await asyncio.sleep(CYCLE_POLL)

    async def cycle(services: Services) -> int:
        try:
            summary = await collect(services)
        except gc.CycleRunning as exc:
            print(f"wharf gc: a cycle is already running on {exc}", file=sys.stderr)
            return 1
        except Halted:
            print(f"wharf gc: the registry is {services.readonly.describe()}; nothing was deleted", file=sys.stderr)
            return 1
        except gc.ImportRunning as exc:
            print(
                f"wharf gc: a registry:2 store is being adopted (import {exc}); collect once it is done "
                "(`wharf import --status CONFIG`)",
                file=sys.stderr,
            )
            return 1
        if args.json:
            print(json.dumps(summary.report(), indent=2))
            return 0
        print("\n".join(_gc_lines(summary)))
        if summary.dry_run:
            for item in summary.deleted:
                print(f"  {item}")
        return 0

    readonly = config.storage.maintenance.readonly
    if readonly.enabled:
        # registry:2's procedure: read-only in the file, then garbage-collect with that file. Wharf
        # collects online and needs no read-only window, but runs as asked; the cluster-wide switch
        # (`wharf maintenance readonly on`, a backup's freeze) still halts it.
        print(
            "wharf gc: storage.maintenance.readonly is on in the configuration, as registry:2's "
            "garbage-collect wants; Wharf needs no read-only window and collects anyway",
            file=sys.stderr,
        )
        readonly.enabled = False  # for this command only: the file stays as it is
    return asyncio.run(with_services(config, cycle, readonly=args.dry_run))


async def _explain(services: Services, args: argparse.Namespace) -> int:
    target = args.explain
    repo, _, digest = target.rpartition("@")
    try:
        parse_digest(digest)
        if repo:
            validate_name(repo)
    except RegistryError as exc:
        print(f"wharf gc --explain: {exc.message}: {target}", file=sys.stderr)
        return 2
    collector = Collector(
        services.kv,
        grace=services.config.gc.grace,
        delete_untagged=args.delete_untagged,
        address=services.metadata.address,
    )
    report = await collector.explain(repo or None, digest)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{digest}: {'kept' if report['retained'] else 'not kept'}" + ("" if report["known"] else " (unknown here)"))
    for reason in report["reasons"]:
        print(f"  - {reason}")
    return 0
