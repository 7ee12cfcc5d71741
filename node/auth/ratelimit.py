"""Abuse limits: too many failed sign-ins from one address or for one user earn 429 for a back-off period.

Counts live in this process's memory: a cluster of N nodes allows up to N times the limit, which
still turns password guessing from thousands a second into a handful a minute.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..config import AuthFailureLimits

# Distinct addresses and user names remembered; the least recently failed are forgotten first.
MAX_TRACKED = 100_000


@dataclass
class _Record:
    failures: deque[float] = field(default_factory=deque)
    blocked_until: float = 0.0


class FailureLimiter:
    def __init__(self, limits: AuthFailureLimits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = {"address": limits.peraddress, "user": limits.peruser}
        self._window = limits.window
        self._backoff = limits.backoff
        self._clock = clock
        self._records: OrderedDict[tuple[str, str], _Record] = OrderedDict()

    def _keys(self, address: str | None, user: str | None) -> list[tuple[str, str]]:
        keys = []
        if address and self._limits["address"]:
            keys.append(("address", address))
        if user and self._limits["user"]:
            keys.append(("user", user))
        return keys

    def retry_after(self, address: str | None, user: str | None = None) -> float:
        """Seconds until `address` (and `user`) may try to sign in again; 0 when they may now."""
        return self.blocked(address, user)[0]

    def blocked(self, address: str | None, user: str | None = None) -> tuple[float, str | None]:
        """(seconds to wait, the limit that blocks: "address 10.0.0.1" or "user bob"); (0, None) if none."""
        now = self._clock()
        wait, by = 0.0, None
        for key in self._keys(address, user):
            record = self._records.get(key)
            if record is not None and record.blocked_until - now > wait:
                wait, by = record.blocked_until - now, f"{key[0]} {key[1]}"
        return wait, by

    def failure(self, address: str | None, user: str | None = None) -> list[str]:
        """Count one failed sign-in; the keys ("address 10.0.0.1", "user bob") it blocked."""
        now = self._clock()
        blocked = []
        for key in self._keys(address, user):
            record = self._records.get(key)
            if record is None:
                record = self._records[key] = _Record()
            self._records.move_to_end(key)
            while record.failures and record.failures[0] <= now - self._window:
                record.failures.popleft()
            record.failures.append(now)
            if len(record.failures) >= self._limits[key[0]] and record.blocked_until <= now:
                record.blocked_until = now + self._backoff
                record.failures.clear()
                blocked.append(f"{key[0]} {key[1]}")
        while len(self._records) > MAX_TRACKED:
            self._records.popitem(last=False)
        return blocked
