"""Operator commands that work on the coordinator and storage directly: gc, retention, quota, rm."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from coordinator.gc import Collector, Summary
from coordinator.metadata import ImportState
from coordinator.quota import QuotaScope
from coordinator.quota import usage as quota_usage
from coordinator.readonly import Halted

from . import exporter, gc, importer, retention, scrub
from .api.manifests import check_deletable
from .config import Config, ConfigError
from .errors import RegistryError
from .reference import Reference, parse_digest, validate_name, validate_tag
from .services import Services
from .store import Mode, open_storage, open_store

T = TypeVar("T")


async def with_services(
    config: Config, work: Callable[[Services], Awaitable[T]], *, readonly: bool = False, mode: Mode | None = None
) -> T:
    """Open the store as `wharf serve` does (StoreRefused if it is not there or not one store).

    `readonly` (dry runs, listings) creates and changes nothing anywhere.
    """
    store = await open_store(config, mode or ("read" if readonly else "write"))
    services = Services.build(config, store.kv, store.storage)
    try:
        await services.readonly.switch.refresh()
        return await work(services)
    finally:
        await services.close()


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    for name in ("gc", "garbage-collect"):
        cmd = commands.add_parser(
            name,
            help="run one garbage collection cycle" + (" (alias of gc)" if name != "gc" else ""),
            description="Run one online garbage collection cycle; pushes and pulls go on meanwhile.",
        )
        cmd.add_argument("config", nargs="?", help="configuration file")
        cmd.add_argument("--dry-run", "-d", action="store_true", help="say what would go; change nothing")
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
        cmd.add_argument("--json", action="store_true", help="print the summary as JSON")
        cmd.set_defaults(run=run_gc)
    _add_listing(
        commands,
        "immutability",
        "show immutable-tag rules and the tags they protect",
        "list protected tags, by rule",
        run_immutability_ls,
    )
    _add_listing(commands, "quota", "show quota usage and limits", "list every quota with its usage", run_quota_ls)
    _add_retention(commands)
    _add_store_commands(commands)
    rm = commands.add_parser("rm", help="delete images by tag or digest", description="Delete images.")
    rm.add_argument("references", nargs="+", metavar="REPO:TAG|REPO@DIGEST")
    rm.add_argument("--config", "-c", help="configuration file")
    rm.add_argument("--tag-only", action="store_true", help="remove the tag, keep the manifest")
    rm.set_defaults(run=run_rm)


def _add_listing(
    commands: argparse._SubParsersAction,  # type: ignore[type-arg]
    name: str,
    help: str,
    ls_help: str,
    run: Callable[[argparse.Namespace, Config], int],
) -> None:
    """`wharf NAME ls [--json] [CONFIG]`."""
    group = commands.add_parser(name, help=help)
    actions = group.add_subparsers(dest=f"{name}_action", required=True)
    listing = actions.add_parser("ls", help=ls_help)
    listing.add_argument("config", nargs="?", help="configuration file")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=run)


def _progress(phase: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        end = "\n" if done >= total else ""
        print(f"\r{phase}: {done}/{total}", end=end, file=sys.stderr, flush=True)
    elif done >= total:
        print(f"{phase}: {done}/{total}", file=sys.stderr)


def _gc_lines(summary: Summary) -> list[str]:
    """The human summary of a cycle: what went, and what was held back, why and until when."""
    verb = "would delete" if summary.dry_run else "deleted"
    lines = [
        f"manifests seen: {summary.manifests_seen}   blobs seen: {summary.blobs_seen}",
        f"{verb}: {summary.manifests_deleted} manifests, {summary.blobs_deleted} blobs, "
        f"{summary.orphans_deleted} unaccounted objects, {_size(summary.bytes_freed)}",
    ]
    if summary.held_back:
        lines.append("held back:")
        for held in summary.held_back.values():
            until = ""
            if held.until is not None:
                until = f", until {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(held.until))}"
            lines.append(f"  {held.count} ({_size(held.bytes)}): {held.reason}{until}")
    else:
        lines.append("held back: nothing")
    lines.append(f"duration: {summary.duration:.2f}s")
    if summary.dry_run:
        lines.append("dry run: nothing was changed")
    return lines


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def run_gc(args: argparse.Namespace, config: Config) -> int:
    if args.explain:
        return asyncio.run(with_services(config, lambda svc: _explain(svc, args), readonly=True))

    async def cycle(services: Services) -> int:
        try:
            summary = await gc.collect(
                services,
                dry_run=args.dry_run,
                delete_untagged=args.delete_untagged or None,
                progress=_progress,
                reclaim_imported=args.reclaim_imported,
                delete_unaccounted=args.delete_unaccounted,
            )
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
    collector = Collector(services.kv, grace=services.config.gc.grace, delete_untagged=args.delete_untagged)
    report = await collector.explain(repo or None, digest)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{digest}: {'kept' if report['retained'] else 'not kept'}" + ("" if report["known"] else " (unknown here)"))
    for reason in report["reasons"]:
        print(f"  - {reason}")
    return 0


def run_rm(args: argparse.Namespace, config: Config) -> int:
    if not config.storage.delete.enabled:
        print("wharf rm: deletion is disabled (storage.delete.enabled)", file=sys.stderr)
        return 2

    async def remove(services: Services) -> int:
        if services.readonly.active:
            print(f"wharf rm: the registry is {services.readonly.describe()}; nothing was deleted", file=sys.stderr)
            return 1
        failures = 0
        for reference in args.references:
            try:
                message = await _remove_one(services, reference, tag_only=args.tag_only)
            except (RegistryError, ValueError) as exc:
                print(f"wharf rm: {reference}: {exc}", file=sys.stderr)
                failures += 1
                continue
            print(message)
        return 1 if failures else 0

    return asyncio.run(with_services(config, remove))


async def _remove_one(services: Services, reference: str, *, tag_only: bool) -> str:
    metadata = services.metadata
    if "@" in reference:
        repo, digest = reference.split("@", 1)
        validate_name(repo)
        await check_deletable(services, repo, Reference(digest=parse_digest(digest)))
        if not await metadata.delete_manifest(repo, digest):
            raise ValueError("no such manifest")
        return f"deleted {repo}@{digest}"
    repo, sep, tag = reference.rpartition(":")
    if not sep or "/" in tag:
        raise ValueError("expected REPO:TAG or REPO@DIGEST")
    validate_name(repo)
    validate_tag(tag)
    record = await metadata.get_tag(repo, tag)
    if record is None:
        raise ValueError("no such tag")
    await check_deletable(
        services, repo, Reference(tag=tag) if tag_only else Reference(digest=parse_digest(record.digest))
    )
    if tag_only:
        await metadata.delete_tag(repo, tag)
        return f"untagged {repo}:{tag} (manifest {record.digest} kept)"
    others = [t for t in await metadata.tags_of_digest(repo, record.digest) if t != tag]
    await metadata.delete_manifest(repo, record.digest)
    also = f" and its other tags {', '.join(sorted(others))}" if others else ""
    return f"deleted {repo}:{tag} ({record.digest}){also}"


def run_quota_ls(args: argparse.Namespace, config: Config) -> int:
    async def listing(services: Services) -> int:
        rows: list[dict[str, Any]] = []
        for q in services.policies.quotas:
            used = await quota_usage(services.kv, QuotaScope(q.scope, q.limit, q.label))
            rows.append(
                {
                    "scope": q.scope,
                    "kind": "namespace" if q.namespace else "repository",
                    "used": used,
                    "limit": q.limit,
                    "percent": round(100 * used / q.limit, 1) if q.limit else 100.0,
                }
            )
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print("no quotas configured")
            return 0
        width = max(len(r["scope"]) for r in rows)
        print(f"{'SCOPE':<{width}}  {'KIND':<10}  {'USED':>12}  {'LIMIT':>12}  {'USE%':>6}")
        for r in rows:
            print(
                f"{r['scope']:<{width}}  {r['kind']:<10}  {_size(r['used']):>12}  {_size(r['limit']):>12}  {r['percent']:>5.1f}%"
            )
        return 0

    return asyncio.run(with_services(config, listing, readonly=True))


def _add_retention(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    cmd = commands.add_parser("retention", help="apply retention policies")
    actions = cmd.add_subparsers(dest="retention_action", required=True)
    apply = actions.add_parser(
        "apply",
        help="delete the tags and untagged manifests the policies say go",
        description="Apply the retention policies once (whether or not retention.enabled schedules them); "
        "garbage collection then reclaims the freed blobs.",
    )
    apply.add_argument("config", nargs="?", help="configuration file")
    apply.add_argument("--dry-run", "-d", action="store_true", help="say what would go; change nothing")
    apply.add_argument("--json", action="store_true", help="machine-readable output")
    apply.set_defaults(run=run_retention_apply)


def _table(rows: list[dict[str, str]], columns: list[tuple[str, str]]) -> list[str]:
    widths = [max([len(title), *(len(r[key]) for r in rows)]) for key, title in columns]
    lines = ["  ".join(title.ljust(w) for (_, title), w in zip(columns, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(r[key].ljust(w) for (key, _), w in zip(columns, widths, strict=True)).rstrip())
    return lines


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
        rows = run.plan.rows() if run.result is None else run.result.rows()
        skipped = [] if run.result is None else [s.__dict__ for s in run.result.skipped]
        if args.json:
            report = {
                "dry_run": run.result is None,
                "delete": rows,
                "skipped": skipped,
                "kept": [k.__dict__ for k in run.plan.kept],
                "summary": None if run.result is None else run.result.summary(),
            }
            print(json.dumps(report, indent=2))
            return 0
        columns = [
            ("repository", "REPOSITORY"),
            ("reference", "TAG/DIGEST"),
            ("action", "ACTION"),
            ("pushed", "PUSHED"),
            ("reason", "REASON"),
        ]
        if rows:
            print("\n".join(_table(rows, columns)))
        tags = sum(1 for r in rows if r["action"] == "delete tag")
        verb = "would delete" if run.result is None else "deleted"
        print(f"{verb}: {tags} tags, {len(rows) - tags} manifests; kept {len(run.plan.kept)} tags by policy")
        if skipped:
            print(f"left alone because they changed meanwhile: {len(skipped)}")
            for s in skipped:
                print(f"  {s['repository']} {s['reference']}: {s['why']}")
        if run.result is None:
            print("dry run: nothing was changed")
        elif rows:
            print("run `wharf gc` (or wait for the scheduled cycle) to reclaim the freed blobs")
        return 0

    return asyncio.run(with_services(config, once, readonly=args.dry_run))


def run_immutability_ls(args: argparse.Namespace, config: Config) -> int:
    async def listing(services: Services) -> int:
        immutability = services.policies.immutability
        rows: list[dict[str, str]] = []
        for repository in await services.metadata.list_repositories():
            for tag, record in (await services.metadata.tag_records(repository)).items():
                rule = immutability.rule_for(repository, tag)
                if rule is not None:
                    rows.append({"repository": repository, "tag": tag, "digest": record.digest, "rule": rule})
        if args.json:
            print(json.dumps({"rules": immutability.labels, "protected": rows}, indent=2))
            return 0
        if not immutability:
            print("no immutability rules configured")
            return 0
        print("rules: " + "; ".join(immutability.labels))
        if not rows:
            print("no tag is protected yet")
            return 0
        width = max(len(r["repository"]) + len(r["tag"]) + 1 for r in rows)
        print(f"{'TAG':<{width}}  {'DIGEST':<71}  RULE")
        for r in rows:
            print(f"{r['repository'] + ':' + r['tag']:<{width}}  {r['digest']:<71}  {r['rule']}")
        return 0

    return asyncio.run(with_services(config, listing, readonly=True))


def _add_store_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    imp = commands.add_parser(
        "import",
        help="adopt a registry:2 store: its repositories become Wharf's (no blob copied or deleted)",
        description="Import the registry:2 repository tree in the storage into the coordinator. Idempotent and "
        "resumable; `wharf serve` runs it by itself on a store it finds unadopted.",
    )
    imp.add_argument("config", nargs="?", help="configuration file")
    imp.add_argument("--status", action="store_true", help="show how far an import is, then exit")
    imp.add_argument("--dry-run", "-d", action="store_true", help="say what would be imported; change nothing")
    imp.add_argument("--json", action="store_true", help="machine-readable output")
    imp.set_defaults(run=run_import)
    exp = commands.add_parser(
        "export",
        help="write registry:2's repository tree for every tag, so Distribution can serve the store",
        description="Write Distribution's tag, manifest and layer links for Wharf's repositories (the rollback "
        "path of a migration). Writes only what is missing; deletes nothing.",
    )
    exp.add_argument("config", nargs="?", help="configuration file")
    exp.add_argument("--dry-run", "-d", action="store_true", help="say what would be written; change nothing")
    exp.add_argument("--json", action="store_true", help="machine-readable output")
    exp.set_defaults(run=run_export)
    scrub_cmd = commands.add_parser(
        "scrub",
        help="read every blob back and check it against its digest",
        description="Hash every stored blob; mark those whose bytes do not match so they are no longer served "
        "(clients then push them again, which repairs them). Deletes nothing.",
    )
    scrub_cmd.add_argument("config", nargs="?", help="configuration file")
    scrub_cmd.add_argument("--dry-run", "-d", action="store_true", help="report only; mark nothing")
    scrub_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    scrub_cmd.set_defaults(run=run_scrub)


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
                json.dumps({"state": dataclasses.asdict(report.state), "problems": problems, "dry_run": args.dry_run})
            )
            return 0
        print(_import_line(report.state) + (" (dry run: nothing was changed)" if args.dry_run else ""))
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
            f"{report.links_written} links written, {report.links_unchanged} already right, "
            f"{report.blobs_copied} blobs copied to their content-addressed key ({_size(report.bytes_copied)})"
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
            print(f"checked {report.checked} blobs ({_size(report.bytes_read)}): {len(report.corrupt)} corrupt")
            for bad in report.corrupt:
                print(f"  {bad['digest']}: {bad['problem']} ({bad['key']})")
            if report.corrupt:
                print("dry run: nothing was marked" if args.dry_run else "marked: no longer served until pushed again")
        return 1 if report.corrupt else 0

    return asyncio.run(with_services(config, once, readonly=args.dry_run))
