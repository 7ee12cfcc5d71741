"""Room in the coordinator (and on the storage's disk) as this node sees it: gauges, a warning at 80%
of the quota, and out of space as a clear, safe state.

Out of space (etcd's NOSPACE alarm, a full disk under the embedded file or the filesystem storage),
a write is answered 503 UNAVAILABLE with Retry-After, naming the cause; nothing of it was applied,
pulls go on, readiness says "coordinator out of space: read-only", and the log says which command
fixes it. Nothing has to restart: the next write that fits succeeds, and the state clears as soon
as a poll finds room again (a NOSPACE alarm that no longer holds is cleared here too).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time

from starlette.requests import Request
from starlette.responses import Response

from coordinator.compaction import disarm_if_room
from coordinator.kv import KV, MemberSpace, OutOfSpace, StoreSpace

from .config import format_size
from .errors import ERROR_KEY, Unavailable, error_response
from .metrics import Metrics

log = logging.getLogger("wharf.space")

# Share of the quota at which the log warns and readiness says so.
WARN_AT = 0.8
POLL_SECONDS = 5.0
_WARN_EVERY = 600.0
_REFUSAL_LOG_EVERY = 60.0
RETRY_AFTER = "60"
_ALARMS = ("NOSPACE", "CORRUPT")

ETCD_FIX = (
    "`wharf coordinator defrag -c CONFIG` (compacts, defragments member by member, clears the alarm); if "
    "the live data fills the quota, first raise --quota-backend-bytes on every member (restart them one "
    "at a time) or delete images and let garbage collection free their records"
)
EMBEDDED_FIX = (
    "free space on the disk under the coordinator file (or move it to a larger one); "
    "`wharf coordinator status -c CONFIG` shows its size, and writes resume by themselves"
)
STORAGE_FIX = "free space on the storage's filesystem or grow it; writes resume by themselves"


def describe(member: MemberSpace) -> str:
    """One member's figures in words: size against quota, in use, alarms."""
    if member.error:
        return f"{member.name}: no answer ({member.error})"
    text = f"{format_size(member.size)} of {format_size(member.quota) if member.quota else 'an unknown quota'}"
    if member.quota:
        text += f" ({member.used:.0%})"
    text += f", {format_size(member.in_use)} in use"
    if member.alarms:
        text += ", alarm " + ", ".join(member.alarms)
    return text


