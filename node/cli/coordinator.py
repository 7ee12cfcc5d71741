"""`wharf coordinator status` and `wharf coordinator defrag`: how full the coordinator is, and giving
its free space back to the disk member by member while the registry serves."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict

from coordinator.compaction import Defragmented, defragment_all
from coordinator.kv import MemberSpace, OutOfSpace, StoreSpace

from ..config import Config
from ..services import Services
from ..space import WARN_AT, describe
from ..store import describe_coordinator
from .output import brief, size, table
from .registry import Commands, with_config, with_services


def add_commands(commands: Commands) -> None:
    group = commands.add_parser("coordinator", help="the coordinator's size, quota and alarms; defragmentation")
    actions = group.add_subparsers(dest="coordinator_action", required=True)
    status = actions.add_parser(
        "status",
        help="size, size in use, quota, revision and alarms of every member",
        description="How full the coordinator is: per etcd member (or the embedded file) its size on disk, "
        "the part holding data, the quota at which it refuses writes, its revision and its alarms.",
    )
    status.add_argument("--config", "-c", help="configuration file")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(run=with_config(run_status))
    defrag = actions.add_parser(
        "defrag",
        help="compact history, then give free space back to the disk, one member at a time, leader last",
        description="Compacts the history to coordinator.etcd.compaction.keep revisions (none while out of "
        "space), then defragments "
        "every etcd member one at a time, the leader last, so a quorum keeps serving and pushes go on (each "
        "member pauses while its own file is rewritten). Clears a NOSPACE alarm once every member is below "
        "90% of its quota. On the embedded coordinator: rewrites the file (writers wait meanwhile).",
    )
    defrag.add_argument("--config", "-c", help="configuration file")
    defrag.add_argument("--no-compact", action="store_true", help="defragment only")
    defrag.add_argument(
        "--keep",
        type=int,
        help="revisions of history to keep (default: coordinator.etcd.compaction.keep; none while out of space)",
    )
    defrag.set_defaults(run=with_config(run_defrag))


def _member_row(member: MemberSpace) -> dict[str, str]:
    if member.error:
        blank = dict.fromkeys(("leader", "size", "in_use", "quota", "used", "revision"), "-")
        return {"member": member.name, "id": member.member_id or "-", **blank, "alarms": f"no answer: {member.error}"}
    return {
        "member": member.name,
        "id": member.member_id or "-",
        "leader": "yes" if member.leader else "",
        "size": size(member.size),
        "in_use": size(member.in_use),
        "quota": size(member.quota) if member.quota else "unknown",
        "used": f"{member.used:.0%}" if member.quota else "-",
        "revision": str(member.revision),
        "alarms": ", ".join(member.alarms) or "-",
    }


_COLUMNS = [
    ("member", "MEMBER"),
    ("id", "ID"),
    ("leader", "LEADER"),
    ("size", "SIZE"),
    ("in_use", "IN USE"),
    ("quota", "QUOTA"),
    ("used", "USED"),
    ("revision", "REVISION"),
    ("alarms", "ALARMS"),
]


def _advice(space: StoreSpace) -> list[str]:
    lines = []
    if "NOSPACE" in space.alarms:
        lines.append(
            "out of space: writes are refused, pulls go on. Run `wharf coordinator defrag`; if the data in use "
            "fills the quota, raise it first (etcd --quota-backend-bytes on every member, one restart at a time)"
            if space.backend == "etcd"
            else "out of space: the disk under the file is full; free space on it and writes resume"
        )
    for member in space.members:
        if member.error:
            continue
        if member.quota and member.used >= WARN_AT:
            lines.append(f"{member.name} is over {WARN_AT:.0%} of its quota")
        if space.backend == "etcd" and member.size > 2 * member.in_use and member.size - member.in_use > 64 << 20:
            lines.append(
                f"{member.name}: {size(member.size - member.in_use)} free inside the file; defrag gives it back"
            )
    return lines


def run_status(args: argparse.Namespace, config: Config) -> int:
    async def status(services: Services) -> int:
        space = await services.kv.space()
        if args.json:
            members = [asdict(m) | {"used": round(m.used, 6)} for m in space.members]
            doc = {"backend": space.backend, "revision": space.revision, "alarms": list(space.alarms)}
            print(json.dumps(doc | {"members": members}, indent=2))
            return 0
        print(f"coordinator: {describe_coordinator(config)}")
        print(f"revision {space.revision}; alarms: {', '.join(space.alarms) or 'none'}")
        for line in table([_member_row(m) for m in space.members], _COLUMNS):
            print(line)
        for line in _advice(space):
            print(f"note: {line}")
        return 0

    try:
        return asyncio.run(with_services(config, status, readonly=True))
    except (OSError, ConnectionError) as exc:
        print(f"wharf coordinator status: {brief(exc)}", file=sys.stderr)
        return 1


def run_defrag(args: argparse.Namespace, config: Config) -> int:
    def progress(member: MemberSpace, done: Defragmented | None) -> None:
        role = "leader" if member.leader else "member"
        if done is None:
            print(f"defragmenting {role} {member.name} ({describe(member)}) ...", flush=True)
        else:
            print(f"  {size(done.before)} -> {size(done.after)} in {done.seconds:.2f}s", flush=True)

    async def defrag(services: Services) -> int:
        etcd = config.coordinator.etcd
        full = "NOSPACE" in (await services.kv.space()).alarms
        if etcd is not None and not args.no_compact:
            current = (await services.kv.txn([], [])).revision
            keep = args.keep
            if keep is None:
                # Out of space no write moves the revision on: only forgetting all history frees what
                # was deleted to make room.
                keep = 0 if full else etcd.compaction.keep
            target = current - keep
            if target > 0:
                await services.kv.compact(target)
                print(f"compacted history up to revision {target} (current {current})", flush=True)
        _, cleared = await defragment_all(services.kv, progress=progress)
        space = await services.kv.space()
        if cleared or (full and "NOSPACE" not in space.alarms):
            # A node that saw the room come back may have cleared the alarm first (nodes do).
            print("cleared the NOSPACE alarm: writes are taken again")
        elif "NOSPACE" in space.alarms:
            fullest = space.fullest
            print(
                "still out of space"
                + (f" ({fullest.name}: {describe(fullest)})" if fullest else "")
                + ": the data in use fills the quota. Raise it (etcd --quota-backend-bytes on every member, one "
                "restart at a time) or delete images and let garbage collection free their records, then run "
                "this again",
                file=sys.stderr,
            )
            return 1
        return 0

    try:
        return asyncio.run(with_services(config, defrag))
    except (OSError, ConnectionError, OutOfSpace) as exc:
        print(f"wharf coordinator defrag: {brief(exc)}", file=sys.stderr)
        return 1
