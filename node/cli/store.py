"""`wharf import`, `wharf export` and `wharf scrub`: a registry:2 store adopted, written back, and checked."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys

from coordinator.metadata import ImportState

from .. import exporter, importer, scrub
from ..config import Config
from ..services import Services
from ..store import open_storage
from .output import size
from .registry import Commands, store_command, with_services


def add_commands(commands: Commands) -> None:
    imp = store_command(
        commands,
        "import",
        run_import,
        help="adopt a registry:2 store: its repositories become Wharf's (no blob copied or deleted)",
        description="Import the registry:2 repository tree in the storage into the coordinator. Idempotent and "
        "resumable; `wharf serve` runs it by itself on a store it finds unadopted.",
        dry_run="say what would be imported; change nothing",
    )
    imp.add_argument("--status", action="store_true", help="show how far an import is, then exit")
    store_command(
        commands,
        "export",
        run_export,
        help="write registry:2's repository tree for every tag, so Distribution can serve the store",
        description="Write Distribution's tag, manifest and layer links for Wharf's repositories (the rollback "
        "path of a migration). Writes only what is missing; deletes nothing.",
        dry_run="say what would be written; change nothing",
    )
    store_command(
        commands,
        "scrub",
        run_scrub,
        help="read every blob back and check it against its digest",
        description="Hash every stored blob; mark those whose bytes do not match so they are no longer served "
        "(clients then push them again, which repairs them). Deletes nothing.",
        dry_run="report only; mark nothing",
    )


def _import_line(state: ImportState) -> str:
    return (
        f"import {state.state}: {state.repositories_done}/{state.repositories_total} repositories, "
        f"{state.tags} tags, {state.manifests} manifests, {state.links} layer links, {state.problems} problems"
    )


def run_import(args: argparse.Namespace, config: Config) -> int:
    if args.status:

        async def status(services: Services) -> int:
            state = await services.metadata.import_state()
            if args.json:
                print(json.dumps(dataclasses.asdict(state) if state else None, indent=2))
            else:
                print(_import_line(state) if state else "no import: this store was not adopted from registry:2")
            return 0

        return asyncio.run(with_services(config, status, readonly=True))

    def progress(state: ImportState) -> None:
        if sys.stderr.isatty():
            print(f"\r{_import_line(state)}", end="", file=sys.stderr, flush=True)

    async def once(services: Services) -> int:
        try:
            report = await importer.run_import(services, dry_run=args.dry_run, progress=progress)
        except importer.ImportBusy as exc:
            print(f"wharf import: an import is running on {exc}", file=sys.stderr)
            return 1
        if sys.stderr.isatty():
            print(file=sys.stderr)
        if args.json:
            problems = [dataclasses.asdict(p) for p in report.problems]
            print(
                json.dumps(
                    {
                        "state": dataclasses.asdict(report.state),
                        "problems": problems,
                        "dry_run": args.dry_run,
                        "moved": report.moved,
                        "untagged": report.untagged,
                    }
                )
            )
            return 0
        print(_import_line(report.state) + (" (dry run: nothing was changed)" if args.dry_run else ""))
        if report.moved or report.untagged:
            print(f"since the export: {report.moved} tags moved and {report.untagged} deleted, as registry:2 did")
        for problem in report.problems[:50]:
            print(f"  {problem.kind}: {problem.key} {problem.detail}".rstrip())
        if len(report.problems) > 50:
            print(f"  ... and {len(report.problems) - 50} more (--json lists them all)")
        return 0

    if args.dry_run:
        return asyncio.run(_import_dry_run(config))
    return asyncio.run(with_services(config, once, mode="import"))


async def _import_dry_run(config: Config) -> int:
    """Reads the storage only: a store not adopted yet has no coordinator to open, and gets none."""
    storage = open_storage(config, create=False)
    try:
        report = await importer.scan(storage, None)
    finally:
        await storage.close()
    print(_import_line(report.state) + " (dry run: nothing was changed)")
    for problem in report.problems[:50]:
        print(f"  {problem.kind}: {problem.key} {problem.detail}".rstrip())
    return 0


def run_export(args: argparse.Namespace, config: Config) -> int:
    async def once(services: Services) -> int:
        report = await exporter.run_export(services, dry_run=args.dry_run)
        if args.json:
            print(json.dumps(dataclasses.asdict(report), indent=2))
            return 0
        verb = "would write" if args.dry_run else "wrote"
        print(
            f"{verb} registry:2 links for {report.repositories} repositories ({report.tags} tags): "
            f"{report.links_written} links {'to write' if args.dry_run else 'written'}, "
            f"{report.links_unchanged} already right, "
            f"{report.blobs_copied} blobs copied to their content-addressed key ({size(report.bytes_copied)})"
        )
        for digest in report.missing:
            print(f"  missing from storage: {digest}")
        if args.dry_run:
            print("dry run: nothing was changed")
        return 1 if report.missing else 0

    return asyncio.run(with_services(config, once, readonly=args.dry_run))


def run_scrub(args: argparse.Namespace, config: Config) -> int:
    async def once(services: Services) -> int:
        report = await scrub.run_scrub(services, dry_run=args.dry_run)
        if args.json:
            print(json.dumps(dataclasses.asdict(report), indent=2))
        else:
            print(f"checked {report.checked} blobs ({size(report.bytes_read)}): {len(report.corrupt)} corrupt")
            for bad in report.corrupt:
                print(f"  {bad['digest']}: {bad['problem']} ({bad['key']})")
            if report.corrupt:
                print("dry run: nothing was marked" if args.dry_run else "marked: no longer served until pushed again")
        return 1 if report.corrupt else 0

    return asyncio.run(with_services(config, once, readonly=args.dry_run))