class Space:
    """The last figures a poll of the coordinator found, and whether writes are refused for lack of space."""

    def __init__(self, kv: KV, metrics: Metrics, backend: str) -> None:
        self.kv = kv
        self.metrics = metrics
        self.backend = backend
        self.space: StoreSpace | None = None
        self._refused = 0.0  # monotonic time of the last write refused for lack of space
        self._refusal = ""
        self._refusal_logged = 0.0
        self._warned = 0.0
        self._storage_logged = 0.0
        self._members: set[str] = set()

    @property
    def fix(self) -> str:
        return ETCD_FIX if self.backend == "etcd" else EMBEDDED_FIX

    @property
    def out_of_space(self) -> bool:
        return bool(self._refused) or (self.space is not None and "NOSPACE" in self.space.alarms)

    # -- what requests see ------------------------------------------------------------------

    def refused(self, exc: OutOfSpace) -> Unavailable:
        """A write the coordinator refused for lack of space: the state, the log, the client's error."""
        now = time.monotonic()
        self._refused, self._refusal = now, str(exc)
        self.metrics.coordinator_writes_refused.inc()
        if now - self._refusal_logged >= _REFUSAL_LOG_EVERY:
            self._refusal_logged = now
            log.error(
                "coordinator out of space: writes are refused (503), pulls go on; to fix: %s (%s)",
                self.fix,
                exc,
                extra={"fields": {"backend": self.backend, "fix": self.fix}},
            )
        return Unavailable(
            {"reason": "coordinator out of space", "backend": self.backend, "retry_after_seconds": int(RETRY_AFTER)},
            message=f"the registry's coordinator ({self.backend}) is out of space: pulls work, "
            "pushes and deletes are refused until an operator makes room",
            headers={"Retry-After": RETRY_AFTER},
        )

    def storage_refused(self, exc: OSError) -> Unavailable:
        """A write the storage's disk had no room for."""
        now = time.monotonic()
        if now - self._storage_logged >= _REFUSAL_LOG_EVERY:
            self._storage_logged = now
            log.error("storage out of space: writes are refused (503), pulls go on; to fix: %s (%s)", STORAGE_FIX, exc)
        return Unavailable(
            {"reason": "storage out of space", "retry_after_seconds": int(RETRY_AFTER)},
            message="the registry's storage is out of space: pulls work, pushes are refused until an operator "
            "makes room",
            headers={"Retry-After": RETRY_AFTER},
        )

    def readonly(self) -> str | None:
        """Readiness's read-only line while out of space; None otherwise."""
        if not self.out_of_space:
            return None
        fullest = self.space.fullest if self.space is not None else None
        where = f": {fullest.name} {describe(fullest)}" if fullest is not None else ""
        return f"coordinator out of space: read-only{where}; fix: {self.fix}"

    def describe(self) -> str:
        """Readiness's line on room in the coordinator."""
        fullest = self.space.fullest if self.space is not None else None
        if fullest is None:
            return "not measured yet"
        assert self.space is not None
        text = describe(fullest) if len(self.space.members) == 1 else f"fullest {fullest.name}: {describe(fullest)}"
        if fullest.used >= WARN_AT:
            text += f"; warning: over {WARN_AT:.0%} of the quota"
        return text

    # -- polling ----------------------------------------------------------------------------

    async def refresh(self) -> StoreSpace:
        started = time.monotonic()
        space = await self.kv.space()
        if await disarm_if_room(self.kv, space):
            space = await self.kv.space()
        self.space = space
        if self._refused and self._refused < started and "NOSPACE" not in space.alarms and _room(space):
            log.warning("coordinator has room again: writes are taken (%s)", self.describe())
            self._refused, self._refusal = 0.0, ""
        self._export(space)
        self._warn(space)
        return space

    def _export(self, space: StoreSpace) -> None:
        m = self.metrics
        m.coordinator_revision.set(space.revision)
        seen = set()
        for member in space.members:
            if member.error:
                continue
            seen.add(member.name)
            m.coordinator_db_size.labels(member.name).set(member.size)
            m.coordinator_db_in_use.labels(member.name).set(member.in_use)
            m.coordinator_quota.labels(member.name).set(member.quota)
            for alarm in _ALARMS:
                m.coordinator_alarm.labels(member.name, alarm).set(1 if alarm in member.alarms else 0)
        for gone in self._members - seen:
            for gauge in (m.coordinator_db_size, m.coordinator_db_in_use, m.coordinator_quota):
                gauge.remove(gone)
            for alarm in _ALARMS:
                m.coordinator_alarm.remove(gone, alarm)
        self._members = seen
        fullest = space.fullest
        m.coordinator_used.set(fullest.used if fullest is not None else 0)

    def _warn(self, space: StoreSpace) -> None:
        fullest = space.fullest
        if fullest is None or fullest.used < WARN_AT:
            self._warned = 0.0
            return
        now = time.monotonic()
        if self._warned and now - self._warned < _WARN_EVERY:
            return
        self._warned = now
        log.warning(
            "coordinator %s is at %.0f%% of its quota (%s): at 100%% writes stop; %s",
            fullest.name,
            100 * fullest.used,
            describe(fullest),
            "run `wharf coordinator defrag -c CONFIG` if much of it is not in use, else raise the quota"
            if self.backend == "etcd"
            else "free space on its disk",
            extra={"fields": {"member": fullest.name, "used": round(fullest.used, 4)}},
        )

    async def run(self, interval: float = POLL_SECONDS) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cannot read the coordinator's space: %s", exc)
            await asyncio.sleep(interval)


def _room(space: StoreSpace) -> bool:
    """No member is full (an unknown quota counts as room)."""
    return all(m.error or not m.quota or m.size < m.quota for m in space.members)


def storage_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


async def handle_out_of_space(request: Request, exc: Exception) -> Response:
    """A write the coordinator refused for lack of space: 503 with Retry-After, and the fix in the log."""
    assert isinstance(exc, OutOfSpace)
    error = request.app.state.services.space.refused(exc)
    request.scope.setdefault("state", {})[ERROR_KEY] = error
    return error_response(error, request.method)


async def handle_os_error(request: Request, exc: Exception) -> Response:
    """A full disk under the filesystem storage is 503 with Retry-After too, and so is a service that
    cannot be reached (etcd down: the client tries again; a write may or may not have been applied,
    so it must). Any other OSError is a bug."""
    if isinstance(exc, ConnectionError):
        log.warning(
            "%s %s: a connection it needed failed (%s): %s",
            request.method,
            request.url.path,
            type(exc).__name__,
            str(exc)[:300],
        )
        unreachable = Unavailable(
            {"reason": "the registry's coordinator or storage cannot be reached; try again"},
            headers={"Retry-After": RETRY_AFTER},
        )
        request.scope.setdefault("state", {})[ERROR_KEY] = unreachable
        return error_response(unreachable, request.method)
    if not storage_full(exc):
        raise exc
    assert isinstance(exc, OSError)
    error = request.app.state.services.space.storage_refused(exc)
    request.scope.setdefault("state", {})[ERROR_KEY] = error
    return error_response(error, request.method)
