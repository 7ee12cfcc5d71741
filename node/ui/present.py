"""How the web pages write figures: sizes, times, digests and platforms."""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(value: int | None) -> str:
    """Bytes in binary units, three significant figures: 1.21 GiB."""
    if value is None:
        return "—"
    amount = float(value)
    for unit in _UNITS:
        if abs(amount) < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{int(amount)} B"
            return f"{amount:.3g} {unit}" if amount < 1000 else f"{amount:.0f} {unit}"
        amount /= 1024
    return f"{value} B"


def _seconds(at: float | str | None) -> float | None:
    if at is None or at == "":
        return None
    if isinstance(at, int | float):
        return float(at)
    try:
        return datetime.datetime.fromisoformat(str(at).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def moment(at: float | str | None) -> str:
    """A time in UTC, to the second: 2026-12-02 05:04:01 UTC."""
    seconds = _seconds(at)
    if seconds is None:
        return "—"
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ago(at: float | str | None, now: float | None = None) -> str:
    """How long ago, in the largest whole unit: 3 minutes ago; 'in 5 minutes' for the future."""
    seconds = _seconds(at)
    if seconds is None:
        return "never"
    delta = (now if now is not None else time.time()) - seconds
    future = delta < 0
    delta = abs(delta)
    for unit, length in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if delta >= length:
            count = int(delta // length)
            text = f"{count} {unit}{'s' if count != 1 else ''}"
            return f"in {text}" if future else f"{text} ago"
    return "in a moment" if future else "just now"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds % 1 else f"{seconds:.0f} s"
    if seconds < 3600 or (seconds < 7200 and seconds % 3600):
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h" if seconds % 3600 == 0 else f"{seconds / 3600:.1f} h"


def short(digest: str | None) -> str:
    """sha256:0123456789ab (twelve hex digits, as docker prints image ids)."""
    if not digest:
        return "—"
    algorithm, _, hexpart = digest.partition(":")
    return f"{algorithm}:{hexpart[:12]}" if hexpart else digest[:19]


def platform(value: Any) -> str | None:
    """os/architecture[/variant] of a platform object or an image config; None if it names none."""
    if not isinstance(value, dict):
        return None
    os_name, arch = value.get("os"), value.get("architecture")
    if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
        return None
    variant = value.get("variant")
    return f"{os_name}/{arch}" + (f"/{variant}" if isinstance(variant, str) and variant else "")


def percent(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}%" if value >= 10 or value == 0 else f"{value:.1f}%"


def bar(value: float | None) -> int:
    """A percentage as a whole width for a meter, 0-100."""
    return 0 if value is None else max(0, min(100, round(value)))


FILTERS: dict[str, Callable[..., Any]] = {
    "size": size,
    "moment": moment,
    "ago": ago,
    "duration": duration,
    "short": short,
    "platform": platform,
    "percent": percent,
    "bar": bar,
}
