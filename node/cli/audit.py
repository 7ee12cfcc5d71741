"""`wharf audit verify`: check an audit log's hash chain and, given the configuration, the coordinator's record."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from coordinator.audit import AuditHead, read_head

from ..auditchain import Anchor, Report, first_chain, log_files, verify
from ..config import Config
from ..services import Services
from .registry import Commands, with_config, with_services


def add_commands(commands: Commands) -> None:
    group = commands.add_parser("audit", help="check the audit log")
    actions = group.add_subparsers(dest="audit_action", required=True)
    check = actions.add_parser(
        "verify",
        help="check that no line of an audit log was edited, removed, reordered or cut off",
        description=(
            "Check the hash chain through an audit log and its rotated files (PATH.1, PATH.2 ... are "
            "found beside a live PATH). With -c, also check that the newest line the coordinator "
            "recorded is there, so lines cut from the end are found too. Exits 1 at the first line "
            "found wrong, naming its file and line number."
        ),
    )
    check.add_argument("paths", nargs="+", metavar="PATH", help="the audit log (and any rotated or archived files)")
    check.add_argument("--config", "-c", help="configuration file, to reach the coordinator")
    check.set_defaults(run=with_config(run_verify))


async def _recorded(config: Config, chain: str) -> AuditHead | None:
    async def head(services: Services) -> AuditHead | None:
        return await read_head(services.kv, chain)

    return await with_services(config, head, readonly=True)


def run_verify(args: argparse.Namespace, config: Config) -> int:
    absent = [path for path in args.paths if not os.path.isfile(path)]
    if absent:
        print(f"wharf audit verify: no such file {absent[0]}", file=sys.stderr)
        return 2
    files = log_files(args.paths)
    anchor = None
    warnings = []
    if args.config:
        chain = first_chain(files)
        recorded = asyncio.run(_recorded(config, chain)) if chain else None
        if recorded is not None:
            anchor = Anchor(recorded.seq, recorded.hash, recorded.time)
        elif chain:
            warnings.append(f"the coordinator has no record of this log (chain {chain}): its end cannot be checked")
    report = verify(files, anchor, backups=config.audit.maxbackups if args.config else None)
    for line in report.notes:
        print(f"note: {line}")
    for line in warnings:
        print(f"warning: {line}")
    if not report.ok:
        print(report.problem)
        return 1
    print(_summary(report, anchor))
    return 0


def _summary(report: Report, anchor: Anchor | None) -> str:
    if report.first is None or report.last is None or report.first.head is None or report.last.head is None:
        return f"ok: no lines in {len(report.files)} files"
    text = (
        f"ok: {report.lines} lines in {len(report.files)} files, lines {report.first.head.seq}-"
        f"{report.last.head.seq} of chain {report.chain}"
    )
    if anchor is not None:
        text += f"; the coordinator's record of line {anchor.seq} ({anchor.time}) matches"
    return text
