"""Keeping the coordinator's store small: history compacted on a schedule, space given back member by
member, and the NOSPACE alarm cleared once there is room again.

etcd keeps every revision of every key until it is told to forget them, and gives the pages that
compaction frees back to the disk only when a member is defragmented; its file, not its live data,
is what its quota measures. kube-apiserver does the same for Kubernetes: compact every few minutes,
defragment by hand, one member at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .kv import KV, MemberSpace, StoreSpace

log = logging.getLogger("wharf.coordinator")

# A NOSPACE alarm is cleared only when every member is below this share of its quota, so a store
# that is still nearly full does not flap between refusing and taking writes.
DISARM_BELOW = 0.9


class Compactor:
    """The leader's compaction schedule.

    Each run forgets the revisions older than both `keep` revisions behind the current one and the
    revision the previous run saw: history younger than one interval always survives, for watches
    that resume, snapshots being read and upload sessions being continued. Out of space, a run keeps
    no history at all: no write moves the revision on then, and only forgetting it frees records
    deleted to make room.
    """

    def __init__(self, kv: KV, keep: int) -> None:
        self.kv = kv
        self.keep = keep
        self._previous: int | None = None
        self.compacted = 0  # the revision compacted to last (0: not yet)

    async def run_once(self, *, out_of_space: bool = False) -> int | None:
        """Compact if there is history to forget; the revision compacted to, or None."""
        current = (await self.kv.txn([], [])).revision
        previous, self._previous = self._previous, current
        if out_of_space:
            target = current
        elif previous is None:
            return None  # the first run only notes where history stands
        else:
            target = min(current - self.keep, previous)
        if target <= self.compacted or target <= 0:
            return None
        started = time.monotonic()
        await self.kv.compact(target)
        self.compacted = target
        log.info(
            "compacted coordinator history up to revision %d (current %d) in %.2fs",
            target,
            current,
            time.monotonic() - started,
            extra={"fields": {"revision": target, "current": current}},
        )
        return target


def room_again(space: StoreSpace) -> bool:
    """Whether a NOSPACE alarm may be cleared: every member answered and is well below its quota."""
    return bool(space.members) and all(
        not m.error and m.quota and m.size < DISARM_BELOW * m.quota for m in space.members
    )


async def disarm_if_room(kv: KV, space: StoreSpace) -> tuple[str, ...]:
    """Clear NOSPACE once there is room again (quota raised, records freed and defragmented)."""
    if "NOSPACE" not in space.alarms or not room_again(space):
        return ()
    cleared = await kv.disarm()
    if cleared:
        fullest = space.fullest
        log.warning(
            "coordinator has room again (the fullest member at %.0f%% of its quota): cleared its NOSPACE alarm",
            100 * fullest.used if fullest else 0,
        )
    return cleared


@dataclass(frozen=True)
class Defragmented:
    member: str
    leader: bool
    before: int
    after: int
    seconds: float


Progress = Callable[[MemberSpace, "Defragmented | None"], None]


def _nothing(member: MemberSpace, done: Defragmented | None) -> None:
    pass


async def defragment_all(kv: KV, *, progress: Progress = _nothing) -> tuple[list[Defragmented], tuple[str, ...]]:
    """Defragment every member, one at a time and the leader last, so a quorum keeps serving; then
    clear NOSPACE if there is room. Returns what each member gave back and the alarms cleared.

    `progress(member, None)` is called as a member starts, `progress(member, done)` as it ends.
    """
    space = await kv.space()
    unreachable = [m for m in space.members if m.error]
    if unreachable:
        raise ConnectionError(
            "not every member answers, so defragmenting could take the quorum down: "
            + "; ".join(f"{m.name}: {m.error}" for m in unreachable)
        )
    done: list[Defragmented] = []
    for member in sorted(space.members, key=lambda m: (m.leader, m.name)):
        progress(member, None)
        started = time.monotonic()
        await kv.defragment(member.name)
        seconds = time.monotonic() - started
        after = next((m for m in (await kv.space()).members if m.name == member.name), member)
        result = Defragmented(member.name, member.leader, member.size, after.size, seconds)
        done.append(result)
        progress(member, result)
    return done, await disarm_if_room(kv, await kv.space())
