"""What commands print for people: sizes, tables, progress lines, one-line errors."""

from __future__ import annotations

import sys

from ..config import format_size


def progress(phase: str, done: int, total: int) -> None:
    """A progress line on a terminal; the last count only, otherwise."""
    if sys.stderr.isatty():
        end = "\n" if done >= total else ""
        print(f"\r{phase}: {done}/{total}", end=end, file=sys.stderr, flush=True)
    elif done >= total:
        print(f"{phase}: {done}/{total}", file=sys.stderr)


# Bytes for people: 512 B, 1.5 KiB, 3.2 GiB.
size = format_size


def table(rows: list[dict[str, str]], columns: list[tuple[str, str]]) -> list[str]:
    """Rows as aligned columns, `columns` being (key, title) pairs."""
    widths = [max([len(title), *(len(r[key]) for r in rows)]) for key, title in columns]
    lines = ["  ".join(title.ljust(w) for (_, title), w in zip(columns, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(r[key].ljust(w) for (key, _), w in zip(columns, widths, strict=True)).rstrip())
    return lines


def brief(exc: BaseException) -> str:
    """An exception as one line of at most 300 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
