"""What commands print for people: sizes, tables, progress lines, one-line errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

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
    return list(table_lines(lambda: rows, columns))


def table_lines(rows: Callable[[], Iterable[dict[str, str]]], columns: list[tuple[str, str]]) -> Iterator[str]:
    """Like `table`, with the rows read twice from `rows()` (widths first), so they need not fit in memory."""
    widths = [len(title) for _, title in columns]
    for r in rows():
        widths = [max(w, len(r[key])) for w, (key, _) in zip(widths, columns, strict=True)]
    yield "  ".join(title.ljust(w) for (_, title), w in zip(columns, widths, strict=True)).rstrip()
    for r in rows():
        yield "  ".join(r[key].ljust(w) for (key, _), w in zip(columns, widths, strict=True)).rstrip()


def print_json(report: dict[str, Any]) -> None:
    """`report` as indented JSON on stdout, its iterable values written an item at a time (a list
    of a million rows is never built); other values as json.dumps writes them."""
    out = sys.stdout
    out.write("{")
    for n, (key, value) in enumerate(report.items()):
        out.write(("," if n else "") + f"\n  {json.dumps(key)}: ")
        if value is None or isinstance(value, (dict, str, int, float, bool)):
            out.write(json.dumps(value, indent=2).replace("\n", "\n  "))
            continue
        empty = True
        for item in value:
            out.write(("[" if empty else ",") + "\n    " + json.dumps(item, indent=2).replace("\n", "\n    "))
            empty = False
        out.write("[]" if empty else "\n  ]")
    out.write("\n}\n")


def brief(exc: BaseException) -> str:
    """An exception as one line of at most 300 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
