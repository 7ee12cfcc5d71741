"""The cluster-wide read-only switch: its record in the KV, and a follower every node keeps current."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass

from . import keys
from .kv import KV

log = logging.getLogger("wharf.readonly")

# A watch tells a node at once; this re-read is the safety net should a watch stall unnoticed.
_REFRESH_SECONDS = 1.0
_RETRY_SECONDS = 0.5


class Halted(Exception):
    """A job stopped before deleting anything more, because the registry went read-only."""


@dataclass(frozen=True)
class SwitchState:
    """What `wharf maintenance readonly on|off` last set; off when it never ran."""

    enabled: bool = False
    by: str = ""
    at: float = 0.0
    reason: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> SwitchState:
        data = json.loads(raw)
        return cls(
            bool(data.get("enabled")), str(data.get("by", "")), float(data.get("at", 0)), str(data.get("reason", ""))
        )


async def read_switch(kv: KV) -> SwitchState:
    found = await kv.get(keys.READONLY)
    return SwitchState.from_json(found.value) if found is not None else SwitchState()


async def set_switch(kv: KV, enabled: bool, *, by: str, reason: str = "") -> SwitchState:
    state = SwitchState(enabled, by, time.time(), reason)
    await kv.put(keys.READONLY, state.to_json())
    return state


class SwitchFollower:
    """The switch as this process last saw it: a plain attribute, so requests read no KV for it.

    `run()` keeps it current: a watch on the record tells at once, and a re-read every second
    covers a watch that stalls, so a change reaches every node well within two seconds.
    """

    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self.state = SwitchState()
        self.revision = -1  # of the record last applied; -1 before the first read

    async def refresh(self) -> SwitchState:
        found = await self.kv.get(keys.READONLY)
        if found is None:
            self._apply(SwitchState(), 0)
        else:
            self._apply(SwitchState.from_json(found.value), found.mod_revision)
        return self.state

    def _apply(self, state: SwitchState, revision: int) -> None:
        if revision < self.revision:
            return  # a read that started before a newer watch event arrived
        if state.enabled != self.state.enabled and self.revision >= 0:
            log.warning(
                "registry switched %s by %s%s",
                "read-only" if state.enabled else "writable",
                state.by or "someone",
                f": {state.reason}" if state.reason else "",
                extra={"fields": {"readonly": state.enabled, "by": state.by, "reason": state.reason}},
            )
        self.state = state
        self.revision = revision

    async def run(self) -> None:
        await asyncio.gather(self._watch(), self._reread())

    async def _reread(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cannot read the read-only switch: %s", exc)
            await asyncio.sleep(_REFRESH_SECONDS)

    async def _watch(self) -> None:
        while True:
            try:
                watch = await self.kv.watch(keys.READONLY)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("cannot watch the read-only switch: %s", exc)
                await asyncio.sleep(_RETRY_SECONDS)
                continue
            try:
                async for event in watch:
                    if event.key == keys.READONLY:
                        state = SwitchState.from_json(event.value) if event.type == "put" else SwitchState()
                        self._apply(state, event.mod_revision)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("lost the read-only switch watch: %s", exc)
                await asyncio.sleep(_RETRY_SECONDS)
            finally:
                with contextlib.suppress(Exception):
                    await watch.close()
